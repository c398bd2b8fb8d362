"""Limits sized by the swarm: how many pieces an agent sends at once and how many peers it
downloads from. One policy for the agent and the fleet simulator; the agent learns the swarm's
size from the tracker (the peers an announce hands back, at most 50).

Upload slots. An agent sends at most this many pieces at once over all its connections
(agent/peer_server.py, UploadSlots); the rest of the requests wait for a slot. Fewer, faster
sends get each piece across a hop sooner (store and forward: a receiver passes a piece on only
once it is whole); more sends at once keep the uplink busy when some receivers cannot take their
share. Which matters more depends on how many hops a piece travels: on the size of the swarm.

Chosen with the simulator (tight case u = d = u_origin, 200 MiB at 20 MiB/s, mean max / bound of
10 seeds, with queued requests taken over by idle peers; then 4 MiB pieces and 8 download peers
everywhere) and checked with the emulator:

    nodes           4     8     12    16    32    64    1,000 (1 GiB @ 100 MiB/s, seed 1)
    3 slots         1.14  1.48  1.57  1.60  1.75  2.01  2.42
    8 slots         1.14  1.36  1.45  1.54  1.86  2.36  2.98

Emulated, 8 nodes x 500 MiB at 20 MiB/s (netns + tbf, bound 25 s), two runs each: 3 slots 34.64
and 33.92 s, 8 slots 31.97 and 31.92 s. (Before idle peers took over queued requests, 3 slots
were the best fixed choice at every size: 8 nodes 1.60 x with 3, 1.75 x with 2, 1.43 x with no
limit, but 16 nodes 2.05 x with 3 and 2.16 x with no limit.)

Download peers. A blob is fetched from at most this many peers at once (agent/swarm.py). With
8, a large fleet's peers form a sparse graph: in the simulator (1,000 nodes x 1 GiB @ 100 MiB/s,
seed 1) most nodes had nothing to ask their 8 peers for during the first 5 s (each new piece
crosses the fleet in ~log_8(N) store-and-forward hops) and later a third of the uplinks idled
while other nodes' requests queued at busy peers; p99 2.51 x the bound. More peers shorten both:
16 -> 2.02 x, 24 -> 1.82 x, 32 -> 1.79 x, 64 -> 1.87 x (with 4 slots: 32 -> 1.71 x). In smaller
swarms more peers crowd the uploaders instead. p50 / p99 / max x bound, 8 peers against 32
(the rule of 50932d3: 32 once the tracker listed more than 16), mean of 5 seeds at 32 and 64
nodes x 200 MiB @ 20 MiB/s, of 3 at 200 x 500 MiB @ 50 MiB/s, seed 1 at 300 and 500 x 1 GiB
@ 100 MiB/s:

    nodes      32              64              200             300             500
    8 peers    1.40/1.90/1.90  1.46/1.89/1.89  1.48/1.69/1.94  1.51/1.71/1.93  1.65/1.85/1.86
    32 peers   1.86/1.92/1.92  1.91/1.99/1.99  1.79/1.87/1.88  1.63/1.78/1.81  1.66/1.75/1.82

so a swarm of at most 400 other peers keeps 8. The size is the tracker's count of the blob's
live peers, sent with every announce answer: the handout lists at most 50 of them, which cannot
tell 64 nodes from 10,000.
"""

from __future__ import annotations

UPLOAD_SLOTS = 3  # a large swarm, or one whose size is not known yet
SMALL_SWARM_UPLOAD_SLOTS = 8
SMALL_SWARM_PEERS = 16  # up to this many other peers (the crossover above is between 16 and 32)
DOWNLOAD_PEERS = 32  # a swarm of more than LARGE_SWARM_PEERS others, or of unknown size
SMALL_SWARM_DOWNLOAD_PEERS = 8
LARGE_SWARM_PEERS = 400  # (in the table above the crossover is between 300 and 500 nodes)


def upload_slots(swarm_peers: int | None) -> int:
    """Pieces to send at once, for a swarm with ``swarm_peers`` other peers (None: unknown)."""
    if swarm_peers is not None and swarm_peers <= SMALL_SWARM_PEERS:
        return SMALL_SWARM_UPLOAD_SLOTS
    return UPLOAD_SLOTS


def download_peers(swarm_peers: int | None) -> int:
    """Peers to download a blob from at once, for a swarm with ``swarm_peers`` other peers."""
    if swarm_peers is not None and swarm_peers <= LARGE_SWARM_PEERS:
        return SMALL_SWARM_DOWNLOAD_PEERS
    return DOWNLOAD_PEERS
