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
   (bit length of the count), then the least handed out, then the most pieces;
5. random among equals (a seeded ``random.Random`` makes the result reproducible).

The tracker keeps ``load`` with :class:`HandoutLoad`, an exponentially decaying count of how often
each peer was handed out (a smooth "recent window"), and records every handout it makes. A
simulator may pass plain integer counts instead.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

PEER_ID_BYTES = 16


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
) -> list[PeerRecord]:
    """Up to ``limit`` peers from ``candidates`` for ``requester``, most preferred first."""
    if limit <= 0 or not candidates:
        return []
    me, my_zone = requester.peer_id, requester.zone
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
            chosen += _best(tier, room, index % 2 == 1, rng, load)
    return chosen


def _best(
    tier: list[PeerRecord],
    room: int,
    leechers: bool,
    rng: random.Random,
    load: Mapping[bytes, float],
) -> list[PeerRecord]:
    """The ``room`` best of one tier, best first: seeders by ``(load, random)``, leechers by
    ``(-bucket(pieces), load, -pieces, random)``, where bucket is the bit length."""
    get = load.get
    # 32 random bits per record in one call (C speed), for the tie-break.
    draws = memoryview(rng.randbytes(4 * len(tier))).cast("I").tolist()
    keys: list[tuple[float, ...]]
    if leechers:
        keys = [
            (-r.pieces.bit_length(), get(r.peer_id, 0), -r.pieces, x)
            for r, x in zip(tier, draws, strict=True)
        ]
    else:
        keys = [(get(r.peer_id, 0), x) for r, x in zip(tier, draws, strict=True)]
    return _smallest(tier, keys, room)


def _smallest(tier: list[PeerRecord], keys: list[tuple[float, ...]], room: int) -> list[PeerRecord]:
    positions = range(len(tier))
    if room < len(tier):
        order = heapq.nsmallest(room, positions, key=keys.__getitem__)
    else:
        order = sorted(positions, key=keys.__getitem__)
    return [tier[i] for i in order]


def _newest_per_peer(candidates: Sequence[PeerRecord]) -> list[PeerRecord]:
    latest: dict[bytes, PeerRecord] = {}
    for record in candidates:
        seen = latest.get(record.peer_id)
        if seen is None or record.announced_at >= seen.announced_at:
            latest[record.peer_id] = record
    return list(latest.values())


class HandoutLoad:
    """Per-peer handout counts that decay exponentially with ``half_life`` seconds.

    ``record`` adds one per handout; ``snapshot`` reads the decayed counts. Bounded: at most
    ``max_peers`` entries, the least recently touched go first; ``sweep`` drops what decayed
    below ``floor``. Time is an argument, so the simulator can drive it with its own clock.
    """

    def __init__(self, half_life: float, max_peers: int = 200_000, floor: float = 0.05) -> None:
        if half_life <= 0:
            raise ValueError("half_life must be positive")
        self._rate = math.log(2) / half_life
        self._max = max_peers
        self._floor = floor
        # peer id -> (value, at); dict order is least recently touched first.
        self._values: dict[bytes, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._values)

    def _decayed(self, entry: tuple[float, float], now: float) -> float:
        value, at = entry
        return value * math.exp(-self._rate * (now - at)) if now > at else value

    def get(self, peer_id: bytes, now: float) -> float:
        entry = self._values.get(peer_id)
        return 0.0 if entry is None else self._decayed(entry, now)

    def record(self, peer_ids: Iterable[bytes], now: float, amount: float = 1.0) -> None:
        values = self._values
        for peer_id in peer_ids:
            entry = values.pop(peer_id, None)
            current = 0.0 if entry is None else self._decayed(entry, now)
            values[peer_id] = (current + amount, now)
        while len(values) > self._max:
            del values[next(iter(values))]

    def snapshot(self, peer_ids: Iterable[bytes], now: float) -> dict[bytes, float]:
        values = self._values
        result: dict[bytes, float] = {}
        for peer_id in peer_ids:
            entry = values.get(peer_id)
            if entry is not None:
                result[peer_id] = self._decayed(entry, now)
        return result

    def sweep(self, now: float) -> int:
        """Drop entries that decayed below the floor; returns how many were dropped."""
        stale = [p for p, e in self._values.items() if self._decayed(e, now) < self._floor]
        for peer_id in stale:
            del self._values[peer_id]
        return len(stale)
