"""Which waiting request an agent serves when one of its upload slots frees up. One policy for
the agent's peer server (agent/peer_server.py, UploadSlots) and the fleet simulator.

A lower rank is served first; equal ranks go to the request that waited longest.

1. The piece this agent has sent least often. A piece nobody has from us yet spreads the swarm;
   another copy of one we already sent can also come from the peer we sent it to.
2. In a swarm of at most ``LARGE_SWARM_PEERS`` other peers (p2preg.swarm_limits, the size the
   tracker counts): the requester that holds the fewest pieces of the blob, as its latest
   ``progress`` message says (wire protocol version 2: a downloader tells the peers it has
   requests at when its count changed, at most every 0.25 s). A rollout ends when its last
   node does; without this, a node that fell behind waits in every queue behind nodes that are
   ahead of it, and stays behind. The count is the requester's word (only authenticated cluster
   members connect): one that always says 0 is served first among equally fresh pieces, which
   gains it at most its own download rate and never a piece out of the least-sent order.

Chosen with the simulator (u = d = u_origin; p50 / p99 / max x the bound, mean of the seeds
given), least sent first, then longest waiting, against this order:

    nodes (blob @ link, seeds)     least sent, oldest   + fewest pieces held
    16   (100 MiB @ 10 MiB/s, 10)  1.33/1.55/1.55       1.40/1.50/1.50
    32   (1 GiB @ 100 MiB/s, 4)    1.30/1.49/1.49       1.39/1.40/1.40
    64   (1 GiB @ 100 MiB/s, 4)    1.29/1.83/1.83       1.23/1.48/1.48
    128  (1 GiB @ 100 MiB/s, 3)    1.37/1.84/1.92       1.31/1.39/1.40
    200  (1 GiB @ 100 MiB/s, 2)    1.43/1.79/1.94       1.35/1.48/1.49
    200, 3 zones (1 GiB, 2)        1.38/1.88/2.03       1.33/1.48/1.53
    300  (1 GiB @ 100 MiB/s, 2)    1.50/1.71/1.90       1.43/1.61/1.62
    500  (1 GiB @ 100 MiB/s, 1)    1.61/1.65/1.77       1.71/1.74/1.75
    1,000 (1 GiB @ 100 MiB/s, 1)   1.64/1.69/1.69       1.74/1.77/1.77
    1,000 (seed 2)                 1.63/1.68/1.71       1.69/1.71/1.72

With fewer, smaller pieces the gain is smaller and not everywhere (128 MiB @ 10 MiB/s, 1 MiB
pieces, mean of 5 seeds, p50 / mean max / worst max):

    nodes   least sent, oldest   + fewest pieces held
    16      1.30/1.45/1.53       1.33/1.41/1.45
    32      1.41/1.67/1.78       1.52/1.64/1.79
    64      1.52/1.70/1.75       1.54/1.76/1.94
    128     1.68/2.06/2.11       1.64/1.89/1.91
    200     1.87/2.35/2.38       1.80/2.19/2.21

and 512 MiB @ 50 MiB/s (512 pieces): 32 nodes 1.32/1.58/1.82 -> 1.42/1.44/1.47, 64 nodes
1.31/1.76/1.90 -> 1.28/1.42/1.57. Up to a few hundred nodes the slowest node of a 1 GiB rollout
gains 15-27%; the median may lose a little (16 and 32 nodes). In large swarms (32 download peers
each, p2preg.swarm_limits) the nodes that are ahead are the ones that pass new pieces on, and
serving the laggards first slows everyone; there the count is ignored. (A coarser count, in
buckets of 32 pieces, or "behind me by more than 16 pieces", gained less at 200 nodes, max 1.67
and 1.74, and about nothing at 1,000: 1.71 and 1.68.)
"""

from __future__ import annotations

from p2preg.swarm_limits import LARGE_SWARM_PEERS


def serve_neediest_first(swarm_peers: int | None) -> bool:
    """Whether requesters holding fewer pieces go first, in a swarm of ``swarm_peers`` other
    peers (None: not known yet, as in a large swarm)."""
    return swarm_peers is not None and swarm_peers <= LARGE_SWARM_PEERS


def upload_rank(times_sent: int, requester_held: int, neediest_first: bool) -> tuple[int, int]:
    """The rank of a waiting request for a piece this agent has sent ``times_sent`` times, from
    a requester holding ``requester_held`` pieces of that blob. Lower goes first."""
    return (times_sent, requester_held if neediest_first else 0)
