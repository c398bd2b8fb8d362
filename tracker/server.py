"""The tracker's HTTP API: msgpack bodies over the shared h11-on-trio server.

Endpoints (docs/tracker.md has the fields):

    GET  /healthz                      no auth
    POST /v1/auth/challenge            no auth: {peer_id} -> {nonce_t}
    POST /v1/auth/session              no auth: {peer_id, nonce_t, nonce_c, mac_c} -> {token, ...}
    POST /v1/announce                  -> {peers: [...], interval, swarm, pace}
    POST /v1/start                     {digest, peer_id, addr, zone} -> {metainfo, lease, announce}
    GET  /v1/metainfo/<digest>         -> MetaInfo wire form, or 404
    PUT  /v1/metainfo/<digest>         MetaInfo wire form -> merged MetaInfo (409 on conflict)
    POST /v1/lease                     {digest, peer_id, start?, end?} -> {granted, holder, ...}
    POST /v1/lease/release             {digest, peer_id, start?, end?} -> {released}
    POST /v1/report-bad                {digest, publisher} -> {dropped}

Every other endpoint needs ``Authorization: P2PREG <token hex>`` from a session (401 otherwise),
and a ``peer_id`` in a body must be the session's own (403 otherwise). Bad msgpack or fields get
a 400 with a message; nothing a client sends can crash the handler.
"""

from __future__ import annotations

import functools
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import msgpack  # type: ignore[import-untyped]
import trio

from p2preg.announce_pacing import RECORD_LIFETIMES, AnnounceCalendar
from p2preg.cluster_auth import (
    NONCE_BYTES,
    PEER_ID_BYTES,
    AuthError,
    SessionTable,
    parse_authorization,
)
from p2preg.config import TrackerConfig
from p2preg.digest import Digest
from p2preg.errors import RegistryError, RemoteProtocolError
from p2preg.handout import PeerRecord, choose_peers
from p2preg.http_server import Request, Response, bound_port, serve_http
from p2preg.metainfo import MetaInfo
from p2preg.units import parse_decimal
from tracker.peer_store import (
    MemoryPeerStore,
    MetainfoConflict,
    PeerStore,
    PublisherQuarantined,
    StoreLimits,
)

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
MAX_ADDR_LENGTH = 262  # a DNS name, a colon and a port
MAX_ZONE_LENGTH = 64
MAX_PIECES = 1 << 32
SWEEP_INTERVAL = 30.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def msgpack_response(
    status: int, obj: object, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(status, [("Content-Type", MSGPACK), *(headers or {}).items()], pack(obj))


def error_response(error: ApiError) -> Response:
    return msgpack_response(error.status, {"error": error.message}, error.headers)


# -- request parsing ---------------------------------------------------------------------------


def _decode(request: Request) -> dict[str, Any]:
    if not request.body:
        raise ApiError(400, "empty request body; expected a msgpack map")
    try:
        obj = msgpack.unpackb(request.body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ApiError(400, f"body is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "body must be a msgpack map")
    return obj


def _bytes_field(body: Mapping[str, Any], name: str, size: int) -> bytes:
    value = body.get(name)
    if not isinstance(value, bytes) or len(value) != size:
        raise ApiError(400, f"{name} must be {size} bytes (msgpack bin)")
    return value


def _str_field(body: Mapping[str, Any], name: str, max_length: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or len(value) > max_length:
        raise ApiError(400, f"{name} must be a string of at most {max_length} characters")
    return value


def _int_field(
    body: Mapping[str, Any], name: str, low: int, high: int, default: int | None = None
) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer {low}..{high}")
    return value


def _bool_field(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false")
    return value


def _digest(text: object) -> Digest:
    if not isinstance(text, str):
        raise ApiError(400, "digest must be a string such as sha256:<64 hex>")
    try:
        return Digest.parse(text)
    except RegistryError as exc:
        raise ApiError(400, exc.message) from None


def _peer_record(
    peer_id: bytes, body: Mapping[str, Any], request: Request, now: float
) -> PeerRecord:
    """The announcing peer's record, from a checked announce body (400 on a bad field)."""
    return PeerRecord(
        peer_id=peer_id,
        addr=_advertised_addr(_str_field(body, "addr", MAX_ADDR_LENGTH), request.peer),
        zone=_str_field(body, "zone", MAX_ZONE_LENGTH),
        complete=_bool_field(body, "complete"),
        pieces=_int_field(body, "pieces", 0, MAX_PIECES),
        announced_at=now,
    )


def _piece_range(body: Mapping[str, Any]) -> tuple[int, int | None] | None:
    if body.get("start") is None and body.get("end") is None:
        return None
    start = _int_field(body, "start", 0, MAX_PIECES, default=0)
    end = body.get("end")
    if end is None:
        return (start, None)
    end = _int_field(body, "end", start + 1, MAX_PIECES)
    return (start, end)


def _advertised_addr(addr: str, request_peer: str) -> str:
    """``host:port``; an empty or unspecified host means 'the address you see me at'."""
    host, sep, port = addr.rpartition(":")
    number = parse_decimal(port)
    if not sep or number is None or not 0 < number <= 65535:
        raise ApiError(400, f"addr must be HOST:PORT, got {addr[:100]!r}")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        seen = request_peer.rpartition(":")[0]
        if not seen or seen == "?":
            raise ApiError(400, "addr has no host and the connection's address is unknown")
        host = f"[{seen}]" if ":" in seen else seen
    return f"{host}:{port}"


def _peer_wire(record: PeerRecord) -> dict[str, Any]:
    return {
        "peer_id": record.peer_id,
        "addr": record.addr,
        "zone": record.zone,
        "complete": record.complete,
        "pieces": record.pieces,
    }


class PackedPeers:
    """The msgpack form of each peer record an announce answer lists, packed once per record.

    At 10,000 peers a record is listed in about 50 answers between two announces of its peer,
    and building and packing the 50 peer maps of an answer was 7% of an announce. A record is
    immutable and replaced by the next announce, so a packed form is reused while the record
    it was made from is still the one handed out. Bounded: past ``max_entries`` peers the
    table starts again empty (each entry is repacked on its next use)."""

    __slots__ = ("_max", "_packed")

    def __init__(self, max_entries: int = 50_000) -> None:
        self._max = max_entries
        self._packed: dict[bytes, tuple[PeerRecord, bytes]] = {}

    def answer(self, peers: Sequence[PeerRecord], rest: Mapping[str, Any]) -> bytes:
        """The packed map ``{"peers": [the records' wire maps], **rest}``."""
        packed = self._packed
        parts = [_PACKER.pack_map_header(1 + len(rest)), _PEERS_KEY]
        parts.append(_PACKER.pack_array_header(len(peers)))
        for record in peers:
            entry = packed.get(record.peer_id)
            if entry is None or entry[0] is not record:
                if len(packed) >= self._max:
                    packed.clear()
                entry = packed[record.peer_id] = (record, pack(_peer_wire(record)))
            parts.append(entry[1])
        for key, value in rest.items():
            parts += (_PACKER.pack(key), _PACKER.pack(value))
        return b"".join(parts)


_PACKER = msgpack.Packer(use_bin_type=True)
_PEERS_KEY = pack("peers")


# -- the API -----------------------------------------------------------------------------------


class TrackerAPI:
    """Routes and validates requests; the state lives in the store and the session table.

    ``clock`` and ``random_bytes`` are injectable so tests can drive time and nonces.
    """

    def __init__(
        self,
        config: TrackerConfig,
        store: PeerStore,
        *,
        clock: Callable[[], float] = trio.current_time,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.sessions = SessionTable(config.cluster_secret, session_ttl=config.session_ttl)
        self._clock = clock
        self._random_bytes = random_bytes
        self._rng = rng or random.Random(secrets.randbits(64))
        # when each downloader is to announce again (all blobs: the budget is the tracker's)
        self._calendar = AnnounceCalendar(config.announce_budget, config.announce_interval)
        self._packed_peers = PackedPeers()

    async def handle(self, request: Request) -> Response:
        try:
            return await self._dispatch(request)
        except ApiError as exc:
            target = request.target[:200]
            if exc.status >= 500:
                log.warning("%s %s -> %d %s", request.method, target, exc.status, exc)
            else:
                log.debug("%s %s -> %d %s", request.method, target, exc.status, exc)
            return error_response(exc)
        except Exception:
            log.exception("internal error on %s %s", request.method, request.target[:200])
            return error_response(ApiError(500, "internal error"))

    async def _dispatch(self, request: Request) -> Response:
        path = unquote(request.target.partition("?")[0])
        method = request.method
        if path == "/healthz":
            _allow(method, "GET", "HEAD")
            stats = await self.store.stats()
            return msgpack_response(200, {"status": "ok", **stats})
        if path == "/v1/auth/challenge":
            _allow(method, "POST")
            return self._challenge(_decode(request))
        if path == "/v1/auth/session":
            _allow(method, "POST")
            return self._session(_decode(request))
        routes: dict[str, Callable[[bytes, dict[str, Any], Request], Awaitable[Response]]] = {
            "/v1/announce": self._announce,
            "/v1/start": self._start,
            "/v1/lease": self._lease,
            "/v1/lease/release": self._release,
            "/v1/report-bad": self._report_bad,
        }
        handler = routes.get(path)
        if handler is not None:
            _allow(method, "POST")
            peer_id = self._authenticate(request)
            return await handler(peer_id, _decode(request), request)
        if path.startswith("/v1/metainfo/"):
            _allow(method, "GET", "PUT")
            peer_id = self._authenticate(request)
            digest = _digest(path[len("/v1/metainfo/") :])
            if method == "GET":
                return await self._get_metainfo(digest)
            return await self._put_metainfo(peer_id, digest, request)
        raise ApiError(404, f"no such endpoint: {path[:200]}")

    async def sweep_forever(self) -> None:
        """Expired peers, leases, challenges and sessions go, also for digests nobody asks
        about any more."""
        while True:
            await trio.sleep(min(SWEEP_INTERVAL, self.config.peer_ttl))
            now = self._clock()
            await self.store.sweep(now)
            self.sessions.sweep(now)

    # -- auth ------------------------------------------------------------------------------------

    def _authenticate(self, request: Request) -> bytes:
        token = parse_authorization(request.header("authorization"))
        peer_id = self.sessions.authenticate(token, self._clock())
        if peer_id is None:
            raise ApiError(
                401,
                "missing, unknown or expired session token; authenticate again",
                {"WWW-Authenticate": "P2PREG"},
            )
        return peer_id

    def _challenge(self, body: dict[str, Any]) -> Response:
        peer_id = _bytes_field(body, "peer_id", PEER_ID_BYTES)
        nonce_t = self.sessions.issue_challenge(
            peer_id, self._clock(), self._random_bytes(NONCE_BYTES)
        )
        return msgpack_response(
            200, {"nonce_t": nonce_t, "expires_in": self.sessions.challenge_ttl}
        )

    def _session(self, body: dict[str, Any]) -> Response:
        peer_id = _bytes_field(body, "peer_id", PEER_ID_BYTES)
        nonce_t = _bytes_field(body, "nonce_t", NONCE_BYTES)
        nonce_c = _bytes_field(body, "nonce_c", NONCE_BYTES)
        mac_c = _bytes_field(body, "mac_c", 32)
        try:
            grant = self.sessions.open_session(
                peer_id, nonce_t, nonce_c, mac_c, self._clock(), self._random_bytes(32)
            )
        except AuthError as exc:
            log.info("refused a session for peer %s: %s", peer_id.hex(), exc)
            raise ApiError(401, str(exc), {"WWW-Authenticate": "P2PREG"}) from None
        return msgpack_response(
            200, {"token": grant.token, "expires_in": grant.expires_in, "mac_t": grant.mac_t}
        )

    # -- peers -----------------------------------------------------------------------------------

    async def _announce(self, peer_id: bytes, body: dict[str, Any], request: Request) -> Response:
        _own_peer_id(body, peer_id)
        digest = _digest(body.get("digest"))
        record = _peer_record(peer_id, body, request, self._clock())
        answer = await self._record_and_hand_out(digest, record)
        return Response(200, [("Content-Type", MSGPACK)], answer)

    async def _start(self, peer_id: bytes, body: dict[str, Any], request: Request) -> Response:
        """A pull's start in one call, what the agent asked in three before: the blob's
        metainfo (None: nobody published it yet), the origin-fetch lease for the whole blob
        (None when the metainfo is complete: the swarm holds it all, and a lease would send a
        latecomer to the origin), and an announce of the starter with no pieces. Each call
        costs the tracker HTTP, a session check and a store lookup on top of its own work, and
        10,000 agents starting at once wait for the sum (docs/tracker.md, "A rollout's
        start")."""
        _own_peer_id(body, peer_id)
        digest = _digest(body.get("digest"))
        # (every field checked before anything changes: a refused start holds no lease)
        record = _peer_record(
            peer_id, {**body, "complete": False, "pieces": 0}, request, self._clock()
        )
        metainfo = await self.store.get_metainfo(digest)
        lease = None
        if metainfo is None or not metainfo.complete:
            lease = await self._acquire_lease(digest, peer_id, None)
        answer = await self._record_and_hand_out(digest, record)
        parts = (
            _PACKER.pack_map_header(3),
            *(pack("metainfo"), pack(None if metainfo is None else metainfo.to_wire())),
            *(pack("lease"), pack(lease)),
            *(pack("announce"), answer),
        )
        return Response(200, [("Content-Type", MSGPACK)], b"".join(parts))

    async def _record_and_hand_out(self, digest: Digest, record: PeerRecord) -> bytes:
        """Record the announcing peer; the packed announce answer: peers, and when to come
        back."""
        now = record.announced_at
        downloading, complete = await self.store.peer_counts()  # (before this announce)
        interval = self.config.seeder_interval(complete)
        # A seeder comes back at ``interval`` and books no announce slot.
        pace = interval if record.complete else self._calendar.pace(now, downloading)
        # A record lives for RECORD_LIFETIMES of the interval its announcer was told (a
        # downloader's pace is at most the seeders' shortest interval: peer_ttl).
        ttl = max(self.config.peer_ttl, RECORD_LIFETIMES * pace)
        await self.store.announce(digest, record, now, ttl)
        candidates = await self.store.handout_candidates(
            digest, record, self.config.max_peers, self._rng, now
        )
        load = await self.store.handout_load([c.peer_id for c in candidates], now)
        swarm = await self.store.swarm_size(digest, now)
        chosen = choose_peers(
            candidates, record, self.config.max_peers, self._rng, load, swarm_peers=swarm - 1
        )
        await self.store.record_handout([c.peer_id for c in chosen], now)
        return self._packed_peers.answer(
            chosen,
            {
                # when to announce again once complete (a seeder), and while downloading
                # (agents before "pace" announce every second then): p2preg/announce_pacing.py
                "interval": interval,
                # every live peer of the blob, the requester included (a handout lists at
                # most max_peers of them; the agents size their limits by this)
                "swarm": swarm,
                "pace": pace,
            },
        )

    # -- metainfo --------------------------------------------------------------------------------

    async def _get_metainfo(self, digest: Digest) -> Response:
        metainfo = await self.store.get_metainfo(digest)
        if metainfo is None:
            raise ApiError(404, f"no metainfo for {digest}")
        return msgpack_response(200, metainfo.to_wire())

    async def _put_metainfo(self, peer_id: bytes, digest: Digest, request: Request) -> Response:
        try:
            metainfo = MetaInfo.from_wire(_decode(request))
        except RemoteProtocolError as exc:
            raise ApiError(400, f"bad metainfo: {exc}") from None
        if metainfo.digest != digest:
            raise ApiError(400, f"metainfo is for {metainfo.digest}, not {digest}")
        try:
            merged = await self.store.put_metainfo(metainfo, peer_id, self._clock())
        except MetainfoConflict as exc:
            raise ApiError(409, str(exc)) from None
        except PublisherQuarantined as exc:
            raise ApiError(403, str(exc)) from None
        return msgpack_response(200, merged.to_wire())

    # -- leases ----------------------------------------------------------------------------------

    async def _lease(self, peer_id: bytes, body: dict[str, Any], request: Request) -> Response:
        _own_peer_id(body, peer_id)
        digest = _digest(body.get("digest"))
        return msgpack_response(200, await self._acquire_lease(digest, peer_id, _piece_range(body)))

    async def _acquire_lease(
        self, digest: Digest, peer_id: bytes, piece_range: tuple[int, int | None] | None
    ) -> dict[str, Any]:
        now = self._clock()
        try:
            result = await self.store.acquire_lease(digest, peer_id, piece_range, now)
        except PublisherQuarantined as exc:
            raise ApiError(403, str(exc)) from None
        lease = result.lease
        return {
            "granted": result.granted,
            "holder": lease.holder,
            "start": lease.start,
            "end": lease.end,
            "expires_in": max(0.0, lease.expires_at - now),
        }

    async def _release(self, peer_id: bytes, body: dict[str, Any], request: Request) -> Response:
        _own_peer_id(body, peer_id)
        digest = _digest(body.get("digest"))
        released = await self.store.release_lease(
            digest, peer_id, _piece_range(body), self._clock()
        )
        return msgpack_response(200, {"released": released})

    async def _report_bad(self, peer_id: bytes, body: dict[str, Any], request: Request) -> Response:
        digest = _digest(body.get("digest"))
        publisher = _bytes_field(body, "publisher", PEER_ID_BYTES)
        dropped = await self.store.report_bad(digest, peer_id, publisher, self._clock())
        return msgpack_response(200, {"dropped": dropped})


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise ApiError(405, f"method {method} not allowed here", {"Allow": ", ".join(allowed)})


def _own_peer_id(body: Mapping[str, Any], session_peer: bytes) -> None:
    if _bytes_field(body, "peer_id", PEER_ID_BYTES) != session_peer:
        raise ApiError(403, "peer_id is not the peer this session belongs to")


# -- running it --------------------------------------------------------------------------------


@dataclass(slots=True)
class RunningTracker:
    """What a caller (the CLI, a test) sees of a started tracker."""

    url: str
    port: int
    store: PeerStore
    config: TrackerConfig


def store_limits(config: TrackerConfig) -> StoreLimits:
    return StoreLimits(
        peer_ttl=config.peer_ttl,
        lease_ttl=config.lease_ttl,
        max_origin_fetchers=config.max_origin_fetchers,
        max_peers_per_digest=config.max_peers_per_digest,
        max_digests=config.max_digests,
        load_half_life=config.load_half_life,
        bad_publisher_quarantine=config.bad_publisher_quarantine,
    )


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def run_tracker(
    config: TrackerConfig,
    store: PeerStore | None = None,
    *,
    task_status: trio.TaskStatus[RunningTracker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the tracker API until cancelled; reports a RunningTracker once listening."""
    store = store or MemoryPeerStore(store_limits(config))
    api = TrackerAPI(config, store)
    async with trio.open_nursery() as nursery:
        serve = functools.partial(serve_http, max_body=config.max_body)
        listeners = await nursery.start(serve, config.host, config.port, api.handle)
        port = bound_port(listeners)
        url = f"http://{_url_host(config.host)}:{port}"
        log.info("tracker listening on %s:%d", config.host, port)
        nursery.start_soon(api.sweep_forever)
        task_status.started(RunningTracker(url, port, store, config))
