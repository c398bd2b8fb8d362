"""How often a downloading agent announces: paced by the tracker, so that one tracker keeps up.

A downloading agent announces its progress to get peers back (and, in swarms of more than 16
others, a peer to rotate in). Every announce of a blob goes to the one tracker its digest ranks
first (rendezvous hashing, docs/tracker.md), and an announce costs that tracker about 0.8 ms
of CPU with 10,000 peers in the blob's swarm (`python -m simulations.bench_tracker`: 0.81 ms,
1,240 announces a second on one core since c5eb183; the handout's sampling and ranking are
about half of it, HTTP and trio the rest). At one announce a second per downloader, a rollout
to 10,000 nodes asks 10,000 a second of it: eight times what it can answer, so every answer
would wait for the backlog.

So the tracker tells each downloader when to announce again (``pace`` in the announce answer),
from a calendar of announce slots (AnnounceCalendar): the next free one, at least a second
away, ANNOUNCE_BUDGET slots a second, but never further ahead than the seeders'
shortest interval (a third of the peer TTL), so a paced downloader is never dropped as stale;
when its downloading records cannot all fit the budget within that ceiling, the slots are as
close as the ceiling forces (records / ceiling a second). In the steady state that is the pace
``records / budget`` of before (7eddbd7); what the calendar changes is a burst. A rollout's
start is one: every node announces within a second, and a pace computed from the record count
alone sent them all back together ten seconds later, again and again, so nobody got a fresh
answer (and a peer to rotate in) before the tenth second of a rollout that lasts thirteen.
The calendar spreads them over the ceiling instead: at 1,000 nodes in three zones paced to
10 s, p99 1.33x -> 1.29x the bound (docs/simulator.md, finding 15). The budget is under half
of one core at the measured cost, leaving the rest for metainfo, leases, session renewals and
bursts. At 10,000 peers and the default 30 s TTL the ceiling binds (10 s): about 1,000
announces a second, four fifths of the tracker's core; a fleet that size wants a longer
--peer-ttl or more trackers (its blobs spread over them; docs/operations.md).

Agents rotate a peer at each answer, as before (agent/swarm_coordinator.py; the simulator does
the same with this function), so at a slower pace they rotate less often. Rotating every second
from the last answer instead was tried in the simulator and made the tail longer: the peers an
answer lists first are the least handed out when it is made, and 10 s later many others have
been sent to them (docs/simulator.md, finding 14).

Seeders re-announce every blob they hold so that peers keep finding them, a load that grows
with nodes x blobs, not with the rollout: 1,000 nodes holding 100 layers each, at the fixed 10 s
they used, asked 10,000 announces a second of the tracker, every second of the day. So the
tracker paces them too, to SEEDER_SHARE of the budget, from the 10 s floor up to
MAX_SEEDER_INTERVAL (BitTorrent's customary 30 minutes), and keeps each record for
RECORD_LIFETIMES of the interval it gave (tracker/peer_store.py): a seeder told to come back in
10 minutes is not dropped after the 30 s a downloader's record lives. A seeder that died is
then handed out until its record runs out; dialling it fails fast and the agent dials another.
"""

from __future__ import annotations

import math

# A downloader's announce interval when the tracker has room: the agents' floor.
ANNOUNCE_INTERVAL = 1.0
# Announces a second a tracker paces its downloaders to (TrackerConfig.announce_budget).
ANNOUNCE_BUDGET = 500.0
# The part of that budget the seeders' re-announces get, and the slowest they are paced to.
SEEDER_SHARE = 0.25
MAX_SEEDER_INTERVAL = 1800.0
# A peer's record lives this many of the intervals it was told (two announces may be lost).
RECORD_LIFETIMES = 3


class AnnounceCalendar:
    """When a tracker asks each downloader to announce again: the next free slot of a calendar
    of ``budget`` slots a second (more when the downloading records could not otherwise all
    announce within ``ceiling``), at least ANNOUNCE_INTERVAL and at most
    ``ceiling`` (a third of the peer TTL) from now. One calendar for all the tracker's blobs,
    as the budget is the tracker's."""

    __slots__ = ("_next_free", "budget", "ceiling")

    def __init__(self, budget: float = ANNOUNCE_BUDGET, ceiling: float = 10.0) -> None:
        if budget <= 0:
            raise ValueError(f"an announce budget must be positive, not {budget}")
        self.budget = budget
        self.ceiling = max(ceiling, ANNOUNCE_INTERVAL)
        self._next_free = -math.inf

    def pace(self, now: float, downloading: int) -> float:
        """Seconds until the downloader announcing at ``now`` announces again, given the
        ``downloading`` records the tracker holds (all blobs); books that slot."""
        slot = min(max(self._next_free, now + ANNOUNCE_INTERVAL), now + self.ceiling)
        # Past the ceiling every downloader comes back at it, so the slots are as close as the
        # records need to all fit (records / ceiling a second) rather than piling on it.
        self._next_free = slot + 1.0 / max(self.budget, downloading / self.ceiling)
        return slot - now


def seeder_interval(seeders: int, budget: float = ANNOUNCE_BUDGET, floor: float = 10.0) -> float:
    """The interval, in seconds, at which a tracker tracking ``seeders`` complete records (all
    blobs) asks a seeder to re-announce a blob: ``floor`` (a third of the peer TTL) while they
    fit in SEEDER_SHARE of ``budget``, else slower in proportion, at most MAX_SEEDER_INTERVAL."""
    return min(MAX_SEEDER_INTERVAL, max(floor, seeders / (budget * SEEDER_SHARE)))
