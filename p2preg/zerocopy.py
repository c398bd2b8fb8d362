"""Zero-copy file -> socket with trio (trio has no sendfile): ``os.sendfile`` on the raw,
non-blocking socket, waiting for writability on EAGAIN. A thin trio adapter, used by the HTTP
server for blobs and by the peer wire for pieces."""

from __future__ import annotations

import os

import trio

# Upper bound on one sendfile() call, so other tasks get the event loop regularly.
SENDFILE_CHUNK = 8 * 1024 * 1024


async def sendfile_all(
    sock: trio.socket.SocketType,
    fd: int,
    offset: int,
    count: int,
    *,
    chunk: int = SENDFILE_CHUNK,
    stall_seconds: float = 120.0,
) -> None:
    """Send ``count`` bytes of ``fd`` from ``offset``; each chunk must make progress in time."""
    out_fd = sock.fileno()
    while count:
        with trio.fail_after(stall_seconds):
            while True:
                try:
                    sent = os.sendfile(out_fd, fd, offset, min(count, chunk))
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
        if sent == 0:
            raise EOFError("file ended before the announced length")
        offset += sent
        count -= sent
        await trio.lowlevel.checkpoint()
