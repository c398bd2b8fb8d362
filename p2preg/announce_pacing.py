"""How often a downloading agent announces: paced by the tracker, so that one tracker keeps up.

A downloading agent announces its progress to get peers back (and, in swarms of more than 16
others, a peer to rotate in). Every announce of a blob goes to the one tracker its digest ranks
first (rendezvous hashing, docs/tracker.md), and an announce costs that tracker about 1 ms of
CPU with 10,000 peers in the blob's swarm (`python -m simulations.bench_tracker`: 1.04 ms, 960
announces a second on one core; the handout's sampling and ranking are half of it, HTTP the
rest). At one announce a second per downloader, a rollout to 10,000 nodes asks 10,000 a second
of it: ten times what it can answer, so every answer would wait for the backlog.

So the tracker tells each downloader how often to announce (``pace`` in the announce answer):
once a second while the downloading records it tracks, announcing that often, stay within
ANNOUNCE_BUDGET announces a second, else slower in proportion, but never slower than the
seeders' shortest interval (a third of the peer TTL), so a paced downloader is never dropped
as stale. The budget is half of
one core at the measured cost, leaving the other half for metainfo, leases, session renewals
and bursts. At 10,000 peers and the default 30 s TTL the ceiling binds (10 s): about 1,000
announces a second, the tracker's whole core; a fleet that size wants a longer --peer-ttl or
more trackers (its blobs spread over them; docs/operations.md).

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

# A downloader's announce interval when the tracker has room: the agents' floor.
ANNOUNCE_INTERVAL = 1.0
# Announces a second a tracker paces its downloaders to (TrackerConfig.announce_budget).
ANNOUNCE_BUDGET = 500.0
# The part of that budget the seeders' re-announces get, and the slowest they are paced to.
SEEDER_SHARE = 0.25
MAX_SEEDER_INTERVAL = 1800.0
# A peer's record lives this many of the intervals it was told (two announces may be lost).
RECORD_LIFETIMES = 3


def downloader_interval(
    downloading: int, budget: float = ANNOUNCE_BUDGET, ceiling: float = 10.0
) -> float:
    """The interval, in seconds, at which a tracker holding ``downloading`` records of
    downloaders (all blobs) asks a downloader to announce: ANNOUNCE_INTERVAL while that many
    announces a second fit in ``budget``, else ``downloading / budget``, at most ``ceiling``
    (a third of the peer TTL)."""
    return min(max(ceiling, ANNOUNCE_INTERVAL), max(ANNOUNCE_INTERVAL, downloading / budget))


def seeder_interval(seeders: int, budget: float = ANNOUNCE_BUDGET, floor: float = 10.0) -> float:
    """The interval, in seconds, at which a tracker tracking ``seeders`` complete records (all
    blobs) asks a seeder to re-announce a blob: ``floor`` (a third of the peer TTL) while they
    fit in SEEDER_SHARE of ``budget``, else slower in proportion, at most MAX_SEEDER_INTERVAL."""
    return min(MAX_SEEDER_INTERVAL, max(floor, seeders / (budget * SEEDER_SHARE)))
