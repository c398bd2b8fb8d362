"""One authenticated peer connection over trio: the IO half of p2preg.wire.PeerConnection.

The codec decides everything (framing, the HMAC handshake, what may be sent when); this module
only moves bytes, with a deadline on every wait, a lock so frames from two tasks never interleave,
and rate limits on both directions. Pieces go out with os.sendfile straight from the blob file,
after a header frame (the payload never passes through msgpack or a Python buffer).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from p2preg.digest import Digest
from p2preg.errors import RemoteProtocolError
from p2preg.token_bucket import RateLimiter
from p2preg.wire import (
    NEED_DATA,
    Authenticated,
    ConnectionClosed,
    Event,
    Message,
    PeerConnection,
    Piece,
    Role,
)
from p2preg.zerocopy import sendfile_all

if TYPE_CHECKING:
    from agent.incoming_pieces import IncomingPieces

RECEIVE_SIZE = 256 * 1024
HANDSHAKE_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0
# Upload pacing granularity: sendfile at most this much between token-bucket checks.
UPLOAD_CHUNK = 256 * 1024
# While a piece payload is arriving, the socket wakes us only once this much (or the rest of
# the payload) is buffered (SO_RCVLOWAT): one wakeup per 256 KiB instead of one per few
# segments, which was most of an agent's CPU time at 20 MiB/s.
PAYLOAD_LOWAT = RECEIVE_SIZE
# Reads that found data at once may skip trio's scheduler; every this many, one goes through it.
FAST_READS_PER_CHECKPOINT = 8


class PeerGone(Exception):
    """The connection ended (closed, broken, or timed out)."""


class PeerLink:
    def __init__(
        self,
        stream: trio.SocketStream,
        connection: PeerConnection,
        upload: RateLimiter,
        download: RateLimiter,
    ) -> None:
        self.stream = stream
        self.connection = connection
        self._upload = upload
        self._download = download
        self._send_lock = trio.Lock()
        self.address = _peer_address(stream)
        self._lowat = 1  # the socket's SO_RCVLOWAT (Linux default)
        # The socket's descriptor for reads and writes that skip trio's wrappers (None: a
        # stream without a socket, in tests), and reads since the last one that yielded.
        sock = getattr(stream, "socket", None)
        self._fd: int | None = sock.fileno() if sock is not None else None
        self._fast_reads = 0
        # A download connection reports each piece that starts and ends arriving to the
        # agent's count (agent/incoming_pieces.py), and remembers whether its peer was last
        # told that we are busy (wire version 3).
        self.incoming: IncomingPieces | None = None
        self._arriving = False
        self._arriving_since = 0.0
        # How long the payload of the last piece took to arrive, first byte to last (0: none).
        self.last_payload_seconds = 0.0
        self.told_busy = False

    @property
    def peer_id(self) -> bytes:
        assert self.connection.peer_id is not None
        return self.connection.peer_id

    @classmethod
    async def dial(
        cls,
        address: tuple[str, int],
        local_id: bytes,
        secret: bytes,
        upload: RateLimiter,
        download: RateLimiter,
        *,
        connect_timeout: float = 5.0,
    ) -> PeerLink:
        try:
            with trio.fail_after(connect_timeout):
                stream = await trio.open_tcp_stream(*address)
        except (OSError, trio.TooSlowError) as exc:
            raise PeerGone(f"cannot connect to peer {address[0]}:{address[1]}: {exc}") from exc
        return await cls._handshake(stream, Role.DIALER, local_id, secret, upload, download)

    @classmethod
    async def accept(
        cls,
        stream: trio.SocketStream,
        local_id: bytes,
        secret: bytes,
        upload: RateLimiter,
        download: RateLimiter,
    ) -> PeerLink:
        return await cls._handshake(stream, Role.LISTENER, local_id, secret, upload, download)

    @classmethod
    async def _handshake(
        cls,
        stream: trio.SocketStream,
        role: Role,
        local_id: bytes,
        secret: bytes,
        upload: RateLimiter,
        download: RateLimiter,
    ) -> PeerLink:
        connection = PeerConnection(role, local_id, secret, secrets.token_bytes(32))
        link = cls(stream, connection, upload, download)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await link._send_raw(connection.initiate())
                while True:
                    event = await link.receive()
                    if isinstance(event, Authenticated):
                        return link
                    if isinstance(event, ConnectionClosed):
                        raise PeerGone("peer closed the connection during the handshake")
        except BaseException:
            await link.aclose()
            raise

    async def receive(self) -> Event:
        """The next event from the peer. Raises RemoteProtocolError on bad bytes, PeerGone
        when the connection broke. Handshake replies the codec produces are sent here."""
        while True:
            event = self.connection.next_event()
            pending = self.connection.data_to_send()
            if pending:
                await self._send_raw(pending)
            if event is not NEED_DATA:
                assert not isinstance(event, type)
                if self._arriving and isinstance(event, Piece):
                    self._arrival_ended()
                return event
            payload_needed = self.connection.payload_bytes_needed
            if payload_needed and not self._arriving:
                self._arriving = True  # a piece's payload has begun to arrive
                self._arriving_since = trio.current_time()
                if self.incoming is not None:
                    self.incoming.piece_started()
            self._set_lowat(min(max(payload_needed, 1), PAYLOAD_LOWAT))
            data = await self._receive_bytes()
            if data:
                await self._download.acquire(len(data))
            self.connection.receive_data(data)

    def buffered_event(self) -> Event | None:
        """The next event if the bytes already received complete one (no waiting), else None.
        After the handshake only: handshake replies are sent by ``receive``."""
        event = self.connection.next_event()
        if event is NEED_DATA:
            return None
        assert not isinstance(event, type)
        if self._arriving and isinstance(event, Piece):
            self._arrival_ended()
        return event

    def _arrival_ended(self, *, whole: bool = True) -> None:
        self._arriving = False
        if whole:
            self.last_payload_seconds = trio.current_time() - self._arriving_since
        if self.incoming is not None:
            self.incoming.piece_ended()

    @property
    def arriving(self) -> bool:
        """A piece's payload is arriving: its first bytes are here, its last are not."""
        return self._arriving

    async def _receive_bytes(self) -> bytes:
        """Up to RECEIVE_SIZE bytes (b"": the peer closed). Reads the socket at once when it
        has data, without the trips through trio's scheduler that ``receive_some`` makes per
        call (an agent reads thousands of times a second); one read in
        FAST_READS_PER_CHECKPOINT still yields, so a peer that floods us cannot starve the
        other tasks."""
        if self._fd is None or self._fast_reads >= FAST_READS_PER_CHECKPOINT:
            self._fast_reads = 0
            try:
                return await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise PeerGone(f"connection to peer lost: {exc!r}") from exc
        while True:
            fd = self._fd  # (again after every wait: aclose() may have run meanwhile)
            if fd is None:
                raise PeerGone("connection closed")
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self.stream.socket)
                except (trio.ClosedResourceError, OSError) as exc:
                    raise PeerGone(f"connection to peer lost: {exc!r}") from exc
                self._fast_reads = 0  # (that wait yielded)
                continue
            except OSError as exc:
                raise PeerGone(f"connection to peer lost: {exc!r}") from exc
            self._fast_reads += 1
            return data

    def _set_lowat(self, lowat: int) -> None:
        if lowat == self._lowat:
            return
        sock = getattr(self.stream, "socket", None)
        if sock is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        except OSError:
            return  # not a TCP socket, or closed: plain wakeups are correct too, just slower
        self._lowat = lowat

    async def send(self, message: Message) -> None:
        await self._send_frames(self.connection.send(message))

    async def send_many(self, messages: Iterable[Message]) -> None:
        """Several messages in one write (HAVE bursts: one syscall and one wakeup, not N)."""
        await self._send_frames(b"".join(self.connection.send(m) for m in messages))

    async def _send_frames(self, data: bytes) -> None:
        """Send whole frames, never interleaved with another task's. When no other send is
        under way and the socket takes all of it at once (the common case: small frames, a
        socket buffer with room), that is one write and no trip through trio's scheduler."""
        lock = self._send_lock
        if self._fd is None or lock.locked():
            async with lock:
                await self._send_raw(data)
            return
        lock.acquire_nowait()  # (free: taken without yielding, so no frame can slip in)
        try:
            try:
                sent = os.write(self._fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise PeerGone(f"connection to peer lost: {exc!r}") from exc
            if sent < len(data):
                await self._send_raw(data[sent:])
        finally:
            lock.release()

    async def send_piece(
        self, digest: Digest, index: int, fd: int, offset: int, length: int
    ) -> None:
        """A piece header, then ``length`` bytes of ``fd`` from ``offset`` with sendfile."""
        async with self._send_lock:
            await self._send_raw(self.connection.piece_header(digest, index, length))
            sent = 0
            while sent < length:
                chunk = min(UPLOAD_CHUNK, length - sent)
                await self._upload.acquire(chunk)
                try:
                    await sendfile_all(
                        self.stream.socket, fd, offset + sent, chunk, stall_seconds=SEND_TIMEOUT
                    )
                except (OSError, trio.TooSlowError, EOFError) as exc:
                    raise PeerGone(f"sending piece {index} failed: {exc!r}") from exc
                sent += chunk

    async def _send_raw(self, data: bytes) -> None:
        if not data:
            return
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerGone(f"connection to peer lost: {exc!r}") from exc
        except trio.TooSlowError as exc:
            raise PeerGone("peer stopped reading") from exc

    async def aclose(self) -> None:
        self._fd = None  # (the number may be reused once the socket is closed)
        if self._arriving:  # (a piece cut off mid-payload no longer arrives)
            self._arrival_ended(whole=False)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who this agent is on the peer wire, and the rate limits its connections share."""

    peer_id: bytes
    secret: bytes
    upload: RateLimiter
    download: RateLimiter
    # The pieces arriving on the connections it dials (None: not counted, nothing told).
    incoming: IncomingPieces | None = None

    async def dial(self, address: str, *, connect_timeout: float = 5.0) -> PeerLink:
        """Connect to ``host:port`` (as a tracker or discovery advertises it) and handshake."""
        host, _, port = address.rpartition(":")
        try:
            target = (host.strip("[]"), int(port))
        except ValueError:
            raise PeerGone(f"bad peer address {address!r}") from None
        link = await PeerLink.dial(
            target,
            self.peer_id,
            self.secret,
            self.upload,
            self.download,
            connect_timeout=connect_timeout,
        )
        link.address = address
        link.incoming = self.incoming
        return link


def _peer_address(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def load_peer_id(data_dir: str) -> bytes:
    """This agent's persistent peer id: 16 random bytes kept in ``<data-dir>/peer-id``."""
    path = os.path.join(data_dir, "peer-id")
    try:
        with open(path, "rb") as file:
            value = file.read()
        if len(value) == 16:
            return value
    except FileNotFoundError:
        pass
    os.makedirs(data_dir, exist_ok=True)
    value = secrets.token_bytes(16)
    temporary = f"{path}.{secrets.token_hex(4)}"
    with open(temporary, "wb") as file:
        file.write(value)
    os.replace(temporary, path)
    return value


__all__ = ["PeerGone", "PeerIdentity", "PeerLink", "RemoteProtocolError", "load_peer_id"]
