"""Peer handout policy: which peers the tracker gives a peer that announces for a blob.

Pure and fast: the tracker runs it on every announce and the fleet simulator runs it for 10,000
nodes. It takes its randomness and load counts as arguments and costs one pass over the k
candidates plus O(t log limit) for the t candidates of the tiers it needs to fill ``limit``
(about 2-5 ms for k = 10,000 on CPython). The order, most preferred first:

1. never the requester itself, never a peer twice (the newest announce of a peer wins);
2. same zone as the requester before other zones (cross-zone links are slower and cost money);
3. seeders (complete peers) before leechers;
4. among seeders: the least handed out recently first (``load``), so one seeder does not get
   every requester of a rollout; among leechers: most pieces first in power-of-two buckets
   (bit length of the count), then the least handed out in steps of ``LEECHER_LOAD_GRAIN``
   handouts, then the most pieces; except in a swarm of at most ``LARGE_SWARM_PEERS`` others
   (p2preg.swarm_limits), where the load step comes first and the bucket second (below);
5. random among equals (a seeded ``random.Random`` makes the result reproducible).

The tracker keeps ``load`` with :class:`HandoutLoad`, an exponentially decaying count of how often
each peer was handed out (a smooth "recent window"), and records every handout it makes. A
simulator may pass plain integer counts instead.

Candidates come from :class:`PeerTiers`: one blob's records kept bucketed by zone and
completeness as they are announced, so an announce never walks the whole swarm. A tier with more
than ``sample`` records (``HANDOUT_SAMPLE``, 200) is represented by a uniform random sample of
that many; the tiers needed to fill ``limit`` are passed to ``choose_peers``, which ranks them as
above. An announce costs O(limit + sample) instead of O(swarm) (an announce storm of N nodes no
longer costs O(N^2): 10,000 at once took 58 s of CPU with every candidate, 7 s sampled),
and it hands out better peers: with every candidate, "least handed out" among leechers with no
pieces (a whole rollout at its start) meant "announced most recently", so the nodes formed one
long chain, each a piece behind the previous; from a sample they are the most recent of a random
200, shorter chains (docs/simulator.md: a 3,000-node rollout's p50 57.9 s -> 34.5 s). Ranking
leechers at random instead (no load) shortened them further but made the tail worse in the
simulator (more piece timeouts at the early nodes everyone then dials), so load stays.

Leechers' load counts in steps of ``LEECHER_LOAD_GRAIN`` handouts, random within a step. Ranked
by the exact count, an announce storm still made chains: each node's least handed out
candidates were the ones that announced just before it (all at 0), so at 10,000 nodes the
fetcher's first pieces had to cross 52 hops of 8 nodes each before the second announces (a
second later) shortened that to 25, and every node held a piece only at t = 2.3 s. In steps of
32 (a handout of 50 is dialled ~32 times: about a node's share of downloaders) the overlay is
14 hops deep (12 with steps for the first 50 announcers too; they keep the exact order, see
_best) and its in-degrees as even (10th-90th percentile 14-38, max 45); in steps of 128 it is 4
deep but in-degrees spread to 3-72 (max 98), and at random (3 deep) to 3-74 (max 151, 225 after
the second announces): the nodes everyone dialled queued requests for seconds. Every node holds
a piece by t = 1.25 s (9,707 of 10,000 at 1 s). Simulated, 1 GiB @ 100 MiB/s, seed 1,
p50 / p99 / max x the bound, with requesters in large swarms withdrawing requests that wait
over p2preg.upload_order.HEAD_PATIENCE (without it, the faster start left early nodes' requests
starving behind the others' and the tails went up: docs/simulator.md, finding 10, has every
variant tried):

    load ranked                1,000 nodes         10,000 nodes
    exact (before)             1.29/1.30/1.31      1.40/1.42/1.42
    in steps of 32 (now)       1.24/1.25/1.26      1.30/1.33/1.34

In a swarm of at most ``LARGE_SWARM_PEERS`` others, the load step comes before the piece
count: a node keeps most of the peers it dials there (it rotates one a second from 17 others,
p2preg.swarm_limits), so whom a handout lists first sets each peer's downloaders for long.
Ranked pieces first, nodes that start over a few seconds, as in a real rollout, all
dialled the same few: the first to start hold the most pieces, so every later requester was
handed them first, and an agent dials a handout in its order. 300 nodes x 256 MiB @ 100 MiB/s,
starts spread over 2 s (seed 4): 8 nodes had 124-153 downloaders each (3 upload slots), 156
had none, and the rollout crawled (p50 45.7 s against a bound of 2.56 s, with the fetcher
refusing each asker a piece only once; with no limit on its refusals it stalled outright:
p2preg.swarm_limits.SUPER_SEED_HOLD). Load first, a peer is listed near the top for about
``LEECHER_LOAD_GRAIN`` handouts, then the next ones are: 0-17 downloaders each, p50 3.9 s, max
4.6 s (the last node starts at 2 s). (With 16 download peers and rotation from 17 others,
pieces first is still far slower there: mean max 2.22 against 1.85 x the bound at that
scenario, 3.17 against 2.34 at 100 nodes x 32 MiB @ 20 MiB/s.) In an announce storm every
count is small and equal, so nothing changes there. In larger swarms, with 32 download
peers, load first made 1,000 nodes x 1 GiB slower (p50 / max
1.18 / 1.19 -> 1.19 / 1.23x): the counts there are mostly those rotation handouts, of which
a node dials one peer. (The tracker records every answer's peers, the simulator only the
answers a node uses: in the tracker the peers listed first gain load faster, so their places
at the top turn over sooner, which spreads the dials further.) Simulated, p50 / p99 / mean max
x the bound over 10 seeds (100 MiB @ 10 MiB/s) and 2 (1 GiB @ 100 MiB/s), pieces first ->
load first, both with the hold (and 8 download peers, no rotation, from 17 to 400 others, the
rules of then):

    16 nodes                  1.17/1.19/1.19 -> 1.17/1.19/1.19
    24 nodes                  1.29/1.37/1.37 -> 1.20/1.23/1.23
    32 nodes                  1.30/1.43/1.43 -> 1.22/1.25/1.25
    16, starts over 1 s       1.20/1.29/1.29 -> 1.17/1.20/1.20
    64, starts over 1 s       1.41/1.57/1.57 -> 1.38/1.57/1.57
    64 x 1 GiB                1.22/1.35/1.35 -> 1.20/1.36/1.36
    200 x 1 GiB               1.28/1.40/1.56 -> 1.26/1.39/1.45
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from p2preg.swarm_limits import LARGE_SWARM_PEERS

PEER_ID_BYTES = 16
# Records of one tier ranked per announce; a bigger tier is sampled down to this many.
HANDOUT_SAMPLE = 200
# Leechers handed out fewer than this many times more than another count as equally loaded.
LEECHER_LOAD_GRAIN = 32


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A peer's last announce for one blob."""

    peer_id: bytes  # PEER_ID_BYTES long
    addr: str  # "host:port" of its peer port, as the peer advertises it
    zone: str
    complete: bool
    pieces: int  # pieces held, >= 0
    announced_at: float  # the tracker's clock


class Requester(Protocol):
    """Who asks: a PeerRecord, or anything with a peer_id and a zone."""

    @property
    def peer_id(self) -> bytes: ...

    @property
    def zone(self) -> str: ...


@dataclass(frozen=True, slots=True)
class PeerRef:
    """A requester that has no record (yet)."""

    peer_id: bytes
    zone: str


def choose_peers(
    candidates: Sequence[PeerRecord],
    requester: Requester,
    limit: int,
    rng: random.Random,
    load: Mapping[bytes, float],
    swarm_peers: int | None = None,
) -> list[PeerRecord]:
    """Up to ``limit`` peers from ``candidates`` for ``requester``, most preferred first, in a
    swarm of ``swarm_peers`` others (None: unknown, taken as large: see the module's order)."""
    if limit <= 0 or not candidates:
        return []
    me, my_zone = requester.peer_id, requester.zone
    # Up to LARGE_SWARM_PEERS others, the load goes first (module docstring).
    load_first = swarm_peers is not None and swarm_peers <= LARGE_SWARM_PEERS
    if len({record.peer_id for record in candidates}) != len(candidates):
        candidates = _newest_per_peer(candidates)
    # Tiers: same-zone seeders, same-zone leechers, other seeders, other leechers. Only the
    # tiers needed to fill ``limit`` are ranked, so a big swarm costs one pass plus a sort of
    # (usually) one tier.
    tiers: tuple[list[PeerRecord], ...] = ([], [], [], [])
    for record in candidates:
        if record.peer_id != me:
            tiers[(record.zone != my_zone) * 2 + (not record.complete)].append(record)
    chosen: list[PeerRecord] = []
    for index, tier in enumerate(tiers):
        room = limit - len(chosen)
        if room <= 0:
            break
        if tier:
            chosen += _best(tier, room, index % 2 == 1, rng, load, load_first)
    return chosen


def _best(
    tier: list[PeerRecord],
    room: int,
    leechers: bool,
    rng: random.Random,
    load: Mapping[bytes, float],
    load_first: bool,
) -> list[PeerRecord]:
    """The ``room`` best of one tier, best first: seeders by ``(load, random)``, leechers by
    ``(load // LEECHER_LOAD_GRAIN, -bucket(pieces), -pieces, random)`` if ``load_first``, else
    ``(-bucket(pieces), load // LEECHER_LOAD_GRAIN, -pieces, random)`` (``load`` itself when
    the whole tier fits in ``room``), where bucket is the bit length."""
    get = load.get
    # 32 random bits per record in one call (C speed), for the tie-break.
    draws = memoryview(rng.randbytes(4 * len(tier))).cast("I").tolist()
    keys: list[tuple[float, ...]]
    if leechers:
        # In steps when some are left out (docstring); a tier handed out whole keeps the exact
        # order, the order its members are dialled in: steps there made 16 nodes 1% slower.
        loads = [get(r.peer_id, 0) for r in tier]
        if len(tier) > room:
            loads = [value // LEECHER_LOAD_GRAIN for value in loads]
        if load_first:
            keys = [
                (value, -r.pieces.bit_length(), -r.pieces, x)
                for r, value, x in zip(tier, loads, draws, strict=True)
            ]
        else:
            keys = [
                (-r.pieces.bit_length(), value, -r.pieces, x)
                for r, value, x in zip(tier, loads, draws, strict=True)
            ]
    else:
        keys = [(get(r.peer_id, 0), x) for r, x in zip(tier, draws, strict=True)]
    return _smallest(tier, keys, room)


def _smallest(tier: list[PeerRecord], keys: list[tuple[float, ...]], room: int) -> list[PeerRecord]:
    # A full sort, not heapq.nsmallest (documented as equivalent to sorted(...)[:room], ties
    # included): nsmallest's loop is Python, the sort C, 3x faster at the tracker's 200.
    order = sorted(range(len(tier)), key=keys.__getitem__)
    return [tier[i] for i in order[:room]]


def _newest_per_peer(candidates: Sequence[PeerRecord]) -> list[PeerRecord]:
    latest: dict[bytes, PeerRecord] = {}
    for record in candidates:
        seen = latest.get(record.peer_id)
        if seen is None or record.announced_at >= seen.announced_at:
            latest[record.peer_id] = record
    return list(latest.values())


class _Tier:
    """Records with O(1) upsert, removal and random access by position."""

    __slots__ = ("position", "records")

    def __init__(self) -> None:
        self.records: list[PeerRecord] = []
        self.position: dict[bytes, int] = {}

    def put(self, record: PeerRecord) -> None:
        place = self.position.get(record.peer_id)
        if place is None:
            self.position[record.peer_id] = len(self.records)
            self.records.append(record)
        else:
            self.records[place] = record

    def remove(self, peer_id: bytes) -> None:
        place = self.position.pop(peer_id)
        last = self.records.pop()
        if place < len(self.records):
            self.records[place] = last
            self.position[last.peer_id] = place


class PeerTiers:
    """One blob's peer records, bucketed as the handout ranks them: per zone, seeders and
    leechers. Upsert, removal and lookup are O(1); ``candidates`` is O(limit + sample)."""

    __slots__ = ("_tier_of", "_zones")

    def __init__(self) -> None:
        self._zones: dict[str, tuple[_Tier, _Tier]] = {}  # zone -> (seeders, leechers)
        self._tier_of: dict[bytes, _Tier] = {}

    def __len__(self) -> int:
        return len(self._tier_of)

    def __iter__(self) -> Iterator[PeerRecord]:
        for seeders, leechers in self._zones.values():
            yield from seeders.records
            yield from leechers.records

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._tier_of

    def get(self, peer_id: bytes) -> PeerRecord | None:
        tier = self._tier_of.get(peer_id)
        return None if tier is None else tier.records[tier.position[peer_id]]

    def upsert(self, record: PeerRecord) -> None:
        """Add ``record`` or replace the peer's previous one (moving it between tiers)."""
        tiers = self._zones.get(record.zone)
        if tiers is None:
            tiers = self._zones[record.zone] = (_Tier(), _Tier())
        tier = tiers[0] if record.complete else tiers[1]
        old = self._tier_of.get(record.peer_id)
        if old is not None and old is not tier:
            self.remove(record.peer_id)
            if record.zone not in self._zones:  # removing emptied the zone
                tiers = self._zones[record.zone] = (_Tier(), _Tier())
                tier = tiers[0] if record.complete else tiers[1]
        tier.put(record)
        self._tier_of[record.peer_id] = tier

    def remove(self, peer_id: bytes) -> PeerRecord | None:
        tier = self._tier_of.pop(peer_id, None)
        if tier is None:
            return None
        record = tier.records[tier.position[peer_id]]
        tier.remove(peer_id)
        seeders, leechers = self._zones[record.zone]
        if not seeders.records and not leechers.records:
            del self._zones[record.zone]
        return record

    def candidates(
        self, requester: Requester, limit: int, rng: random.Random, sample: int = HANDOUT_SAMPLE
    ) -> list[PeerRecord]:
        """What ``choose_peers`` needs to answer ``requester``: the tiers in its order of
        preference (same-zone seeders, same-zone leechers, other seeders, other leechers) up to
        the one that fills ``limit``, each tier of more than ``sample`` records (0: no limit)
        replaced by a uniform random sample of ``sample`` of them. Never the requester."""
        if limit <= 0:
            return []
        me, my_zone = requester.peer_id, requester.zone
        mine = self._tier_of.get(me)
        own = self._zones.get(my_zone)
        others = [tiers for zone, tiers in self._zones.items() if zone != my_zone]
        groups: list[list[_Tier]] = []
        if own is not None:
            groups += [[own[0]], [own[1]]]
        groups += [[t[0] for t in others], [t[1] for t in others]]
        out: list[PeerRecord] = []
        found = 0
        for group in groups:
            size = sum(len(t.records) for t in group)
            if size == 0:
                continue
            # The requester's place in the group, if its record is there: left out by place,
            # not by comparing every candidate's id with it.
            skip = None if mine is None else _place_in(group, mine, me)
            if 0 < sample < size:
                out += _sample(group, size, sample, rng, skip)
            else:
                for tier in group:
                    if tier is mine:
                        place = tier.position[me]
                        out += tier.records[:place]
                        out += tier.records[place + 1 :]
                    else:
                        out += tier.records
            found += size - (skip is not None)
            if found >= limit:
                break
        return out


def _place_in(group: list[_Tier], tier: _Tier, peer_id: bytes) -> int | None:
    """The position of ``peer_id``'s record (held in ``tier``) in the concatenated records of
    ``group``; None when ``tier`` is not in the group."""
    start = 0
    for member in group:
        if member is tier:
            return start + tier.position[peer_id]
        start += len(member.records)
    return None


def _sample(
    group: list[_Tier], size: int, count: int, rng: random.Random, skip: int | None = None
) -> list[PeerRecord]:
    """``count`` distinct records drawn uniformly from the ``size`` records of ``group``, in no
    particular order (``choose_peers`` breaks its ties with draws of its own), less the one at
    position ``skip`` if it was drawn."""
    places = _distinct_positions(size, count, rng)
    if skip is not None:
        places.discard(skip)
    if len(group) == 1:
        records = group[0].records
        return [records[x] for x in places]
    starts: list[int] = []
    total = 0
    for tier in group:
        starts.append(total)
        total += len(tier.records)
    out = []
    for x in places:
        t = bisect.bisect_right(starts, x) - 1
        out.append(group[t].records[x - starts[t]])
    return out


def _distinct_positions(size: int, count: int, rng: random.Random) -> set[int]:
    """``count`` distinct integers drawn uniformly from ``range(size)`` (count <= size).

    ``random.sample`` does this with a Python-level call per draw; at the tracker's 200 of
    10,000 that was 15% of an announce. Here the 32-bit words come from the generator in one
    ``randbytes`` call, each gives a position from its top bits (rejected when past ``size``,
    as ``random.randrange`` does, so there is no modulo bias), and the first ``count``
    distinct positions are kept: a uniform random subset, at 2.6x less CPU."""
    if size >= 1 << 32:
        return set(rng.sample(range(size), count))
    shift = 32 - size.bit_length()
    chosen: set[int] = set()
    while len(chosen) < count:
        # One word per position still missing: never more than ``count`` are kept.
        words = memoryview(rng.randbytes(4 * (count - len(chosen)))).cast("I").tolist()
        chosen.update([place for word in words if (place := word >> shift) < size])
    return chosen


class HandoutLoad:
    """Per-peer handout counts that decay exponentially with ``half_life`` seconds.

    ``record`` adds one per handout; ``snapshot`` reads the decayed counts. Bounded: at most
    ``max_peers`` entries, the least recently touched go first; ``sweep`` drops what decayed
    below ``floor``. Time is an argument, so the simulator can drive it with its own clock, and
    it only moves forward.

    Every count decays by the same factor, so each is kept scaled to one common instant
    (``_epoch``): the count at ``now`` is the stored value times ``exp(-rate (now - epoch))``,
    one ``exp`` per call instead of one per entry (a snapshot of the tracker's 200 candidates
    was 15% of an announce). The scaled values grow by e every 1/rate seconds, so the epoch
    moves forward (every entry rescaled) before they could overflow.
    """

    # Rescale when the scaled values have grown by e**REBASE_EXPONENT (about 10**130; an hour
    # and a quarter at the tracker's 10 s half-life): far from a float's 10**308.
    REBASE_EXPONENT = 300.0

    def __init__(self, half_life: float, max_peers: int = 200_000, floor: float = 0.05) -> None:
        if half_life <= 0:
            raise ValueError("half_life must be positive")
        self._rate = math.log(2) / half_life
        self._max = max_peers
        self._floor = floor
        self._epoch: float | None = None  # set by the first call that gives a time
        # peer id -> count scaled to the epoch; dict order is least recently touched first.
        self._values: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self._values)

    def _factor(self, now: float) -> float:
        """What a stored value is multiplied by to give the count at ``now``."""
        if self._epoch is None:
            self._epoch = now
        elapsed = now - self._epoch
        if elapsed <= 0:
            # A time before the epoch (a clock that stepped back): the counts as they are,
            # not grown by exp(rate * step), which a long step would overflow.
            return 1.0
        if self._rate * elapsed > self.REBASE_EXPONENT:
            factor = math.exp(-self._rate * elapsed)
            self._values = {peer: value * factor for peer, value in self._values.items()}
            self._epoch = now
            return 1.0
        return math.exp(-self._rate * elapsed)

    def get(self, peer_id: bytes, now: float) -> float:
        value = self._values.get(peer_id)
        return 0.0 if value is None else value * self._factor(now)

    def record(self, peer_ids: Iterable[bytes], now: float, amount: float = 1.0) -> None:
        scaled = amount / self._factor(now)  # (may rescale: read the table after it)
        values = self._values
        for peer_id in peer_ids:
            values[peer_id] = values.pop(peer_id, 0.0) + scaled
        while len(values) > self._max:
            del values[next(iter(values))]

    def snapshot(self, peer_ids: Iterable[bytes], now: float) -> dict[bytes, float]:
        factor = self._factor(now)
        values = self._values
        return {peer_id: values[peer_id] * factor for peer_id in peer_ids if peer_id in values}

    def sweep(self, now: float) -> int:
        """Drop entries that decayed below the floor; returns how many were dropped."""
        if not self._values:
            return 0
        below = self._floor / self._factor(now)
        stale = [peer for peer, value in self._values.items() if value < below]
        for peer_id in stale:
            del self._values[peer_id]
        return len(stale)
