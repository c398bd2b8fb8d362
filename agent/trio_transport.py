"""An httpx transport that speaks HTTP/1.1 with h11 directly on trio streams.

Why: httpx's default transport (httpcore over anyio) tops out near 450-520 MiB/s for one
streamed blob on this machine, while h11 on a bare trio stream receives the same blob at about
1 GiB/s (docs/performance.md has the side-by-side numbers). The origin download path must keep
up with a fast link, so the agent keeps httpx's client API (auth, redirects, timeouts handled by
OriginClient) and swaps only the byte-moving layer underneath.

Scope: HTTP/1.1 over TCP or TLS, keep-alive with a small per-origin idle pool, no proxies (an
agent talks to its configured origins directly; ``trust_env`` is off in OriginClient).
Errors are mapped to httpx's exception types, as httpcore's ``map_exceptions`` does, so callers
handle one family of errors.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import certifi
import h11
import httpx
import trio

RECEIVE_SIZE = 64 * 1024  # measured best for h11's buffer (larger reads are slower)
# Bodies at least this long with a Content-Length are read past h11, in large reads straight
# from the stream: h11 copies every byte through its receive buffer, and at GiB/s that copy
# and the per-64-KiB Python overhead cost more than the hash. The connection is then closed
# rather than reused (one extra handshake per large blob is noise).
RAW_BODY_THRESHOLD = 1024 * 1024
RAW_RECEIVE_SIZE = 1024 * 1024
MAX_IDLE_PER_ORIGIN = 8
# Response extension under which the transport exposes the ResponseBody itself.
BODY_EXTENSION = "p2preg.body"
MAX_HEADER_BYTES = 64 * 1024


class _Connection:
    def __init__(self, origin: tuple[str, str, int], stream: trio.abc.Stream) -> None:
        self.origin = origin
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.raw_body = False  # the body was read past h11: its state is stale, do not reuse

    def reusable(self) -> bool:
        return (
            not self.raw_body
            and self.h11.our_state is h11.DONE
            and self.h11.their_state is h11.DONE
        )

    async def next_event(self, read_timeout: float | None) -> Any:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                with trio.fail_after(read_timeout if read_timeout is not None else float("inf")):
                    data = await self.stream.receive_some(RECEIVE_SIZE)
            except trio.TooSlowError:
                raise httpx.ReadTimeout("timed out reading from the origin") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise httpx.ReadError(f"connection to the origin failed: {exc!r}") from exc
            if not data and self.h11.their_state is h11.SEND_RESPONSE:
                raise httpx.RemoteProtocolError("the origin closed the connection before answering")
            self.h11.receive_data(bytes(data))

    async def send(self, data: bytes, write_timeout: float | None) -> None:
        try:
            with trio.fail_after(write_timeout if write_timeout is not None else float("inf")):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise httpx.WriteTimeout("timed out writing to the origin") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(f"connection to the origin failed: {exc!r}") from exc

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)


class ResponseBody(httpx.AsyncByteStream):
    """A response body. ``receive()`` is the primary interface: a plain coroutine, not an async
    generator, so a reader that stops early (a cancelled download) leaves no half-run generator
    chain behind for the garbage collector to warn about (encode/httpx#3686). httpx's own
    iteration goes through ``__aiter__``, a thin loop over ``receive()``.
    """

    def __init__(
        self,
        transport: TrioTransport,
        connection: _Connection,
        read_timeout: float | None,
        raw_length: int | None,
    ) -> None:
        self._transport = transport
        self._connection = connection
        self._read_timeout = read_timeout
        self._raw_remaining = raw_length
        self._raw_started = False
        self._ended = False
        self._closed = False

    async def receive(self) -> bytes:
        """The next piece of the body; b"" once it has all arrived."""
        if self._ended:
            return b""
        if self._raw_remaining is not None:
            return await self._receive_raw()
        while True:
            event = await self._connection.next_event(self._read_timeout)
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                self._ended = True
                return b""
            if isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("the origin closed the connection mid-body")

    async def _receive_raw(self) -> bytes:
        connection = self._connection
        remaining = self._raw_remaining
        assert remaining is not None
        if not self._raw_started:
            self._raw_started = True
            connection.raw_body = True
            buffered = bytes(connection.h11.trailing_data[0][:remaining])
            if buffered:
                self._raw_remaining = remaining - len(buffered)
                return buffered
        if remaining == 0:
            self._ended = True
            return b""
        try:
            with trio.fail_after(
                self._read_timeout if self._read_timeout is not None else float("inf")
            ):
                data = await connection.stream.receive_some(min(RAW_RECEIVE_SIZE, remaining))
        except trio.TooSlowError:
            raise httpx.ReadTimeout("timed out reading from the origin") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"connection to the origin failed: {exc!r}") from exc
        if not data:
            raise httpx.RemoteProtocolError(
                f"the origin closed the connection {remaining} bytes before the body's end"
            )
        self._raw_remaining = remaining - len(data)
        return bytes(data)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.receive():
            yield chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._transport._release(self._connection)


class TrioTransport(httpx.AsyncBaseTransport):
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context or ssl.create_default_context(cafile=certifi.where())
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        port = url.port or (443 if url.scheme == "https" else 80)
        origin = (url.scheme, url.host, port)
        connection = self._idle.get(origin, []).pop() if self._idle.get(origin) else None
        if connection is None:
            connection = await self._connect(origin, timeouts.get("connect"))
        try:
            return await self._exchange(connection, request, timeouts)
        except BaseException:
            await connection.aclose()
            raise

    async def _exchange(
        self, connection: _Connection, request: httpx.Request, timeouts: dict[str, Any]
    ) -> httpx.Response:
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"connection"]
        if not any(k.lower() == b"host" for k, _ in headers):
            headers.insert(0, (b"host", request.url.netloc))
        request_body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        if request_body and not any(k.lower() == b"content-length" for k, _ in headers):
            headers.append((b"content-length", str(len(request_body)).encode()))
        target = request.url.raw_path
        data = connection.h11.send(
            h11.Request(method=request.method.encode(), target=target, headers=headers)
        )
        if request_body:
            data += connection.h11.send(h11.Data(data=request_body))
        data += connection.h11.send(h11.EndOfMessage())
        await connection.send(data, timeouts.get("write"))
        read_timeout = timeouts.get("read")
        while True:
            event = await connection.next_event(read_timeout)
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                break
            raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} from the origin")
        body = ResponseBody(self, connection, read_timeout, _raw_length(request, event))
        return httpx.Response(
            status_code=event.status_code,
            headers=list(event.headers),
            stream=body,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": event.reason,
                BODY_EXTENSION: body,
            },
        )

    async def _connect(
        self, origin: tuple[str, str, int], connect_timeout: float | None
    ) -> _Connection:
        scheme, host, port = origin
        try:
            limit = connect_timeout if connect_timeout is not None else float("inf")
            with trio.fail_after(limit):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                if scheme == "https":
                    tls = trio.SSLStream(stream, self._ssl_context, server_hostname=host)
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
                    stream = tls
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return _Connection(origin, stream)

    async def _release(self, connection: _Connection) -> None:
        """Back to the idle pool if the exchange finished cleanly, else closed."""
        idle = self._idle.setdefault(connection.origin, [])
        if connection.reusable() and len(idle) < MAX_IDLE_PER_ORIGIN:
            connection.h11.start_next_cycle()
            idle.append(connection)
        else:
            await connection.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                await connection.aclose()


def _raw_length(request: httpx.Request, response: h11.Response) -> int | None:
    """The body length when it is large and framed by Content-Length alone, else None."""
    if request.method == "HEAD" or response.status_code in (204, 304):
        return None
    length = None
    for name, value in response.headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length" and value.isdigit():
            length = int(value)
    return length if length is not None and length >= RAW_BODY_THRESHOLD else None
