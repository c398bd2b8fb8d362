"""A small HTTP/1.1 server: h11 for the protocol, trio for the bytes, sendfile for blobs.

Why not an ASGI server: none can send a file zero-copy, and serving cached layers at disk/NIC
speed is this endpoint's main job (docs/architecture.md has the measurements). h11 keeps the
protocol logic sans-IO; this module only moves bytes and enforces deadlines.

A handler returns a ``Response`` whose body is bytes or a ``BodyWriter``. With ``max_body`` set,
the server reads a request body of up to that many bytes into ``Request.body`` before calling
the handler (larger: 413); with the default 0, bodies are drained and discarded as before.
A body writer sends through a ``BodySink`` that can write bytes or ``sendfile`` a file range
straight to the socket. If a body writer raises after the headers went out, the connection is
closed mid-body so the client sees a truncated response and retries, never a silently wrong one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

import h11
import trio

from p2preg.errors import ConfigError
from p2preg.units import parse_decimal
from p2preg.zerocopy import sendfile_all

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_DRAINED_BODY = 1024 * 1024
RECEIVE_SIZE = 64 * 1024
KEEPALIVE_TIMEOUT = 120.0
REQUEST_HEADERS_TIMEOUT = 30.0
SEND_TIMEOUT = 120.0
SERVER_NAME = b"p2preg"


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    peer: str
    body: bytes = b""  # filled only when serve_http was given max_body > 0

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class BodySink(Protocol):
    async def send_bytes(self, data: bytes) -> None: ...

    async def send_file(self, fd: int, offset: int, count: int) -> None: ...


class BodyWriter(Protocol):
    async def write_to(self, sink: BodySink) -> None: ...


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | BodyWriter = b""
    # For HEAD and for body writers: the Content-Length to announce (None: chunked).
    content_length: int | None = None


Handler = Callable[[Request], Awaitable[Response]]


class _FileRange:
    """A placeholder h11 accepts as Data (it only needs len()) so its framing stays in sync."""

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd, self.offset, self.count = fd, offset, count

    def __len__(self) -> int:
        return self.count


class _Connection:
    def __init__(self, stream: trio.SocketStream, handler: Handler, max_body: int = 0) -> None:
        self.stream = stream
        self.handler = handler
        self.max_body = max_body
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            host, port = stream.socket.getpeername()[:2]
            self.peer = f"{host}:{port}"
        except OSError:
            self.peer = "?"

    async def serve(self) -> None:
        try:
            while True:
                timeout = KEEPALIVE_TIMEOUT if self.h11.their_state is h11.IDLE else None
                request = await self._next_request(timeout)
                if request is None:
                    return
                if self.max_body and self.h11.their_state is h11.SEND_BODY:
                    refusal = await self._read_body(request)
                    if refusal is not None:
                        await self._send_refusal(*refusal)
                        return
                keep_going = await self._respond(request)
                if not keep_going or not await self._finish_request_body():
                    return
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                else:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return
        finally:
            await self.stream.aclose()

    async def _next_request(self, idle_timeout: float | None) -> Request | None:
        deadline_scope = trio.move_on_after(idle_timeout or REQUEST_HEADERS_TIMEOUT)
        with deadline_scope:
            while True:
                try:
                    event = self.h11.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._send_protocol_error(exc)
                    return None
                if event is h11.NEED_DATA:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    self.h11.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    headers: dict[str, str] = {}
                    for name, value in event.headers:
                        key = name.decode("latin-1").lower()
                        text = value.decode("latin-1")
                        headers[key] = f"{headers[key]}, {text}" if key in headers else text
                    return Request(
                        event.method.decode("ascii", "replace"),
                        event.target.decode("latin-1"),
                        headers,
                        self.peer,
                    )
                # ConnectionClosed, or anything else at the start of a cycle: we are done.
                return None
        return None

    async def _read_body(self, request: Request) -> tuple[int, str] | None:
        """Read the request body (at most ``max_body`` bytes) into ``request.body``.
        Returns (status, reason) when the request must be refused and the connection closed."""
        declared = request.headers.get("content-length", "").strip()
        if (parse_decimal(declared) or 0) > self.max_body:
            return 413, f"request body larger than {self.max_body} bytes"
        if self.h11.they_are_waiting_for_100_continue:
            await self._send_all(
                self.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        parts: list[bytes] = []
        size = 0
        with trio.move_on_after(REQUEST_HEADERS_TIMEOUT):
            while True:
                try:
                    event = self.h11.next_event()
                except h11.RemoteProtocolError as exc:
                    return 400, f"bad request body: {exc}"
                if event is h11.NEED_DATA:
                    self.h11.receive_data(await self.stream.receive_some(RECEIVE_SIZE))
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > self.max_body:
                        return 413, f"request body larger than {self.max_body} bytes"
                    parts.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    request.body = b"".join(parts)
                    return None
                else:  # ConnectionClosed mid-body
                    return 400, "connection closed before the request body ended"
        return 408, "request body not received in time"

    async def _send_refusal(self, status: int, reason: str) -> None:
        """Answer a request we will not read to the end, and mark the connection for closing."""
        if self.h11.our_state is not h11.SEND_RESPONSE:
            return
        body = f"{reason}\n".encode()
        response = h11.Response(
            status_code=status,
            headers=[
                (b"server", SERVER_NAME),
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        )
        try:
            with trio.move_on_after(5):
                await self.stream.send_all(
                    self.h11.send(response)
                    + (self.h11.send(h11.Data(body)) or b"")
                    + (self.h11.send(h11.EndOfMessage()) or b"")
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass

    async def _finish_request_body(self) -> bool:
        """Consume the rest of the request (for a GET: just its EndOfMessage) so the connection
        can be reused. A request body we did not want is drained up to a small bound; past that
        the connection is closed instead. False when the connection must close."""
        if self.h11.their_state is not h11.SEND_BODY:
            return True  # read already (a body read into Request.body, or none): no deadline
        drained = 0
        with trio.move_on_after(REQUEST_HEADERS_TIMEOUT):
            while self.h11.their_state is h11.SEND_BODY:
                try:
                    event = self.h11.next_event()
                except h11.RemoteProtocolError:
                    return False
                if event is h11.NEED_DATA:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    drained += len(data)
                    if drained > MAX_DRAINED_BODY:
                        return False
                    self.h11.receive_data(data)
                elif isinstance(event, h11.ConnectionClosed):
                    return False
            return True
        return False

    async def _send_protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"bad request: {exc}\n".encode()
        response = h11.Response(
            status_code=exc.error_status_hint,
            headers=[
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        )
        try:
            with trio.move_on_after(5):
                await self.stream.send_all(self.h11.send(response) + self.h11.send(h11.Data(body)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            pass

    async def _respond(self, request: Request) -> bool:
        """Run the handler and send its response. False when the connection must close."""
        response = await self.handler(request)
        headers = [(b"server", SERVER_NAME)]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        body = response.body
        if isinstance(body, bytes):
            length: int | None = len(body)
            if request.method == "HEAD" and response.content_length is not None:
                length = response.content_length
        else:
            length = response.content_length
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        head = self.h11.send(
            h11.Response(status_code=response.status, headers=headers, reason=_reason(response))
        )
        if isinstance(body, bytes) or request.method == "HEAD":
            # Small answers (errors, manifests) leave in one write.
            payload = body if isinstance(body, bytes) and request.method != "HEAD" else b""
            data = head + (self.h11.send(h11.Data(data=payload)) or b"" if payload else b"")
            await self._send_all(data + (self.h11.send(h11.EndOfMessage()) or b""))
            return True
        await self._send_all(head)
        try:
            await body.write_to(self)
        except Exception as exc:
            log.warning("aborting response to %s %s: %s", request.method, request.target, exc)
            return False
        await self._send_all(self.h11.send(h11.EndOfMessage()))
        return True

    # -- BodySink ------------------------------------------------------------------------------

    async def send_bytes(self, data: bytes) -> None:
        if data:
            await self._send_all(self.h11.send(h11.Data(data=data)))

    async def send_file(self, fd: int, offset: int, count: int) -> None:
        if count <= 0:
            return
        for part in (
            self.h11.send_with_data_passthrough(
                h11.Data(data=_FileRange(fd, offset, count))  # type: ignore[arg-type]
            )
            or []
        ):
            if isinstance(part, _FileRange):
                await self._sendfile(part)
            else:
                await self._send_all(part)

    async def _send_all(self, data: bytes | None) -> None:
        if data:
            with trio.fail_after(SEND_TIMEOUT):
                await self.stream.send_all(data)

    async def _sendfile(self, part: _FileRange) -> None:
        await sendfile_all(
            self.stream.socket, part.fd, part.offset, part.count, stall_seconds=SEND_TIMEOUT
        )


async def serve_http(
    host: str,
    port: int,
    handler: Handler,
    *,
    max_body: int = 0,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port and serve until cancelled; reports the bound listeners when ready.

    ``max_body > 0``: request bodies up to that size are read into ``Request.body`` (larger ones
    get a 413 and the connection closes); 0: bodies are drained unread."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    async def handle(stream: trio.SocketStream) -> None:
        # One failing connection must never take the listener (and every other client) down.
        try:
            await _Connection(stream, handler, max_body).serve()
        except Exception:
            log.exception("connection handler crashed")

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(listeners)


def _reason(response: Response) -> bytes:
    try:
        return HTTPStatus(response.status).phrase.encode("ascii")
    except ValueError:
        return b""


def bound_port(listeners: list[trio.SocketListener]) -> int:
    port: int = listeners[0].socket.getsockname()[1]
    return port
