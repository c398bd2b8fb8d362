"""Which waiting request an agent serves when one of its upload slots frees up. One policy for
the agent's peer server (agent/peer_server.py, UploadSlots) and the fleet simulator.

A lower rank is served first; equal ranks go to the request that waited longest.

0. A requester that is not busy: one receiving fewer than ``BUSY_INCOMING_PIECES`` pieces at
   once, over all its peers (wire protocol version 3: a downloader tells the peers it has
   requests at when that changes, ``busy`` messages). Upload slots are granted by each sender
   alone, so without this some downloaders got pieces from five or six senders at once and
   split their downlink between them (each sender's flow to them ran at a fraction of its
   share, and its uplink idled) while others, their requests queued behind those, received
   nothing: the balls-into-bins shape of independent grants. In the simulator (1,000 nodes x
   1 GiB @ 100 MiB/s, seed 1) node uplinks were 67-70% busy through the rollout; max-min fair
   rates over the same flows would have made it only 70-72%: the flows were the problem, not
   their rates. Serving the requesters that are not busy first spreads the senders over the
   receivers: uplinks 84-90% busy. p50 / p99 / max x the bound:

       rank                                 1,000 nodes         10,000 nodes
       least sent (before)                  1.63/1.67/1.73      1.75/1.82/1.89
       + not busy first (>= 3 arriving)     1.32/1.39/1.68      1.46/1.50/1.57
       by pieces arriving (0, 1, 2, ...)    1.33/1.36/1.39      1.47/1.49/1.53
       busy at >= 2                         1.41/1.45/1.45
       busy at >= 4                         1.38/1.42/1.45
       busy from 3, not busy again at 1     1.39/1.42/1.44      (a fifth of the messages)

   (seed 1; the last four rows ranked by the flag as it was when the request was queued, which
   the agent does not do; docs/simulator.md, finding 9, has them all.)

   The count must be fresh: ranked by the count as it was up to 50 ms (0.25 s) earlier, the
   gain shrinks to 1.44/1.52/1.56 (1.61/1.68/1.75) at 1,000 nodes. A busy flag sent when it
   changes is as fresh as the network is fast, and changes less often than the count. In
   swarms of 16 nodes (8 upload slots each) nothing changes: 1.17/1.19/1.19 either way (100
   MiB @ 4 MiB/s, 10 seeds).
1. The piece this agent has sent least often. A piece nobody has from us yet spreads the swarm;
   another copy of one we already sent can also come from the peer we sent it to.
2. The requester that holds the fewest pieces of the blob, as its latest ``progress`` message
   says (wire protocol version 2: a downloader tells the peers it has requests at when its
   count changed, at most every 0.25 s). A rollout ends when its last
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
each, p2preg.swarm_limits) the nodes that are ahead were the ones that passed new pieces on, and
serving the laggards first slowed everyone (the last row above), so until busy requesters
waited (rank 0) the count was ignored in swarms of more than ``LARGE_SWARM_PEERS`` others. (A
coarser count, in buckets of 32 pieces, or "behind me by more than 16 pieces", gained less at
200 nodes, max 1.67 and 1.74, and about nothing at 1,000: 1.71 and 1.68.) With rank 0 it pays
there too: nodes behind were those whose requests waited at senders that served fresher pieces
first (at 1,000 nodes the slowest five were among the first hundred to start, whose peers were
the most asked-of nodes), and with receivers no longer crowded the fewest-held order catches
them up instead of slowing the leaders. p50 / p99 / max x the bound, 1 GiB @ 100 MiB/s:

    nodes (seed)           not busy, least sent   + fewest pieces held
    1,000 (1)              1.32/1.39/1.68         1.29/1.31/1.31
    1,000 (2)              1.32/1.38/1.45         1.29/1.30/1.34
    1,000, 3 zones (1)     1.26/1.62/1.91         1.26/1.39/1.45
    10,000 (1)             1.46/1.50/1.57         1.40/1.42/1.42
"""

from __future__ import annotations

# A downloader receiving this many pieces at once (from different peers) says it is busy.
BUSY_INCOMING_PIECES = 3

# A requester withdraws (Cancel) the first request it has out at a peer once that request has
# waited this many seconds there for an upload slot (since it was sent, or since the peer's
# previous piece arrived, whichever is later), with none of its payload arriving yet, and asks
# another peer for it (agent/swarm.py, Swarm._withdraw_stalled_head). The rank above has no
# ageing: fresher pieces and requesters that are not busy keep arriving ahead of a request, so
# one asked for while its piece was rare could wait until the origin had nothing new left, and
# the requests behind it on that connection with it. In the simulator (1,000 nodes x 1 GiB @
# 100 MiB/s, seed 1) slot waits had a p99 of 6.4 s; 10,000 requests reached the agent's 10 s
# piece timeout, nearly all at t = 11-12 s, each dropping a connection near the end of the
# rollout. (Ageing the rank instead, so that old requests go first, made it slower: the
# starved requests are for pieces that other peers can serve at once.) Withdrawn, the piece is
# not asked of that peer again for a while (agent/swarm.py REFUSAL_BACKOFF), like a refused one.
HEAD_PATIENCE = 1.0


def upload_rank(
    times_sent: int, requester_held: int, requester_busy: bool = False
) -> tuple[int, int, int]:
    """The rank of a waiting request for a piece this agent has sent ``times_sent`` times, from
    a requester holding ``requester_held`` pieces of that blob that said it is busy or not
    (``requester_busy``). Lower goes first."""
    return (1 if requester_busy else 0, times_sent, requester_held)
