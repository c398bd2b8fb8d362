"""Serves pieces to other agents: of blobs in the store and of blobs still downloading.

Each accepted connection must pass the cluster-secret handshake (agent/peer_link.py) before it
can ask for anything. Then, per connection, one task reads requests and answers them in order
(pieces leave with sendfile, paced by --upload-limit), and one task sends HAVE messages for
pieces this agent gains while the peer is interested: a blob that is half downloaded is already
served, piece by piece.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Container
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from agent.content_store import ContentStore
from agent.peer_link import PeerGone, PeerLink
from p2preg.bitfield import Bitfield
from p2preg.digest import Digest
from p2preg.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from p2preg.metainfo import MetaInfo, piece_count, piece_hash, piece_length_for
from p2preg.swarm_limits import SUPER_SEED_HOLD, super_seed_after_fetch, upload_slots
from p2preg.token_bucket import RateLimiter
from p2preg.upload_order import upload_rank
from p2preg.wire import (
    BitfieldMsg,
    Busy,
    Cancel,
    ConnectionClosed,
    Error,
    Event,
    GetMeta,
    Have,
    Holdings,
    Interest,
    Meta,
    Progress,
    Query,
    Reject,
    Request,
)

log = logging.getLogger(__name__)
IDLE_TIMEOUT = 300.0
MAX_QUEUED_REQUESTS = 64
MAX_CONNECTIONS = 512
MAX_FETCHED_REMEMBERED = 1024  # blobs it fetched from the origin, and swarm counts
_V = TypeVar("_V")


def _remember(memory: dict[Digest, _V], digest: Digest, value: _V) -> None:
    """Put ``digest`` last in ``memory`` (insertion order = age), dropping the oldest entry
    beyond MAX_FETCHED_REMEMBERED."""
    memory.pop(digest, None)
    memory[digest] = value
    if len(memory) > MAX_FETCHED_REMEMBERED:
        del memory[next(iter(memory))]


class UploadSlots:
    """At most ``slots`` pieces leave this agent at once; the rest wait, first copies first.

    Store and forward: a piece is useful to its receiver (who passes it on) only once it is
    whole. Sending k pieces at once at 1/k of the uplink each delays every one of them k-fold;
    sending a few at a time at full rate lets the first receivers forward sooner. The next slot
    goes to the waiting request of lowest p2preg.upload_order rank (a requester that is not
    busy receiving from others; then the piece this agent has sent least often; then the
    requester holding fewest pieces), then to the one that waited longest.
    """

    def __init__(self, slots: int) -> None:
        self._limit = slots
        self._free = slots  # below zero after a resize down, until enough sends end
        self._waiting: list[_Waiter] = []
        self._seq = 0
        self.sent: collections.Counter[tuple[Digest, int]] = collections.Counter()

    @contextlib.asynccontextmanager
    async def slot(
        self,
        key: tuple[Digest, int],
        requester_held: Callable[[], int] = lambda: 0,
        requester_busy: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[None]:
        """Hold one of the slots while sending piece ``key`` to a peer; ``requester_held()``
        is how many pieces of that blob it holds (its latest progress message) and
        ``requester_busy()`` whether it said it is busy (its latest busy message)."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            self._seq += 1
            entry = _Waiter(self._seq, key, requester_held, requester_busy, trio.Event())
            self._waiting.append(entry)
            try:
                await entry.granted.wait()
            except BaseException:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                else:  # granted just as we were cancelled: pass the slot on
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    @property
    def limit(self) -> int:
        return self._limit

    def resize(self, slots: int) -> None:
        """Send at most ``slots`` at once from now on (sends under way are not interrupted)."""
        self._free += slots - self._limit
        self._limit = slots
        while self._free > 0 and self._waiting:
            self._free -= 1
            self._grant()

    def _release(self) -> None:
        if self._free < 0 or not self._waiting:
            self._free += 1
            return
        self._grant()

    def _grant(self) -> None:
        def rank(entry: _Waiter) -> tuple[int, int, int, int]:
            return (*upload_rank(self.sent[entry.key], entry.held(), entry.busy()), entry.seq)

        best = min(self._waiting, key=rank)
        self._waiting.remove(best)
        best.granted.set()  # the slot passes straight to it


@dataclass(slots=True, eq=False)
class _Waiter:
    """A request waiting for an upload slot."""

    seq: int  # arrival number
    key: tuple[Digest, int]  # (blob, piece)
    held: Callable[[], int]  # pieces of the blob the requester holds, as it told us
    busy: Callable[[], bool]  # whether the requester said it is busy
    granted: trio.Event


@dataclass(slots=True)
class PieceSource:
    """What this agent can serve of one blob right now."""

    metainfo: MetaInfo | None
    pieces: Bitfield
    fetching_from_origin: bool  # this agent brings the blob into the swarm (super-seeding)
    # Opens a descriptor to read piece bytes from; the caller closes it. None: gone meanwhile.
    open_fd: Callable[[], int | None]


SourceLookup = Callable[[Digest], PieceSource | None]
# A peer id -> the pieces of one blob that peer told us it holds (None: we do not know).
HoldingsLookup = Callable[[bytes], Container[int] | None]


@dataclass(slots=True, eq=False)  # identity semantics: kept in sets
class _Subscriber:
    link: PeerLink
    pending: dict[Digest, list[int]] = field(default_factory=dict)
    wakeup: trio.Event = field(default_factory=trio.Event)
    # Requests waiting to be served, in order; a Cancel removes its request from here, so a
    # piece the peer got elsewhere meanwhile is never sent (endgame duplicates cost nothing).
    requests: collections.deque[Request] = field(default_factory=collections.deque)
    request_ready: trio.Event = field(default_factory=trio.Event)
    held: dict[Digest, int] = field(default_factory=dict)  # its last progress per blob
    busy: bool = False  # its last busy message (wire version 3)

    def held_of(self, digest: Digest) -> Callable[[], int]:
        """How many pieces of ``digest`` it holds, as it last told us (0: not told)."""
        return lambda: self.held.get(digest, 0)

    def is_busy(self) -> bool:
        return self.busy


class PeerServer:
    def __init__(
        self,
        peer_id: bytes,
        secret: bytes,
        store: ContentStore,
        upload: RateLimiter,
        download: RateLimiter,
    ) -> None:
        self._peer_id = peer_id
        self._secret = secret
        self._store = store
        self._upload = upload
        self._download = download
        self._active_sources: SourceLookup = lambda digest: None
        self._subscribers: dict[Digest, set[_Subscriber]] = {}
        # (digest, piece) -> the link we last sent it on (bounded: pruned when large).
        self._recent_serves: dict[tuple[Digest, int], PeerLink] = {}
        # Blobs this agent fetched from the origin (bounded, oldest dropped): it keeps
        # super-seeding them after the fetch, while their first receivers are connected.
        self._fetched_from_origin: dict[Digest, None] = {}
        self._swarm_counts: dict[Digest, int] = {}  # the tracker's last count per blob (bounded)
        self._holdings: dict[Digest, HoldingsLookup] = {}  # blobs downloading (watch_holdings)
        self._live_links: set[PeerLink] = set()
        # Per connected peer: (digest, piece) -> when super-seeding first refused it that piece.
        self._first_refusals: dict[PeerLink, dict[tuple[Digest, int], float]] = {}
        self._connections = 0
        self._slots = UploadSlots(upload_slots(None))
        self.pieces_served = 0
        self.bytes_served = 0
        self.refusals = 0  # super-seeding refusals
        self.progress_reports = 0  # progress messages recorded (they order the upload slots)
        self.haves_skipped = 0  # HAVEs not sent: the peer holds the piece (piece_available)

    def note_swarm_size(self, peers: int, digest: Digest | None = None) -> None:
        """The tracker just counted ``peers`` other peers of ``digest``: size the upload slots
        for a swarm that large (p2preg.swarm_limits; the latest announce decides), and remember
        the count for super-seeding that blob."""
        if digest is not None:
            _remember(self._swarm_counts, digest, peers)
        slots = upload_slots(peers)
        if slots != self._slots.limit:
            log.info("upload slots: %d (a swarm of %d other peers)", slots, peers)
            self._slots.resize(slots)

    def set_active_sources(self, lookup: SourceLookup) -> None:
        """Where to find blobs that are still downloading (BlobDownloads)."""
        self._active_sources = lookup

    # -- what we can serve ---------------------------------------------------------------------

    def source_for(self, digest: Digest) -> PieceSource | None:
        active = self._active_sources(digest)
        if active is not None:
            return active
        size = self._store.size_of(digest)
        if size is None:
            return None
        metainfo = self._store.read_metainfo(digest)
        count = metainfo.num_pieces if metainfo else piece_count(size, piece_length_for(size))
        return PieceSource(metainfo, Bitfield.full(count), False, lambda: self._open_stored(digest))

    def _open_stored(self, digest: Digest) -> int | None:
        """A descriptor of the committed blob ``digest`` (the caller closes it); None: gone."""
        blob = self._store.acquire(digest)
        if blob is None:
            return None
        try:
            return os.dup(blob.fd)
        finally:
            blob.release()

    def watch_holdings(self, digest: Digest, lookup: HoldingsLookup) -> None:
        """While ``digest`` downloads here: what each peer we download it from holds, by peer
        id (the HAVEs it sent us; None: not one of them). A HAVE for a piece the peer holds
        already is not sent (see piece_available)."""
        self._holdings[digest] = lookup

    def unwatch_holdings(self, digest: Digest, lookup: HoldingsLookup) -> None:
        if self._holdings.get(digest) == lookup:  # (bound methods: equal, not identical)
            del self._holdings[digest]

    def piece_available(self, digest: Digest, index: int) -> None:
        """A new piece of ``digest`` is servable: tell every interested peer that lacks it.

        A peer we also download from told us what it holds; it has no use for a HAVE of a
        piece among those (it never asks for a piece it holds, and it knows the hash). HAVEs
        are most of the messages an agent sends and receives (one per piece per peer, both
        ways), and where pieces spread in a few hops many reach peers that hold the piece
        already (the agent logs how many it left out)."""
        holdings = self._holdings.get(digest)
        for subscriber in self._subscribers.get(digest, ()):
            if holdings is not None:
                held = holdings(subscriber.link.peer_id)
                if held is not None and index in held:
                    self.haves_skipped += 1
                    continue
            subscriber.pending.setdefault(digest, []).append(index)
            subscriber.wakeup.set()

    # -- serving -------------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._connections >= MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        self._connections += 1
        try:
            link = await PeerLink.accept(
                stream, self._peer_id, self._secret, self._upload, self._download
            )
        except (RemoteProtocolError, PeerGone, trio.TooSlowError) as exc:
            log.warning("refused peer connection: %s", exc)
            self._connections -= 1
            return
        subscriber = _Subscriber(link)
        self._live_links.add(link)
        if len(self._recent_serves) > 100_000:
            self._recent_serves.clear()
        if len(self._slots.sent) > 100_000:
            self._slots.sent.clear()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_haves, subscriber)
                nursery.start_soon(self._send_pieces, subscriber)
                await self._serve_link(subscriber)
                nursery.cancel_scope.cancel()
        except* (RemoteProtocolError, LocalProtocolError) as group:
            log.warning("peer %s broke the protocol: %s", link.address, group.exceptions[0])
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await link.send(Error("protocol", str(group.exceptions[0])[:200]))
        except* (PeerGone, trio.TooSlowError):
            pass  # the peer went away or stalled: nothing to tell anyone
        except* Exception:
            # A bug in serving one peer must not take the listener down with it.
            log.exception("serving peer %s failed", link.address)
        finally:
            self._live_links.discard(link)
            self._first_refusals.pop(link, None)
            for subscribers in self._subscribers.values():
                subscribers.discard(subscriber)
            await link.aclose()
            self._connections -= 1

    async def _serve_link(self, subscriber: _Subscriber) -> None:
        link = subscriber.link
        # One scope for the connection whose deadline runs only while we wait for the peer
        # (replies may wait behind a piece being sent), instead of a trio.fail_after per
        # message (a cancel scope each time).
        with trio.CancelScope() as idle:
            while True:
                idle.deadline = trio.current_time() + IDLE_TIMEOUT
                event: Event | None = await link.receive()
                idle.deadline = math.inf
                while event is not None:  # (and whatever else that read completed)
                    if isinstance(event, ConnectionClosed | Error):
                        return
                    await self._serve_event(subscriber, event)
                    event = link.buffered_event()
        raise trio.TooSlowError(f"peer {link.address} idle for {IDLE_TIMEOUT:.0f} s")

    async def _serve_event(self, subscriber: _Subscriber, event: Event) -> None:
        link = subscriber.link
        if isinstance(event, Request):
            if len(subscriber.requests) >= MAX_QUEUED_REQUESTS:
                await link.send(Reject(event.digest, event.index, "too many requests"))
            else:
                subscriber.requests.append(event)
                subscriber.request_ready.set()
        elif isinstance(event, Busy):
            subscriber.busy = event.busy
        elif isinstance(event, Progress):
            if subscriber in self._subscribers.get(event.digest, ()):
                subscriber.held[event.digest] = event.held  # (only blobs it is served)
                self.progress_reports += 1
        elif isinstance(event, Cancel):
            with contextlib.suppress(ValueError):
                subscriber.requests.remove(Request(event.digest, event.index))
        elif isinstance(event, Interest):
            await self._interest(subscriber, event.digest)
        elif isinstance(event, Query):
            held = tuple(d for d in event.digests if self._holds(d))
            await link.send(Holdings(held))
        elif isinstance(event, GetMeta):
            await self._get_meta(link, event.digest)
        # (KeepAlive and anything else a peer may send: nothing to do)

    def _holds(self, digest: Digest) -> bool:
        source = self.source_for(digest)
        return source is not None and len(source.pieces) > 0

    async def _interest(self, subscriber: _Subscriber, digest: Digest) -> None:
        source = self.source_for(digest)
        if source is None:
            await subscriber.link.send(Reject(digest, -1, "not here"))
            return
        self._subscribers.setdefault(digest, set()).add(subscriber)
        await subscriber.link.send(BitfieldMsg.of(digest, source.pieces))

    async def _request(self, link: PeerLink, request: Request) -> None:
        source = self.source_for(request.digest)
        if source is None or request.index not in source.pieces or source.metainfo is None:
            await link.send(Reject(request.digest, request.index, "piece not held"))
            return
        key = (request.digest, request.index)
        if source.fetching_from_origin:
            _remember(self._fetched_from_origin, request.digest, None)
        super_seeding = source.fetching_from_origin or (
            request.digest in self._fetched_from_origin
            and super_seed_after_fetch(self._swarm_counts.get(request.digest))
        )
        if super_seeding and self._served_elsewhere(key, link) and self._still_held(key, link):
            # Super-seeding at the origin fetcher: once this agent fetches the blob from the
            # origin, a piece it already sent to a peer that is still connected is not sent
            # to a second one; that one gets it from the first. The fetcher's uplink is what
            # brings new pieces into the swarm, so it carries each piece once; everyone else
            # serves whoever asks. History (8 nodes, 128 MiB, 20 MiB/s, netns; bound 6.4 s),
            # after the duplicate-download fix: a 3 s refusal window at every agent 13.2 s
            # max; refusing only at the fetcher, for as long as the first receiver is
            # connected, 11.5-12.6 s. (The demo before that fix: window 1 s 9.9-11.6 s, 3 s
            # 7.6-7.8 s, at 8 nodes x 48 MiB @ 10 MiB/s.) A receiver that left frees the piece.
            # Also after the fetch, in a swarm that is not large: complete, the fetcher would
            # otherwise be the one peer that every node of a small swarm asks for what it lacks
            # (simulator, 16 nodes x 100 MiB, 15 download peers: 1.40x the bound with this,
            # 1.93x without; p2preg.swarm_limits.super_seed_after_fetch). Each asker is refused
            # a piece for SUPER_SEED_HOLD at most: one that asks again after that found nobody
            # else to get it from (the first receiver may have no downloaders at all).
            await link.send(Reject(request.digest, request.index, "fetch it from a peer"))
            self.refusals += 1
            return
        offset, length = source.metainfo.span(request.index)
        fd = source.open_fd()
        if fd is None:
            # (A download's file closes when it is committed: the store has the blob by then.)
            fd = self._open_stored(request.digest)
        if fd is None:
            await link.send(Reject(request.digest, request.index, "piece not held"))
            return
        # Marked only now: a piece refused here was not sent, and marking it sent would make
        # the super-seeding rule refuse it to everyone else while this link stays connected.
        self._recent_serves[key] = link
        try:
            await link.send_piece(request.digest, request.index, fd, offset, length)
        finally:
            os.close(fd)
        self._slots.sent[key] += 1
        self.pieces_served += 1
        self.bytes_served += length

    def _still_held(self, key: tuple[Digest, int], link: PeerLink) -> bool:
        """Whether a refusal of ``key`` to ``link`` is within SUPER_SEED_HOLD of the first one
        (which this call records if there was none)."""
        now = trio.current_time()
        refusals = self._first_refusals.setdefault(link, {})
        if len(refusals) > 100_000:  # (bounded, like _recent_serves: at worst a new hold)
            refusals.clear()
        return now < refusals.setdefault(key, now) + SUPER_SEED_HOLD

    def _served_elsewhere(self, key: tuple[Digest, int], link: PeerLink) -> bool:
        other = self._recent_serves.get(key)
        return other is not None and other is not link and other in self._live_links

    async def _get_meta(self, link: PeerLink, digest: Digest) -> None:
        source = self.source_for(digest)
        metainfo = source.metainfo if source is not None else None
        if source is not None and metainfo is None and self._store.has(digest):
            metainfo = await self._compute_metainfo(digest)
        if metainfo is None:
            await link.send(Reject(digest, -1, "no metainfo"))
        else:
            await link.send(Meta(metainfo))

    async def _compute_metainfo(self, digest: Digest) -> MetaInfo | None:
        """Piece hashes of a stored blob that has none recorded (cached before P2P was on)."""
        blob = self._store.acquire(digest)
        if blob is None:
            return None
        try:
            fd, size = os.dup(blob.fd), blob.size
        finally:
            blob.release()

        def compute() -> MetaInfo:
            try:
                empty = MetaInfo.empty(digest, size, piece_length_for(size))
                hashes = []
                for index in range(empty.num_pieces):
                    offset, length = empty.span(index)
                    hashes.append((index, piece_hash(os.pread(fd, length, offset))))
                return empty.with_hashes(hashes)
            finally:
                os.close(fd)

        metainfo = await trio.to_thread.run_sync(compute)
        self._store.put_metainfo(metainfo)
        return metainfo

    async def _send_pieces(self, subscriber: _Subscriber) -> None:
        while True:
            if not subscriber.requests:
                await subscriber.request_ready.wait()
                subscriber.request_ready = trio.Event()
                continue
            head = subscriber.requests[0]
            async with self._slots.slot(
                (head.digest, head.index), subscriber.held_of(head.digest), subscriber.is_busy
            ):
                # Taken only now: a Cancel that came while we waited for the slot still counts.
                if subscriber.requests:
                    await self._request(subscriber.link, subscriber.requests.popleft())

    async def _send_haves(self, subscriber: _Subscriber) -> None:
        while True:
            await subscriber.wakeup.wait()
            subscriber.wakeup = trio.Event()
            pending, subscriber.pending = subscriber.pending, {}
            await subscriber.link.send_many(
                Have(digest, index) for digest, indexes in pending.items() for index in indexes
            )
