"""The tracker's state: who has which blob, its metainfo, origin-fetch leases, handout load.

``PeerStore`` is the contract (async, so a Redis implementation can share it for tracker
replicas); ``MemoryPeerStore`` is the in-process implementation. Time is always an argument
(the tracker passes ``trio.current_time()``, tests pass numbers), so the semantics are tested
without sleeping.

Semantics (docs/tracker.md):

- Peers: ``announce`` upserts a peer's record for a digest, to live ``peer_ttl`` or the
  ``ttl`` the tracker gives it (3 of the intervals it told the announcer); ``peers`` returns
  the records still alive; ``handout_candidates`` returns what the handout policy ranks for one
  requester: the records bucketed by zone and completeness (``PeerTiers``), big tiers sampled
  (``StoreLimits.handout_sample``), O(limit + sample) per announce, not O(swarm). At most
  ``max_peers_per_digest`` per digest and ``max_total_peers`` overall; beyond that the least
  recently announced go first.
- Digests: at most ``max_digests``; the least recently touched digest (and its metainfo and
  leases) is evicted first.
- Metainfo: ``put_metainfo`` merges progressive piece hashes into what the tracker holds; a hash
  that differs from a known one raises ``MetainfoConflict`` and changes nothing.
- Leases decide who fetches what from the origin. Piece ranges are half-open ``[start, end)``;
  ``None`` (or ``end=None``) means the whole blob (to its end). The first asker gets the range
  for ``lease_ttl``; while it is valid others get the holder's lease back (``granted=False``),
  unless they ask for a range disjoint from every valid lease and fewer than
  ``max_origin_fetchers`` leases are out. The holder renews by asking again; an expired lease
  goes to the next asker.
- ``report_bad`` drops the blob's metainfo and the reported publisher's leases, and quarantines
  that publisher for the blob (no leases, no publishing) for ``bad_publisher_quarantine``.
"""

from __future__ import annotations

import abc
import heapq
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from p2preg.digest import Digest
from p2preg.errors import RemoteProtocolError
from p2preg.handout import HANDOUT_SAMPLE, HandoutLoad, PeerRecord, PeerTiers, Requester
from p2preg.metainfo import MetaInfo

log = logging.getLogger(__name__)

PieceRange = tuple[int, int | None]


class MetainfoConflict(Exception):
    """Published metainfo disagrees with what the tracker holds (HTTP 409)."""


class PublisherQuarantined(Exception):
    """The peer was reported for bad data of this blob and may not publish or lease it (403)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """``holder`` may fetch pieces ``[start, end)`` (``end=None``: to the blob's end) from the
    origin until ``expires_at`` (the store's clock)."""

    holder: bytes
    start: int
    end: int | None
    expires_at: float

    def overlaps(self, start: int, end: int | None) -> bool:
        return (end is None or self.start < end) and (self.end is None or start < self.end)


@dataclass(frozen=True, slots=True)
class LeaseResult:
    """``granted``: ``lease`` is the asker's (new or renewed). Otherwise ``lease`` is the valid
    lease that stands in the way; fetch those pieces from its holder."""

    granted: bool
    lease: Lease


@dataclass(frozen=True, slots=True)
class StoreLimits:
    peer_ttl: float = 30.0
    lease_ttl: float = 10.0
    max_origin_fetchers: int = 2
    max_peers_per_digest: int = 10_000
    max_total_peers: int = 1_000_000
    max_digests: int = 100_000
    load_half_life: float = 10.0
    bad_publisher_quarantine: float = 60.0
    handout_sample: int = HANDOUT_SAMPLE  # records ranked per tier and announce (0: all)


def normalize_range(piece_range: tuple[int, int | None] | None) -> PieceRange:
    """``None`` -> the whole blob ``(0, None)``; otherwise check ``0 <= start < end``."""
    if piece_range is None:
        return (0, None)
    start, end = piece_range
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"bad piece range [{start}, {end})")
    return (start, end)


class PeerStore(abc.ABC):
    """The contract every store implements (memory now, Redis later)."""

    @abc.abstractmethod
    async def announce(
        self, digest: Digest, record: PeerRecord, now: float, ttl: float | None = None
    ) -> None:
        """Upsert ``record``; it lives ``ttl`` seconds (None: ``peer_ttl``) unless announced
        again."""

    @abc.abstractmethod
    async def peers(self, digest: Digest, now: float) -> list[PeerRecord]: ...

    @abc.abstractmethod
    async def handout_candidates(
        self, digest: Digest, requester: Requester, limit: int, rng: random.Random, now: float
    ) -> list[PeerRecord]:
        """The live records ``choose_peers`` ranks for ``requester``: ``PeerTiers.candidates``
        with ``StoreLimits.handout_sample``."""

    @abc.abstractmethod
    async def swarm_size(self, digest: Digest, now: float) -> int:
        """How many live peers announced the blob: the size the agents' limits follow
        (p2preg.swarm_limits), which a handout of at most ``max_peers`` cannot tell."""

    @abc.abstractmethod
    async def peer_counts(self) -> tuple[int, int]:
        """Peer records held for all blobs, (downloading, complete) (stale ones until the next
        sweep drops them): the announce load the tracker paces (p2preg/announce_pacing.py).
        O(1): asked per announce."""

    @abc.abstractmethod
    async def get_metainfo(self, digest: Digest) -> MetaInfo | None: ...

    @abc.abstractmethod
    async def put_metainfo(self, metainfo: MetaInfo, publisher: bytes, now: float) -> MetaInfo:
        """Merge and store; returns the merged metainfo. Raises MetainfoConflict,
        PublisherQuarantined."""

    @abc.abstractmethod
    async def acquire_lease(
        self,
        digest: Digest,
        peer_id: bytes,
        piece_range: tuple[int, int | None] | None,
        now: float,
    ) -> LeaseResult:
        """Raises PublisherQuarantined, ValueError for a bad range."""

    @abc.abstractmethod
    async def release_lease(
        self,
        digest: Digest,
        peer_id: bytes,
        piece_range: tuple[int, int | None] | None,
        now: float,
    ) -> int:
        """Drop the peer's leases on the digest (only those overlapping ``piece_range`` if
        given); returns how many were dropped."""

    @abc.abstractmethod
    async def report_bad(
        self, digest: Digest, reporter: bytes, publisher: bytes, now: float
    ) -> bool:
        """True if there was metainfo to drop."""

    @abc.abstractmethod
    async def record_handout(self, peer_ids: Sequence[bytes], now: float) -> None: ...

    @abc.abstractmethod
    async def handout_load(self, peer_ids: Sequence[bytes], now: float) -> dict[bytes, float]: ...

    @abc.abstractmethod
    async def sweep(self, now: float) -> None:
        """Drop everything expired (the tracker calls this periodically)."""

    @abc.abstractmethod
    async def stats(self) -> dict[str, int]: ...


@dataclass(slots=True)
class _Blob:
    # peer id -> record; dict order: least recently announced first.
    peers: dict[bytes, PeerRecord] = field(default_factory=dict)
    tiers: PeerTiers = field(default_factory=PeerTiers)  # the same records, bucketed
    # When each record runs out: a heap of (expires at, announce number, peer id), an entry
    # per announce; the live one is the peer's number in ``announced``. Records live as long
    # as the interval their announcer was told allows (p2preg/announce_pacing.py), so they
    # do not run out in announce order.
    expiry: list[tuple[float, int, bytes]] = field(default_factory=list)
    announced: dict[bytes, int] = field(default_factory=dict)
    metainfo: MetaInfo | None = None
    leases: list[Lease] = field(default_factory=list)
    quarantined: dict[bytes, float] = field(default_factory=dict)  # publisher -> until

    def is_empty(self) -> bool:
        return not (self.peers or self.metainfo or self.leases or self.quarantined)


class MemoryPeerStore(PeerStore):
    """Everything in one process's memory; bounded as ``StoreLimits`` says."""

    def __init__(self, limits: StoreLimits | None = None) -> None:
        self.limits = limits or StoreLimits()
        # digest -> state; dict order: least recently touched first.
        self._blobs: dict[Digest, _Blob] = {}
        self._peer_count = 0
        self._seeder_count = 0  # records with complete=True, all blobs
        self._announces = 0  # numbers the announces (_Blob.expiry)
        self._load = HandoutLoad(self.limits.load_half_life)

    # -- bookkeeping -----------------------------------------------------------------------------

    def _touch(self, digest: Digest) -> _Blob:
        """The digest's state, created if needed, moved to the most recently used end."""
        blob = self._blobs.pop(digest, None)
        if blob is None:
            blob = _Blob()
        self._blobs[digest] = blob
        while len(self._blobs) > self.limits.max_digests:
            self._evict(next(iter(self._blobs)))
        return blob

    def _evict(self, digest: Digest) -> None:
        blob = self._blobs.pop(digest)
        self._peer_count -= len(blob.peers)
        self._seeder_count -= sum(1 for record in blob.peers.values() if record.complete)

    def _remove(self, blob: _Blob, peer_id: bytes) -> None:
        record = blob.peers.pop(peer_id)
        blob.tiers.remove(peer_id)
        del blob.announced[peer_id]
        self._peer_count -= 1
        self._seeder_count -= record.complete

    def _forget_if_empty(self, digest: Digest, blob: _Blob) -> None:
        if blob.is_empty() and self._blobs.get(digest) is blob:
            del self._blobs[digest]

    def _drop_stale_peers(self, blob: _Blob, now: float) -> None:
        # O(log n) per expired entry, not O(peers), on every announce.
        expiry, announced = blob.expiry, blob.announced
        while expiry and expiry[0][0] < now:
            _, number, peer_id = heapq.heappop(expiry)
            if announced.get(peer_id) == number:  # (else re-announced since, or removed)
                self._remove(blob, peer_id)

    def _valid_leases(self, blob: _Blob, now: float) -> list[Lease]:
        if any(lease.expires_at <= now for lease in blob.leases):
            blob.leases = [lease for lease in blob.leases if lease.expires_at > now]
        return blob.leases

    def _check_quarantine(self, blob: _Blob, peer_id: bytes, digest: Digest, now: float) -> None:
        until = blob.quarantined.get(peer_id)
        if until is None:
            return
        if until <= now:
            del blob.quarantined[peer_id]
            return
        raise PublisherQuarantined(
            f"peer {peer_id.hex()} was reported for bad data of {digest}; "
            f"quarantined for {until - now:.0f}s more"
        )

    # -- peers -----------------------------------------------------------------------------------

    async def announce(
        self, digest: Digest, record: PeerRecord, now: float, ttl: float | None = None
    ) -> None:
        blob = self._touch(digest)
        old = blob.peers.pop(record.peer_id, None)
        if old is not None:
            self._peer_count -= 1
            self._seeder_count -= old.complete
        blob.peers[record.peer_id] = record
        blob.tiers.upsert(record)
        self._peer_count += 1
        self._seeder_count += record.complete
        self._announces += 1
        blob.announced[record.peer_id] = self._announces
        lifetime = self.limits.peer_ttl if ttl is None else ttl
        heapq.heappush(blob.expiry, (now + lifetime, self._announces, record.peer_id))
        if len(blob.expiry) > 4 * len(blob.peers) + 64:
            # Mostly entries of earlier announces (a downloader announces every second and
            # lives 30 s): keep the live ones.
            blob.expiry = [e for e in blob.expiry if blob.announced.get(e[2]) == e[1]]
            heapq.heapify(blob.expiry)
        while len(blob.peers) > self.limits.max_peers_per_digest:
            self._remove(blob, next(iter(blob.peers)))
        while self._peer_count > self.limits.max_total_peers and len(self._blobs) > 1:
            oldest = next(iter(self._blobs))
            if oldest == digest:
                break
            self._evict(oldest)

    async def peers(self, digest: Digest, now: float) -> list[PeerRecord]:
        blob = self._blobs.get(digest)
        if blob is None:
            return []
        self._drop_stale_peers(blob, now)
        return list(blob.peers.values())

    async def handout_candidates(
        self, digest: Digest, requester: Requester, limit: int, rng: random.Random, now: float
    ) -> list[PeerRecord]:
        blob = self._blobs.get(digest)
        if blob is None:
            return []
        self._drop_stale_peers(blob, now)
        return blob.tiers.candidates(requester, limit, rng, self.limits.handout_sample)

    async def swarm_size(self, digest: Digest, now: float) -> int:
        blob = self._blobs.get(digest)
        if blob is None:
            return 0
        self._drop_stale_peers(blob, now)
        return len(blob.peers)

    async def peer_counts(self) -> tuple[int, int]:
        return self._peer_count - self._seeder_count, self._seeder_count

    # -- metainfo --------------------------------------------------------------------------------

    async def get_metainfo(self, digest: Digest) -> MetaInfo | None:
        blob = self._blobs.get(digest)
        return None if blob is None else blob.metainfo

    async def put_metainfo(self, metainfo: MetaInfo, publisher: bytes, now: float) -> MetaInfo:
        existing = self._blobs.get(metainfo.digest)
        if existing is not None:
            self._check_quarantine(existing, publisher, metainfo.digest, now)
            if existing.metainfo is not None:
                try:
                    merged = existing.metainfo.merge(metainfo)
                except RemoteProtocolError as exc:
                    raise MetainfoConflict(str(exc)) from None
            else:
                merged = metainfo
        else:
            merged = metainfo
        self._touch(metainfo.digest).metainfo = merged
        return merged

    # -- leases ----------------------------------------------------------------------------------

    async def acquire_lease(
        self,
        digest: Digest,
        peer_id: bytes,
        piece_range: tuple[int, int | None] | None,
        now: float,
    ) -> LeaseResult:
        start, end = normalize_range(piece_range)
        blob = self._touch(digest)
        self._check_quarantine(blob, peer_id, digest, now)
        leases = self._valid_leases(blob, now)
        mine = [lease for lease in leases if lease.holder == peer_id]
        others = [lease for lease in leases if lease.holder != peer_id]
        for lease in others:
            if lease.overlaps(start, end):
                return LeaseResult(False, lease)
        # The asker's own overlapping leases are replaced (renewal, or a changed range).
        kept = [lease for lease in mine if not lease.overlaps(start, end)]
        if len(others) + len(kept) >= self.limits.max_origin_fetchers:
            # Every origin slot is taken: point at the lease that frees up first.
            busy = min(others or kept, key=lambda lease: lease.expires_at)
            return LeaseResult(False, busy)
        lease = Lease(peer_id, start, end, now + self.limits.lease_ttl)
        blob.leases = [*others, *kept, lease]
        return LeaseResult(True, lease)

    async def release_lease(
        self,
        digest: Digest,
        peer_id: bytes,
        piece_range: tuple[int, int | None] | None,
        now: float,
    ) -> int:
        blob = self._blobs.get(digest)
        if blob is None:
            return 0
        start, end = normalize_range(piece_range)
        before = len(blob.leases)
        blob.leases = [
            lease
            for lease in self._valid_leases(blob, now)
            if lease.holder != peer_id or not lease.overlaps(start, end)
        ]
        released = before - len(blob.leases)
        self._forget_if_empty(digest, blob)
        return released

    # -- bad data --------------------------------------------------------------------------------

    async def report_bad(
        self, digest: Digest, reporter: bytes, publisher: bytes, now: float
    ) -> bool:
        blob = self._blobs.get(digest)
        if blob is None:
            blob = self._touch(digest)
        had_metainfo = blob.metainfo is not None
        blob.metainfo = None
        blob.leases = [lease for lease in blob.leases if lease.holder != publisher]
        if publisher != reporter and self.limits.bad_publisher_quarantine > 0:
            blob.quarantined[publisher] = now + self.limits.bad_publisher_quarantine
            # Bounded: a blob keeps at most a few quarantined publishers.
            while len(blob.quarantined) > 64:
                del blob.quarantined[next(iter(blob.quarantined))]
        log.warning(
            "peer %s reported bad data of %s from %s: metainfo %s",
            reporter.hex(),
            digest,
            publisher.hex(),
            "dropped" if had_metainfo else "was not held",
        )
        self._forget_if_empty(digest, blob)
        return had_metainfo

    # -- handout load ----------------------------------------------------------------------------

    async def record_handout(self, peer_ids: Sequence[bytes], now: float) -> None:
        self._load.record(peer_ids, now)

    async def handout_load(self, peer_ids: Sequence[bytes], now: float) -> dict[bytes, float]:
        return self._load.snapshot(peer_ids, now)

    # -- housekeeping ----------------------------------------------------------------------------

    async def sweep(self, now: float) -> None:
        for digest, blob in list(self._blobs.items()):
            self._drop_stale_peers(blob, now)
            self._valid_leases(blob, now)
            for publisher in [p for p, until in blob.quarantined.items() if until <= now]:
                del blob.quarantined[publisher]
            self._forget_if_empty(digest, blob)
        self._load.sweep(now)

    async def stats(self) -> dict[str, int]:
        return {
            "digests": len(self._blobs),
            "peers": self._peer_count,
            "metainfo": sum(1 for blob in self._blobs.values() if blob.metainfo is not None),
            "leases": sum(len(blob.leases) for blob in self._blobs.values()),
            "tracked_load": len(self._load),
        }
