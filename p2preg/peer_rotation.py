"""Rotating a download peer at each tracker answer (more than 16 others): which to drop and dial.

Peers are chosen by the tracker's handouts, and an agent dials them only while it has fewer
than its download-peer limit. So how many agents download from a node (its in-degree) is fixed
by the order they arrived in: in an announce storm, the last to announce are listed to few
later announcers, and an agent that joins a swarm whose members are all at their limit is
dialled by almost no one. Its uplink idles while it holds pieces the others lack. Traced in the
simulator (1 GiB @ 100 MiB/s, seed 1, t = 3 s): at 1,000 nodes the last 50 announcers were
dialled by 5 peers on average and used 11% of their upload; at 10,000 nodes 1,177 nodes were
dialled by fewer than 24 peers and used 7-51% of theirs. That was nearly all the upload the
swarm left unused (11%), and so most of the gap to the lower bound after the start.

So, in swarms of more than p2preg.swarm_limits.LARGE_SWARM_PEERS others, at every tracker
answer (one a second, or at the tracker's pace: p2preg/announce_pacing.py) an agent that
downloads from as many peers as its limit drops one and dials one from the answer:

- out: the peer where most of our requests starved (withdrawn after waiting for an upload slot,
  p2preg.upload_order.HEAD_PATIENCE) since the last rotation, if any did; among equals the one
  that delivered fewest pieces. Starved requests mark a peer dialled by more agents than its
  uplink serves, so each rotation moves a downloader from a crowded peer to another.
- never our only source of a piece we lack: the peer holding the newest pieces (the origin
  fetcher first) is the most crowded of all, and dropping it stalls everyone's last pieces.
- in: a random peer of the answer we are not connected to. Not its first: the tracker lists
  the peers holding most pieces first, the origin fetcher first of all, and every agent dialled
  it: 383 of 500 nodes waited at its 3 upload slots for their last piece (500 x 256 MiB @ 100
  MiB/s: 1.33 -> 1.57 x the bound; at random, 1.32).
- how many: one per ROTATION_SPACING (5 s) of the pace the answer set, rounded, at least one
  and at most two: one while answers come every few seconds, two where the tracker paces the
  agent's announces 7.5 s apart or more (p2preg/announce_pacing.py: 10 s at 10,000
  downloaders). Rotating one peer per 10 s answer undoes the crowding more slowly
  than it builds: 10,000 nodes x 1 GiB in three zones, p99 1.289 -> 1.270 and 1.309 -> 1.286
  the bound with two (seeds 1 and 3, simulated); at 1,000 nodes paced to 10 s, 1.286 ->
  1.268, and three gave no more (1.266). Each is a drop and a dial as above, in turn
  (docs/simulator.md, finding 16).

The agent (agent/swarm.py, Swarm.rotate) and the simulator (simulations/simulator.py) both call
the functions below.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

K = TypeVar("K")
T = TypeVar("T")


class _Pieces(Protocol):
    """A set of piece indexes (a Bitfield, or the simulator's PieceSet)."""

    def __contains__(self, index: int, /) -> bool: ...


# Requests withdrawn at a peer since the last rotation before it may be dropped.
MIN_STARVED = 1

# Seconds of announce pace per peer rotated at a tracker answer (rounded); at most
# MAX_ROTATIONS per answer (three did no better than two where measured).
ROTATION_SPACING = 5.0
MAX_ROTATIONS = 2


def rotations_at_answer(pace: float | None) -> int:
    """How many peers to rotate at a tracker answer that set the announce ``pace``, seconds
    until the next (None: a tracker that does not pace; its agents announce every second)."""
    if pace is None or not pace > 0:  # (nor a NaN)
        return 1
    return max(1, round(min(pace / ROTATION_SPACING, MAX_ROTATIONS)))  # (an inf is MAX)


def peer_to_drop(peers: Iterable[tuple[K, int, int]], sole_source: Callable[[K], bool]) -> K | None:
    """The peer to rotate out, or None. ``peers`` gives each as (key, requests withdrawn
    there since the last rotation, pieces it delivered since); ``sole_source(key)``: it is the
    only one of our peers holding some piece we lack."""
    ranked = sorted(peers, key=lambda peer: (-peer[1], peer[2]))
    for key, starved, _ in ranked:
        if starved < MIN_STARVED:
            return None
        if not sole_source(key):
            return key
    return None


def peer_to_dial(options: Sequence[T], rng: random.Random) -> T | None:
    """The peer to rotate in: one of ``options`` (the tracker's last answer, less the peers we
    are connected to, dialling, or dropped lately) at random; None if there is none."""
    if not options:
        return None
    return options[rng.randrange(len(options))]


def only_source(held: Iterable[int], have: _Pieces, availability: Sequence[int]) -> bool:
    """A peer holding ``held`` is the only one of ours with some piece we lack (we hold
    ``have``; ``availability[i]``: how many of our peers hold piece i, that one included)."""
    return any(availability[index] == 1 for index in held if index not in have)
