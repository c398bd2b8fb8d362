"""The agent's tracker client: sessions, rendezvous choice of tracker per digest, failover.

Several trackers split the digests between them by rendezvous (highest random weight) hashing:
every client ranks the trackers for a digest by ``hash(url, digest)`` and asks the first; all
clients agree without talking to each other, and when a tracker leaves only its digests move.
On a connection error, a timeout or a 5xx the client asks the next tracker in that ranking
(and ranks the failed one last for ``down_for`` seconds). Every attempt has deadlines: ``timeout``
to connect and send, ``answer_timeout`` (longer) for the answer: a tracker that took the request
and answers slowly is busy, not down.

Trackers found by discovery (agent/discovery.py, ``set_discovered``) come after the explicit
ones: a digest goes to a discovered tracker only when every explicit tracker failed, so an
explicit ``--tracker`` is never replaced.

Each tracker gets its own session (cluster_auth's challenge-response); the client checks the
tracker's proof ``mac_t`` before it trusts a token, and authenticates again on a 401.

Errors: ``TrackerUnavailable`` when no tracker gave a usable answer (the agent falls back to
discovery and the origin), its subclass ``TrackerAuthError`` when the trackers refused our
credentials, ``TrackerConflict`` for a 409/403 on metainfo or leases.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import httpx
import msgpack  # type: ignore[import-untyped]
import trio

from p2preg.announce_pacing import ANNOUNCE_INTERVAL
from p2preg.cluster_auth import (
    NONCE_BYTES,
    PEER_ID_BYTES,
    TOKEN_BYTES,
    authorization_header,
    client_mac,
    verify_tracker_mac,
)
from p2preg.digest import Digest
from p2preg.errors import (
    ConfigError,
    RegistryError,
    RemoteProtocolError,
    TrackerAuthError,
    TrackerConflict,
    TrackerUnavailable,
)
from p2preg.handout import PeerRecord
from p2preg.metainfo import MetaInfo

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0
# How long an answer may take once the tracker took the request. Longer than the connect
# deadline on purpose: a tracker that accepted us but answers slowly is busy, not down, and
# an agent that gives up on it pulls from the origin. 10,000 agents that start a pull at once
# need about 23 s of one tracker's CPU, and it serves their calls in turn, so each call waits
# for about the whole backlog: with a 5 s deadline 94% of them would have gone to the origin
# (`python -m simulations.bench_tracker --storm`; docs/tracker.md, "A rollout's start").
DEFAULT_ANSWER_TIMEOUT = 30.0
# An announce interval or pace beyond this is taken as this (a tracker's answer is not trusted
# to silence an agent for longer).
MAX_INTERVAL = 3600.0
DOWN_FOR = 10.0
# Re-authenticate this long before the tracker would expire our token.
TOKEN_MARGIN = 30.0
# keep_sessions: the first session within this long of the agent's start, then never more
# often than every MIN_SESSION_CHECK seconds.
FIRST_SESSION_WITHIN = 5.0
MIN_SESSION_CHECK = 0.5

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AnnounceResult:
    """``peers``' ``announced_at`` is the local ``trio.current_time()`` of the answer."""

    peers: list[PeerRecord]
    interval: float
    tracker: str
    # Live peers of the blob, the requester included, as the tracker counts them (None: an
    # older tracker that does not say; ``peers`` is then the best estimate).
    swarm: int | None = None
    # How often to announce while downloading (p2preg/announce_pacing.py); None: an older
    # tracker that does not pace.
    pace: float | None = None

    @property
    def downloading_interval(self) -> float:
        """Seconds until a downloader announces again: the tracker's pace, never more often
        than ANNOUNCE_INTERVAL (an older tracker's answer: ANNOUNCE_INTERVAL)."""
        return max(ANNOUNCE_INTERVAL, self.pace or ANNOUNCE_INTERVAL)


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """``granted``: fetch pieces [start, end) (end None: to the blob's end) from the origin for
    ``expires_in`` seconds, then renew. Otherwise ``holder`` is fetching them: ask it instead."""

    granted: bool
    holder: bytes
    start: int
    end: int | None
    expires_in: float


@dataclass(frozen=True, slots=True)
class PullStart:
    """The tracker's answer when a pull starts: ``metainfo`` (None: nobody published it yet),
    ``lease`` (None when ``metainfo`` is complete: the swarm holds the blob and nobody asks
    the origin), and the answer to the announce of the starter with no pieces."""

    metainfo: MetaInfo | None
    lease: LeaseGrant | None
    announce: AnnounceResult


class _Failover(Exception):
    """This tracker failed; try the next one."""


def rendezvous_order(urls: Sequence[str], key: str) -> list[str]:
    """``urls`` ranked for ``key``, best first (highest random weight hashing)."""

    def weight(url: str) -> int:
        digest = hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    return sorted(urls, key=weight, reverse=True)


def _normalize_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ConfigError(
            f"tracker: expected an http(s) URL such as http://tracker:5081, got {url!r}"
        )
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _decode(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise _Failover(f"response is not valid msgpack: {exc}") from None


def _message(payload: Any, status: int) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return str(payload["error"])[:500]
    return f"HTTP {status}"


def _need(condition: bool, what: str) -> None:
    if not condition:
        raise _Failover(f"malformed response: {what}")


def _field(payload: Any, name: str) -> Any:
    return payload.get(name) if isinstance(payload, dict) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TrackerClient:
    """One per agent. ``async with TrackerClient(urls, peer_id, secret) as tracker: ...``"""

    def __init__(
        self,
        urls: Sequence[str],
        peer_id: bytes,
        cluster_secret: bytes,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        answer_timeout: float = DEFAULT_ANSWER_TIMEOUT,
        down_for: float = DOWN_FOR,
        transport: httpx.AsyncBaseTransport | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        discovery: bool = False,
    ) -> None:
        """``discovery``: more trackers may come from ``set_discovered``, so ``urls`` may be
        empty (until one is found, every call raises TrackerUnavailable)."""
        if not urls and not discovery:
            raise ConfigError("tracker: at least one tracker URL is needed")
        if len(peer_id) != PEER_ID_BYTES:
            raise ValueError(f"peer_id must be {PEER_ID_BYTES} bytes")
        self._explicit = list(dict.fromkeys(_normalize_url(url) for url in urls))
        self._discovered: list[str] = []
        # Every tracker in use: the explicit ones first, then the discovered ones.
        self.urls = list(self._explicit)
        self.peer_id = bytes(peer_id)
        self._secret = cluster_secret
        self.timeout = timeout  # to connect and send a request
        self.answer_timeout = answer_timeout  # for its answer, once sent
        self._down_for = down_for
        self._random_bytes = random_bytes
        self._rng = random.Random()  # when keep_sessions renews
        self._http = httpx.AsyncClient(
            trust_env=False,
            timeout=httpx.Timeout(timeout, read=answer_timeout),
            transport=transport,
            follow_redirects=False,
        )
        self._tokens: dict[str, tuple[bytes, float]] = {}  # url -> (token, valid until)
        self._auth_locks = {url: trio.Lock() for url in self.urls}
        self._down_until: dict[str, float] = {}

    def __repr__(self) -> str:  # never show the secret
        return f"<TrackerClient {self.urls} peer {self.peer_id.hex()}>"

    async def __aenter__(self) -> TrackerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._http.aclose()

    def set_discovered(self, urls: Iterable[str]) -> None:
        """Use these trackers found by discovery, instead of those found before. Explicit
        trackers stay first and are never removed. A discovered tracker is trusted only once
        its session handshake proved it knows the cluster secret, like any other."""
        discovered = []
        for url in urls:
            try:
                normalized = _normalize_url(url)
            except ConfigError as exc:
                log.warning("ignoring a discovered tracker: %s", exc)
                continue
            if normalized not in self._explicit and normalized not in discovered:
                discovered.append(normalized)
        for gone in set(self._discovered) - set(discovered):
            self._tokens.pop(gone, None)
            self._down_until.pop(gone, None)
        self._discovered = discovered
        self.urls = [*self._explicit, *discovered]

    def trackers_for(self, digest: Digest | str) -> list[str]:
        """The trackers in the order this client asks them about ``digest``."""
        key = str(digest)
        order = rendezvous_order(self._explicit, key) + rendezvous_order(self._discovered, key)
        now = trio.current_time()
        up = [url for url in order if self._down_until.get(url, 0.0) <= now]
        return up + [url for url in order if url not in up]

    # -- the API ---------------------------------------------------------------------------------

    async def announce(
        self, digest: Digest, *, addr: str, zone: str = "", complete: bool, pieces: int
    ) -> AnnounceResult:
        body = {
            "digest": str(digest),
            "peer_id": self.peer_id,
            "addr": addr,
            "zone": zone,
            "complete": complete,
            "pieces": pieces,
        }

        def parse(url: str, status: int, payload: Any) -> AnnounceResult:
            self._expect_ok(url, status, payload)
            return _parse_announce(url, payload)

        return await self._call("POST", "/v1/announce", str(digest), body, parse)

    async def start_pull(self, digest: Digest, *, addr: str, zone: str = "") -> PullStart:
        """What a pull asks when it starts, in one call (POST /v1/start): the blob's metainfo,
        the origin-fetch lease unless the swarm holds the whole blob, and an announce with no
        pieces. A tracker before /v1/start answers 404: then the three calls it replaces."""
        body = {"digest": str(digest), "peer_id": self.peer_id, "addr": addr, "zone": zone}

        def parse(url: str, status: int, payload: Any) -> PullStart | None:
            if status == 404:
                return None  # (an older tracker: no such endpoint)
            self._expect_ok(url, status, payload)
            _need(isinstance(payload, dict), "start answer is not a map")
            raw_metainfo, raw_lease = payload.get("metainfo"), payload.get("lease")
            metainfo = None if raw_metainfo is None else _parse_metainfo(raw_metainfo, digest)
            lease = None if raw_lease is None else _parse_lease(raw_lease)
            _need(
                lease is not None or (metainfo is not None and metainfo.complete),
                "no lease for a blob the swarm does not hold whole",
            )
            return PullStart(metainfo, lease, _parse_announce(url, payload.get("announce")))

        started = await self._call("POST", "/v1/start", str(digest), body, parse)
        if started is not None:
            return started
        metainfo = await self.get_metainfo(digest)
        lease = None
        if metainfo is None or not metainfo.complete:
            lease = await self.acquire_lease(digest)
        announce = await self.announce(digest, addr=addr, zone=zone, complete=False, pieces=0)
        return PullStart(metainfo, lease, announce)

    async def get_metainfo(self, digest: Digest) -> MetaInfo | None:
        def parse(url: str, status: int, payload: Any) -> MetaInfo | None:
            if status == 404:
                return None
            self._expect_ok(url, status, payload)
            return _parse_metainfo(payload, digest)

        return await self._call("GET", f"/v1/metainfo/{digest}", str(digest), None, parse)

    async def put_metainfo(self, metainfo: MetaInfo) -> MetaInfo:
        """Publish (progressive) piece hashes; returns the tracker's merged view."""

        def parse(url: str, status: int, payload: Any) -> MetaInfo:
            self._expect_ok(url, status, payload)
            return _parse_metainfo(payload, metainfo.digest)

        digest = str(metainfo.digest)
        return await self._call("PUT", f"/v1/metainfo/{digest}", digest, metainfo.to_wire(), parse)

    async def acquire_lease(
        self, digest: Digest, piece_range: tuple[int, int | None] | None = None
    ) -> LeaseGrant:
        def parse(url: str, status: int, payload: Any) -> LeaseGrant:
            self._expect_ok(url, status, payload)
            return _parse_lease(payload)

        body = self._lease_body(digest, piece_range)
        return await self._call("POST", "/v1/lease", str(digest), body, parse)

    async def release_lease(
        self, digest: Digest, piece_range: tuple[int, int | None] | None = None
    ) -> int:
        def parse(url: str, status: int, payload: Any) -> int:
            self._expect_ok(url, status, payload)
            released = _field(payload, "released")
            _need(_is_int(released), "released")
            return int(released)

        body = self._lease_body(digest, piece_range)
        return await self._call("POST", "/v1/lease/release", str(digest), body, parse)

    async def report_bad(self, digest: Digest, publisher: bytes) -> bool:
        """Tell the tracker that ``publisher`` served data of ``digest`` that failed checks."""

        def parse(url: str, status: int, payload: Any) -> bool:
            self._expect_ok(url, status, payload)
            dropped = _field(payload, "dropped")
            _need(isinstance(dropped, bool), "dropped")
            return bool(dropped)

        body = {"digest": str(digest), "publisher": publisher}
        return await self._call("POST", "/v1/report-bad", str(digest), body, parse)

    def _lease_body(
        self, digest: Digest, piece_range: tuple[int, int | None] | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"digest": str(digest), "peer_id": self.peer_id}
        if piece_range is not None:
            body["start"], body["end"] = piece_range
        return body

    @staticmethod
    def _expect_ok(url: str, status: int, payload: Any) -> None:
        if 200 <= status < 300:
            return
        message = _message(payload, status)
        if status in (403, 409):
            raise TrackerConflict(f"tracker {url}: {message}")
        # Any other 4xx: this request is wrong for every tracker; do not fail over.
        raise TrackerUnavailable(f"tracker {url} rejected the request ({status}): {message}")

    # -- plumbing --------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        key: str,
        body: object,
        parse: Callable[[str, int, Any], T],
    ) -> T:
        if not self.urls:
            raise TrackerUnavailable("no tracker known (none configured, none discovered yet)")
        failures: list[str] = []
        auth_failures = 0
        for url in self.trackers_for(key):
            try:
                status, payload = await self._call_one(url, method, path, body)
                result = parse(url, status, payload)
            except _Failover as exc:
                failures.append(f"{url}: {exc}")
                self._down_until[url] = trio.current_time() + self._down_for
                log.info("tracker %s failed (%s); trying the next one", url, exc)
                continue
            except TrackerAuthError as exc:
                failures.append(str(exc))
                auth_failures += 1
                continue
            self._down_until.pop(url, None)
            return result
        self._raise_all_failed(failures, auth_failures)

    @staticmethod
    def _raise_all_failed(failures: list[str], auth_failures: int) -> NoReturn:
        summary = "; ".join(failures)
        if auth_failures == len(failures):
            raise TrackerAuthError(summary)
        raise TrackerUnavailable(f"no tracker answered: {summary}")

    async def _call_one(self, url: str, method: str, path: str, body: object) -> tuple[int, Any]:
        token = await self._token(url)
        status, payload = await self._send(url, method, path, body, token)
        if status == 401:
            token = await self._token(url, stale=token)
            status, payload = await self._send(url, method, path, body, token)
            if status == 401:
                raise TrackerAuthError(
                    f"tracker {url} refused a fresh session token: {_message(payload, status)}"
                )
        if status >= 500:
            raise _Failover(f"HTTP {status}: {_message(payload, status)}")
        return status, payload

    async def _send(
        self, url: str, method: str, path: str, body: object, token: bytes | None
    ) -> tuple[int, Any]:
        headers = {"Accept": MSGPACK}
        if token is not None:
            headers["Authorization"] = authorization_header(token)
        content = None
        if body is not None:
            content = msgpack.packb(body, use_bin_type=True)
            headers["Content-Type"] = MSGPACK
        try:
            with trio.fail_after(self.timeout + self.answer_timeout):
                async with self._http.stream(
                    method, url + path, content=content, headers=headers
                ) as response:
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > MAX_RESPONSE_BYTES:
                            raise _Failover(f"response larger than {MAX_RESPONSE_BYTES} bytes")
                    status = response.status_code
                    content_type = response.headers.get("content-type", "")
        except trio.TooSlowError:
            raise _Failover(f"no answer within {self.timeout + self.answer_timeout:g}s") from None
        except (httpx.HTTPError, OSError) as exc:
            raise _Failover(f"{type(exc).__name__}: {exc}") from None
        if not data or not content_type.startswith(MSGPACK):
            if 200 <= status < 300:
                raise _Failover(f"expected a msgpack body, got {content_type or 'none'}")
            return status, None
        return status, _decode(bytes(data))

    async def keep_sessions(self, first_within: float = FIRST_SESSION_WITHIN) -> None:
        """Keep a session open with every tracker in use, renewed before it runs out, so that
        a pull starts without a handshake's two calls: 43% of the tracker's CPU per agent's
        start when 10,000 start at once (1.41-1.49 instead of 2.55 ms with /v1/start,
        bench_tracker --storm [--warm-sessions]; docs/tracker.md). Each renewal comes at a
        random point of the second half of the session's life, and the first within
        ``first_within`` seconds of the agent's start, so a fleet started together does not
        come back together. Runs until cancelled; a tracker that fails is tried again at the
        next round."""
        await trio.sleep(self._rng.uniform(0, first_within))
        while True:
            failed = False
            for url in list(self.urls):
                try:
                    await self._token(url)
                except (_Failover, TrackerAuthError) as exc:
                    failed = True
                    log.debug("could not renew the session with %s: %s", url, exc)
            now = trio.current_time()
            wait = min(
                (until - now for url, (_, until) in self._tokens.items() if url in self.urls),
                default=math.inf,
            ) * self._rng.uniform(0.5, 1.0)
            if failed or wait == math.inf:  # (a tracker down, or none known yet)
                wait = min(wait, self._down_for * self._rng.uniform(0.5, 1.5))
            await trio.sleep(max(MIN_SESSION_CHECK, wait))

    async def _token(self, url: str, stale: bytes | None = None) -> bytes:
        """A valid session token for ``url``; a new one if the cached one is ``stale``."""
        cached = self._tokens.get(url)
        if cached is not None and cached[0] != stale and cached[1] > trio.current_time():
            return cached[0]
        async with self._auth_locks.setdefault(url, trio.Lock()):
            # Someone else may have authenticated while we waited for the lock.
            cached = self._tokens.get(url)
            if cached is not None and cached[0] != stale and cached[1] > trio.current_time():
                return cached[0]
            self._tokens.pop(url, None)
            token, valid_for = await self._authenticate(url)
            self._tokens[url] = (token, trio.current_time() + valid_for)
            return token

    async def _authenticate(self, url: str) -> tuple[bytes, float]:
        status, payload = await self._send(
            url, "POST", "/v1/auth/challenge", {"peer_id": self.peer_id}, None
        )
        if status != 200:
            raise _Failover(f"challenge refused ({status}): {_message(payload, status)}")
        nonce_t = _field(payload, "nonce_t")
        _need(isinstance(nonce_t, bytes) and len(nonce_t) == NONCE_BYTES, "nonce_t")
        nonce_c = self._random_bytes(NONCE_BYTES)
        request = {
            "peer_id": self.peer_id,
            "nonce_t": nonce_t,
            "nonce_c": nonce_c,
            "mac_c": client_mac(self._secret, self.peer_id, nonce_t, nonce_c),
        }
        status, payload = await self._send(url, "POST", "/v1/auth/session", request, None)
        if status in (401, 403):
            raise TrackerAuthError(
                f"tracker {url} refused our cluster credentials ({_message(payload, status)}); "
                "check that agents and trackers share the same cluster secret"
            )
        if status != 200:
            raise _Failover(f"session refused ({status}): {_message(payload, status)}")
        _need(isinstance(payload, dict), "session answer is not a map")
        token, expires_in, mac_t = (payload.get(k) for k in ("token", "expires_in", "mac_t"))
        _need(isinstance(token, bytes) and len(token) == TOKEN_BYTES, "token")
        _need(isinstance(expires_in, (int, float)) and expires_in > 0, "expires_in")
        _need(isinstance(mac_t, bytes), "mac_t")
        if not verify_tracker_mac(self._secret, self.peer_id, nonce_c, nonce_t, token, mac_t):
            raise TrackerAuthError(
                f"tracker {url} could not prove it knows the cluster secret; not trusting it"
            )
        valid_for = float(expires_in)
        return token, max(valid_for - TOKEN_MARGIN, valid_for / 2)


def _parse_peer(entry: Any, now: float) -> PeerRecord:
    _need(isinstance(entry, dict), "peer entry is not a map")
    peer_id, addr, zone = entry.get("peer_id"), entry.get("addr"), entry.get("zone")
    complete, pieces = entry.get("complete"), entry.get("pieces")
    _need(isinstance(peer_id, bytes) and len(peer_id) == PEER_ID_BYTES, "peer_id")
    _need(isinstance(addr, str) and isinstance(zone, str), "addr or zone")
    _need(isinstance(complete, bool) and _is_int(pieces), "complete or pieces")
    return PeerRecord(peer_id, addr, zone, complete, pieces, now)


def _parse_metainfo(payload: Any, digest: Digest) -> MetaInfo:
    try:
        metainfo = MetaInfo.from_wire(payload)
    except (RemoteProtocolError, RegistryError) as exc:
        raise _Failover(f"bad metainfo: {exc}") from None
    _need(metainfo.digest == digest, f"metainfo for {metainfo.digest}, asked for {digest}")
    return metainfo


def _parse_announce(url: str, payload: Any) -> AnnounceResult:
    _need(isinstance(payload, dict), "announce answer is not a map")
    raw_peers, interval = payload.get("peers"), payload.get("interval")
    _need(isinstance(raw_peers, list), "peers is not a list")
    _need(isinstance(interval, (int, float)) and interval > 0, "bad interval")
    now = trio.current_time()
    peers = [_parse_peer(entry, now) for entry in raw_peers]
    swarm = payload.get("swarm")
    _need(
        swarm is None or (isinstance(swarm, int) and not isinstance(swarm, bool) and swarm >= 0),
        "bad swarm size",
    )
    pace = payload.get("pace")
    _need(
        pace is None
        or (isinstance(pace, (int, float)) and not isinstance(pace, bool) and pace > 0),
        "bad pace",
    )
    return AnnounceResult(
        peers,
        min(float(interval), MAX_INTERVAL),
        url,
        swarm,
        None if pace is None else min(float(pace), MAX_INTERVAL),
    )


def _parse_lease(payload: Any) -> LeaseGrant:
    _need(isinstance(payload, dict), "lease answer is not a map")
    granted, holder = payload.get("granted"), payload.get("holder")
    start, end, expires_in = (payload.get(k) for k in ("start", "end", "expires_in"))
    _need(isinstance(granted, bool), "granted")
    _need(isinstance(holder, bytes) and len(holder) == PEER_ID_BYTES, "holder")
    _need(_is_int(start) and (end is None or _is_int(end)), "range")
    _need(isinstance(expires_in, (int, float)) and expires_in >= 0, "expires_in")
    return LeaseGrant(granted, holder, start, end, float(expires_in))
