"""A fault-injecting HTTP/1.1 reverse proxy that sits between the agent under test and the origin.

The real origin (docker-registry) behaves well; the registries in the field do not always. This
proxy lets a test make the origin answer 429/503, corrupt a byte, cut a connection, stall, or
redirect blob downloads to a "CDN" on another host name, exactly when and as often as the test
says, and it records every request so a test can assert what the origin had to serve (the point
of the agent is that a rollout costs the origin about one copy of each blob).

Two listeners, both bound to 127.0.0.1:

- the proxy (``FaultProxy.url``, addressed as ``127.0.0.1``) forwards to the upstream;
- the CDN (``FaultProxy.cdn_url``, addressed as ``localhost``, so to an HTTP client it is a
  *different host*) serves ``/cdn/<path>`` by fetching ``<path>`` from the upstream without any
  Authorization header, the way a pre-signed storage URL works. A client that leaks its registry
  token across the redirect shows up in the CDN's request records.

Server side is h11 on trio streams, client side a streaming ``httpx.AsyncClient``; every wait
inside the proxy has a deadline and each connection is one task of a nursery that the caller's
cancellation ends. Request bodies are buffered (up to 64 MiB): this proxy is for pulls.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import h11
import httpx
import trio

__all__ = ["Fault", "FaultKind", "FaultProxy", "Listener", "RequestRecord", "run_fault_proxy"]

FaultKind = Literal["status", "corrupt", "drop", "redirect", "stall"]
Listener = Literal["proxy", "cdn"]

_FAULT_KINDS: frozenset[str] = frozenset({"status", "corrupt", "drop", "redirect", "stall"})

# Headers that describe one hop, not the message (RFC 9110 7.6.1), plus Expect, which h11 answers
# itself; none of them may be copied to the other side.
_HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
    }
)

_RECEIVE_SIZE = 64 * 1024
_MAX_HEADER_BYTES = 64 * 1024
_MAX_REQUEST_BODY = 64 * 1024 * 1024
_MAX_REQUESTS_PER_CONNECTION = 10_000
_REQUEST_TIMEOUT = 60.0  # an idle keep-alive connection, or a whole request, must arrive by then
_SEND_TIMEOUT = 30.0  # one send_all to a client that stopped reading
_CLOSE_TIMEOUT = 5.0
_UPSTREAM_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
_UPSTREAM_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)
_MAX_ABANDON_STEPS = 1_000  # chunks h11 may still hold in its buffer after the socket closed


@dataclass
class Fault:
    """One kind of misbehaviour, for requests whose path matches ``path_pattern`` (re.search).

    ``times`` matching requests get it (-1: all of them); the first armed fault that matches a
    request wins. ``after_bytes`` is a body offset: ``corrupt`` flips (XOR 0xFF) the byte there,
    ``drop`` closes the TCP connection after sending that many body bytes, ``stall`` pauses
    ``stall_seconds`` there. ``status`` answers ``status`` with an OCI error body and ``headers``
    without asking the upstream; ``redirect`` answers 307 to the CDN listener. ``listener``
    chooses which listener the fault watches ("cdn" paths start with ``/cdn/``).
    """

    kind: FaultKind
    path_pattern: str
    method: str | None = None
    times: int = 1
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    after_bytes: int = 0
    stall_seconds: float = 0.0
    listener: Listener = "proxy"

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        re.compile(self.path_pattern)  # fail here, not on the first request
        if self.times == 0 or self.times < -1:
            raise ValueError(f"times must be >= 1 or -1 (forever), not {self.times}")
        if not 200 <= self.status <= 599:
            raise ValueError(f"status must be a final HTTP status, not {self.status}")
        if self.after_bytes < 0 or self.stall_seconds < 0:
            raise ValueError("after_bytes and stall_seconds must be >= 0")
        if self.kind == "redirect" and self.listener != "proxy":
            raise ValueError("a redirect fault only makes sense on the proxy listener")

    def matches(self, listener: Listener, method: str, path: str) -> bool:
        return (
            self.listener == listener
            and (self.method is None or self.method.upper() == method)
            and re.search(self.path_pattern, path) is not None
        )


@dataclass
class RequestRecord:
    """What one request asked and what the proxy sent back; updated while the response streams.

    ``headers`` are the request headers as received, names lower-cased, repeated names joined
    with ", ". ``status`` is None until the response head is sent; ``complete`` turns True when
    the whole response went out (False after a drop, an upstream failure or a client hang-up).
    ``done`` is set when the proxy has finished with the request, however it ended.
    """

    listener: Listener
    connection: int
    method: str
    path: str
    query: str
    headers: dict[str, str]
    fault: FaultKind | None = None
    status: int | None = None
    body_bytes_sent: int = 0
    complete: bool = False
    done: trio.Event = field(default_factory=trio.Event, repr=False, compare=False)


@dataclass
class _ArmedFault:
    fault: Fault
    remaining: int


class FaultProxy:
    """Handle a test holds on a running proxy: arm faults, read request records.

    Created by ``run_fault_proxy``; all state belongs to this instance, which the proxy's tasks
    and the test share within one trio run (no locking needed).
    """

    def __init__(self, url: str, cdn_url: str, upstream_url: str) -> None:
        self.url = url
        self.cdn_url = cdn_url
        self.upstream_url = upstream_url
        self.requests: list[RequestRecord] = []
        self._faults: list[_ArmedFault] = []
        self._connections_accepted = 0
        self._arrival = trio.Event()  # set (and replaced) whenever a request is recorded

    def add_fault(self, fault: Fault) -> None:
        self._faults.append(_ArmedFault(fault, fault.times))

    def clear_faults(self) -> None:
        self._faults.clear()

    def armed_faults(self) -> list[Fault]:
        """Faults that still have uses left, in matching order."""
        return [armed.fault for armed in self._faults if armed.remaining != 0]

    def records(
        self,
        path_pattern: str = "",
        method: str | None = None,
        *,
        listener: Listener | None = None,
    ) -> list[RequestRecord]:
        """Requests whose path matches ``path_pattern`` (re.search), in arrival order."""
        regex = re.compile(path_pattern)
        return [
            r
            for r in self.requests
            if regex.search(r.path)
            and (method is None or r.method == method.upper())
            and (listener is None or r.listener == listener)
        ]

    def body_bytes(
        self,
        path_pattern: str = "",
        method: str | None = "GET",
        *,
        listener: Listener | None = None,
    ) -> int:
        """Response body bytes sent for matching requests, both listeners unless ``listener``."""
        return sum(r.body_bytes_sent for r in self.records(path_pattern, method, listener=listener))

    def count(
        self, path_pattern: str, method: str | None = None, *, listener: Listener | None = None
    ) -> int:
        return len(self.records(path_pattern, method, listener=listener))

    async def wait_for(
        self,
        path_pattern: str = "",
        method: str | None = None,
        *,
        count: int = 1,
        listener: Listener | None = None,
    ) -> list[RequestRecord]:
        """Wait until ``count`` matching requests have arrived; return the matching records.

        Arrived, not answered: await a record's ``done`` for that. Like every trio wait it has
        no deadline of its own; put it under ``trio.fail_after``.
        """
        while len(found := self.records(path_pattern, method, listener=listener)) < count:
            await self._arrival.wait()
        return found

    def _record(self, record: RequestRecord) -> None:
        self.requests.append(record)
        self._arrival.set()
        self._arrival = trio.Event()

    def _take_fault(self, listener: Listener, method: str, path: str) -> Fault | None:
        for armed in self._faults:
            if armed.remaining != 0 and armed.fault.matches(listener, method, path):
                if armed.remaining > 0:
                    armed.remaining -= 1
                return armed.fault
        return None

    def _next_connection_id(self) -> int:
        self._connections_accepted += 1
        return self._connections_accepted


async def run_fault_proxy(
    upstream_url: str, *, task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the proxy and CDN listeners until cancelled; ``task_status.started(FaultProxy)``.

    ``upstream_url`` must be a loopback address: tests never send traffic anywhere else.
    """
    upstream = upstream_url.rstrip("/")
    _require_loopback(upstream)
    listeners: list[trio.SocketListener] = []
    client = httpx.AsyncClient(
        trust_env=False,  # no HTTP(S)_PROXY from the environment: loopback only
        follow_redirects=False,
        timeout=_UPSTREAM_TIMEOUT,
        limits=_UPSTREAM_LIMITS,
    )
    try:
        listeners.extend(await trio.open_tcp_listeners(0, host="127.0.0.1"))
        listeners.extend(await trio.open_tcp_listeners(0, host="127.0.0.1"))
        proxy_listener, cdn_listener = listeners
        proxy = FaultProxy(
            url=f"http://127.0.0.1:{_port_of(proxy_listener)}",
            cdn_url=f"http://localhost:{_port_of(cdn_listener)}",
            upstream_url=upstream,
        )
        async with trio.open_nursery() as nursery:
            serve_proxy = partial(_serve_connection, proxy, client, "proxy")
            serve_cdn = partial(_serve_connection, proxy, client, "cdn")
            nursery.start_soon(trio.serve_listeners, serve_proxy, [proxy_listener])
            nursery.start_soon(trio.serve_listeners, serve_cdn, [cdn_listener])
            task_status.started(proxy)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            for listener in listeners:
                await listener.aclose()
            await client.aclose()


# --- connection handling -----------------------------------------------------------------------


class _RequestTooLargeError(Exception):
    pass


# A client hanging up, a client too slow to read, an upstream that fails mid-body, or a response
# h11 refuses to frame (upstream sent fewer bytes than it declared): each ends just this connection.
_CONNECTION_ENDERS = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    h11.LocalProtocolError,
    httpx.HTTPError,
)


async def _serve_connection(
    proxy: FaultProxy, client: httpx.AsyncClient, listener: Listener, stream: trio.SocketStream
) -> None:
    connection_id = proxy._next_connection_id()
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
    async with stream:
        try:
            for _ in range(_MAX_REQUESTS_PER_CONNECTION):
                received = await _receive_request(conn, stream)
                if received is None:
                    return
                request, body = received
                keep_open = await _respond(
                    proxy, client, listener, connection_id, conn, stream, request, body
                )
                if not keep_open or conn.our_state is not h11.DONE:
                    return
                if conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await _try_send_error(conn, stream, exc.error_status_hint)
        except _RequestTooLargeError:
            await _try_send_error(conn, stream, 413)
        except _CONNECTION_ENDERS:
            return


async def _receive_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes] | None:
    """Read one whole request (head and body); None if the client went away or idled out."""
    request: h11.Request | None = None
    body = bytearray()
    with trio.move_on_after(_REQUEST_TIMEOUT):
        while True:  # bounded by the deadline above and by the body and header size caps
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await _send(
                        conn, stream, h11.InformationalResponse(status_code=100, headers=[])
                    )
                conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_REQUEST_BODY:
                    raise _RequestTooLargeError
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            else:  # ConnectionClosed, or PAUSED (cannot happen: we read only between cycles)
                return None
    return None


async def _respond(
    proxy: FaultProxy,
    client: httpx.AsyncClient,
    listener: Listener,
    connection_id: int,
    conn: h11.Connection,
    stream: trio.SocketStream,
    request: h11.Request,
    body: bytes,
) -> bool:
    """Answer one request; return False if the connection must be closed afterwards."""
    method = request.method.decode("ascii")
    target = request.target.decode("ascii")
    path, _, query = target.partition("?")
    record = RequestRecord(
        listener=listener,
        connection=connection_id,
        method=method,
        path=path,
        query=query,
        headers=_header_dict(request.headers),
    )
    proxy._record(record)
    fault = proxy._take_fault(listener, method, path)
    record.fault = fault.kind if fault is not None else None
    try:
        return await _answer(proxy, client, conn, stream, record, request, body, fault)
    finally:
        record.done.set()


async def _answer(
    proxy: FaultProxy,
    client: httpx.AsyncClient,
    conn: h11.Connection,
    stream: trio.SocketStream,
    record: RequestRecord,
    request: h11.Request,
    body: bytes,
    fault: Fault | None,
) -> bool:
    """Send the injected response, or the upstream's (possibly damaged) one."""
    target = request.target.decode("ascii")
    path, query = record.path, record.query
    if record.listener == "cdn":
        if not path.startswith("/cdn/"):
            return await _send_simple(conn, stream, record, 404, _oci_error(404, "not a CDN path"))
        upstream_target = target.removeprefix("/cdn")
    else:
        upstream_target = target

    if fault is not None and fault.kind == "status":
        return await _send_simple(
            conn,
            stream,
            record,
            fault.status,
            _oci_error(fault.status, "injected"),
            list(fault.headers.items()),
        )
    if fault is not None and fault.kind == "redirect":
        location = f"{proxy.cdn_url}/cdn{path}" + (f"?{query}" if query else "")
        return await _send_simple(conn, stream, record, 307, b"", [("Location", location)])

    return await _forward(
        proxy, client, conn, stream, record, request, body, upstream_target, fault
    )


async def _forward(
    proxy: FaultProxy,
    client: httpx.AsyncClient,
    conn: h11.Connection,
    stream: trio.SocketStream,
    record: RequestRecord,
    request: h11.Request,
    body: bytes,
    upstream_target: str,
    fault: Fault | None,
) -> bool:
    """Relay the request upstream and stream the answer back, applying a body fault if any."""
    drop = {b"host"} | _connection_tokens(request.headers)
    if record.listener == "cdn":
        drop.add(b"authorization")  # a pre-signed URL carries its own authority
    headers = [(n, v) for n, v in request.headers if n not in _HOP_BY_HOP and n not in drop]
    # httpx.Request adds only Host (and Content-Length for a body): no client default headers,
    # so the upstream sees what the client sent.
    upstream_request = httpx.Request(
        record.method, proxy.upstream_url + upstream_target, headers=headers, content=body or None
    )
    try:
        response = await client.send(upstream_request, stream=True)
    except httpx.HTTPError as exc:
        message = f"upstream {proxy.upstream_url} failed: {type(exc).__name__}: {exc}"
        return await _send_simple(conn, stream, record, 502, _oci_error(502, message))
    try:
        out_headers = [(n, v) for n, v in response.headers.raw if n.lower() not in _HOP_BY_HOP]
        await _send(
            conn,
            stream,
            h11.Response(
                status_code=response.status_code,
                headers=out_headers,
                reason=response.reason_phrase.encode("latin-1"),
            ),
        )
        record.status = response.status_code
        if record.method != "HEAD":
            keep_open = await _relay_body(conn, stream, record, response, fault)
            if not keep_open:
                return False
        await _send(conn, stream, h11.EndOfMessage())
        record.complete = True
        return True
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            await response.aclose()


async def _relay_body(
    conn: h11.Connection,
    stream: trio.SocketStream,
    record: RequestRecord,
    response: httpx.Response,
    fault: Fault | None,
) -> bool:
    """Copy the upstream body to the client; False means "close the connection now" (drop)."""
    kind = fault.kind if fault is not None else None
    at = fault.after_bytes if fault is not None else 0
    stalled = False
    offset = 0
    async with _upstream_chunks(response) as chunks:
        async for raw_chunk in chunks:  # bounded by the upstream body
            chunk = raw_chunk
            end = offset + len(chunk)
            if kind == "corrupt" and offset <= at < end:
                flipped = bytearray(chunk)
                flipped[at - offset] ^= 0xFF
                chunk = bytes(flipped)
            elif kind == "drop" and at <= end:
                await _send_body(conn, stream, record, chunk[: at - offset])
                return False
            elif kind == "stall" and not stalled and at <= end:
                await _send_body(conn, stream, record, chunk[: at - offset])
                assert fault is not None
                await trio.sleep(fault.stall_seconds)
                stalled = True
                chunk = chunk[at - offset :]
            await _send_body(conn, stream, record, chunk)
            offset = end
    # A drop past the end of the body still closes the connection, without ending the message.
    return kind != "drop"


@asynccontextmanager
async def _upstream_chunks(response: httpx.Response) -> AsyncIterator[AsyncIterator[bytes]]:
    """``response.aiter_raw()``, cleaned up without a ResourceWarning even if abandoned midway.

    httpx's body iterator is a chain of nested async generators (httpx, then httpcore). Leaving
    it early (a drop, a client hang-up, a cancellation) and closing only the outer one lets the
    inner ones be garbage collected unexhausted, which trio reports as a ResourceWarning (an
    error under ``filterwarnings = error``; encode/httpx#3686). Closing the response first shuts
    the upstream socket; the next step then fails at the bottom of the chain and that error
    finishes every generator in it.
    """
    chunks = response.aiter_raw()
    try:
        yield chunks
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
            await response.aclose()
            for _ in range(_MAX_ABANDON_STEPS):
                try:
                    await chunks.__anext__()
                except (StopAsyncIteration, Exception):
                    break
            if isinstance(chunks, AsyncGenerator):
                await chunks.aclose()


async def _send_simple(
    conn: h11.Connection,
    stream: trio.SocketStream,
    record: RequestRecord,
    status: int,
    body: bytes,
    extra_headers: list[tuple[str, str]] | None = None,
) -> bool:
    """Send a whole locally made response (injected status, redirect, error)."""
    headers = [("Content-Length", str(len(body)))]
    if body:
        headers.append(("Content-Type", "application/json"))
    headers += extra_headers or []
    await _send(conn, stream, h11.Response(status_code=status, headers=headers))
    record.status = status
    if record.method != "HEAD":
        await _send_body(conn, stream, record, body)
    await _send(conn, stream, h11.EndOfMessage())
    record.complete = True
    return True


async def _send_body(
    conn: h11.Connection, stream: trio.SocketStream, record: RequestRecord, data: bytes
) -> None:
    if data:
        await _send(conn, stream, h11.Data(data=data))
        record.body_bytes_sent += len(data)


async def _send(conn: h11.Connection, stream: trio.SocketStream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        with trio.fail_after(_SEND_TIMEOUT):
            await stream.send_all(data)


async def _try_send_error(conn: h11.Connection, stream: trio.SocketStream, status: int) -> None:
    """Best effort: tell a client that sent garbage why we hang up, if HTTP still allows it."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = _oci_error(status, "bad request")
    try:
        response = h11.Response(
            status_code=status,
            headers=[
                ("Content-Length", str(len(body))),
                ("Content-Type", "application/json"),
                ("Connection", "close"),
            ],
        )
        await _send(conn, stream, response)
        await _send(conn, stream, h11.Data(data=body))
        await _send(conn, stream, h11.EndOfMessage())
    except _CONNECTION_ENDERS:
        pass


# --- small helpers -----------------------------------------------------------------------------


def _oci_error(status: int, message: str) -> bytes:
    code = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def _header_dict(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    result: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        result[name] = f"{result[name]}, {value}" if name in result else value
    return result


def _connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names a Connection header declares hop-by-hop."""
    return {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
        if token.strip()
    }


def _port_of(listener: trio.SocketListener) -> int:
    port: int = listener.socket.getsockname()[1]
    return port


def _require_loopback(url: str) -> None:
    host = httpx.URL(url).host
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"upstream {url!r} is not a loopback address; tests stay on 127.0.0.1")
