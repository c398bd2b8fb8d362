"""Limits sized by the swarm: how many pieces an agent sends at once and how many peers it
downloads from. One policy for the agent and the fleet simulator; the agent learns the swarm's
size from the tracker (its count of the blob's live peers, in every announce answer).

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

so a swarm of at most 400 other peers kept 8 (from 17 others it now has 16: "The mid-size
swarm" below). The size is the tracker's count of the blob's live peers, sent with every
announce answer: the handout lists at most 50 of them, which cannot tell 64 nodes from 10,000.

At most 16 others: 12 peers, together with the origin fetcher refusing repeats after its fetch
too (agent/peer_server.py, super-seeding; in swarms of up to 400 others,
super_seed_after_fetch). With 8 of 15 others, only the 8 or so nodes that dialled the fetcher
got new pieces first-hand; they did the relaying (uploaded 1.06-1.35 blobs each) while the
others had little to pass on (0.25-0.94), and the busiest uplinks set the end (docs/rollouts.md,
"N = 16: where the time goes"). 12 peers reach the fetcher from nearly every node. Simulator,
mean max / bound of 10 seeds (3 for 1 GiB), 8 peers against 12 (+ the fetcher refusing repeats
after its fetch; 8 again as soon as a count passes 16):

    100 MiB @ 10 MiB/s:  8 nodes 1.19 -> 1.14, 12: 1.32 -> 1.28, 16: 1.50 -> 1.34 (1.54 -> 1.35
                         with starts spread over 1 s), 17: 1.56 -> 1.36, 20: 1.68 -> 1.57,
                         24: 1.66 -> 1.57, 32: 1.68 -> 1.61, 64: 1.73 -> 1.68
    1 GiB @ 100 MiB/s:   16 nodes 1.13 -> 1.14, 32: 1.40 -> 1.38, 64: 1.48 -> 1.51,
                         128: 1.41 -> 1.42, 1,000: 1.73 -> 1.73

15 peers (all of them) gave 16 x 100 MiB 1.40 but 16 x 1 GiB 1.20; 10 peers 1.38 and 1.11.
The count must be small at a second announce (a second after the first): in a rollout's
first second every count is small, and nodes sized by it for a swarm that then grew to 20-32
nodes made those 2-19% slower (tried with 16 peers, with and without dropping the extra
connections when the count grew).

The mid-size swarm (17 to 400 others): 16 download peers, a request withdrawn after waiting
HEAD_PATIENCE for an upload slot (head_patience), and a peer rotated at every tracker answer
(rotates_peers), as in a large swarm but with 16 peers instead of 32; from a node's second count
on. The 8 peers and neither rule, chosen above before queued requests were taken over, withdrawn
and rotated, left the mid-size swarms the slowest of all: at 64-128 nodes requests starved at
the few peers that had their pieces until the 10 s piece timeout dropped the connection (84-119
timeouts a run). Each part alone helps less (64 nodes x 100 MiB @ 10 MiB/s, mean of 5 seeds, p50
/ max x the bound, with the rules at the first count too: 8 peers 1.39 / 1.58; 16 peers 1.30 /
1.41; 16 + patience 1.24 / 1.26; 16 + rotation 1.29 / 1.40; all three 1.21 / 1.23; 32 instead of
16 1.22 / 1.24, 12 1.22 / 1.25). Not at a first count: every node of a rollout announces in its
first second and most see a fraction of the swarm, so with these rules at the first count 1,000
nodes in 3 zones (which the count puts in the large rules from the second answer) went from p99
/ max 1.23 / 1.25 to 1.27 / 1.29 (seeds 1-3: 1.22-1.23 -> 1.24-1.27); from the second count
those runs are as before to the pick. Before -> now, p50 / p99 / mean max, all nodes starting at
once:

    100 MiB @ 10 MiB/s (10 seeds at 18-24 nodes, 5 above):
      18 nodes   1.19/1.21/1.21 -> 1.23/1.24/1.24
      20 nodes   1.20/1.23/1.23 -> 1.22/1.24/1.24
      24 nodes   1.20/1.23/1.23 -> 1.21/1.22/1.22
      32 nodes   1.22/1.25/1.25 -> 1.20/1.22/1.22
      48 nodes   1.24/1.28/1.28 -> 1.21/1.22/1.22 (starts over 1 s)
      64 nodes   1.39/1.58/1.58 -> 1.22/1.24/1.24
      96 nodes   1.44/1.61/1.61 -> 1.23/1.25/1.25 (starts over 1 s)
     128 nodes   1.46/1.60/1.63 -> 1.25/1.27/1.27
    1 GiB @ 100 MiB/s (2 seeds; 256 MiB at 400 nodes):
      32 nodes   1.15/1.16/1.16 -> 1.13/1.14/1.14
      64 nodes   1.20/1.36/1.36 -> 1.13/1.14/1.14
     128 nodes   1.24/1.39/1.39 -> 1.14/1.15/1.15
     200 nodes   1.26/1.39/1.45 -> 1.15/1.16/1.16
     300 nodes   1.27/1.38/1.54 -> 1.16/1.18/1.19
     400 nodes   1.42/1.55/1.66 -> 1.33/1.35/1.37

Just above 16 others it costs 1-3% (18 and 20 nodes), from the withdrawals and rotations more
than the peers (12 peers up to 31 others: 1.24 and 1.22); a second threshold did not pay either
(the small swarm's 12 peers and neither rule up to 24 others: 18, 20 and 24 nodes 1.23, 1.25 and
1.25, against 1.24, 1.24 and 1.22 now). Starts spread over 2 s, as in docs/rollouts.md
"Staggered starts", are as before: 100 x 32 MiB @ 20 MiB/s mean max 2.42 -> 2.35, 150 x 64 MiB @
50 MiB/s 2.62 -> 2.63, 300 x 256 MiB @ 100 MiB/s (seed 4) 1.81 -> 1.82 (the bound leaves out the
2 s of starts). The tracker keeps ranking leechers by load first in these swarms
(p2preg.handout): with pieces first, as in large swarms, those three were 3.17, 4.55 and 2.22
(measured with these rules at the first count too).
"""

from __future__ import annotations

import math

from p2preg.upload_order import HEAD_PATIENCE

UPLOAD_SLOTS = 3  # a large swarm, or one whose size is not known yet
SMALL_SWARM_UPLOAD_SLOTS = 8
SMALL_SWARM_PEERS = 16  # up to this many other peers (the crossover above is between 16 and 32)
DOWNLOAD_PEERS = 32  # a swarm of more than LARGE_SWARM_PEERS others, or of unknown size
MID_SWARM_DOWNLOAD_PEERS = 16  # more than SMALL_SWARM_PEERS and up to LARGE_SWARM_PEERS others
SMALL_SWARM_DOWNLOAD_PEERS = 8  # up to SMALL_SWARM_PEERS others at a first count ...
FEW_PEERS_DOWNLOAD_PEERS = 12  # ... and at a later one
LARGE_SWARM_PEERS = 400  # (in the table above the crossover is between 300 and 500 nodes)

# The origin fetcher refuses a piece it already sent to another peer that is still connected
# (super-seeding, agent/peer_server.py), but to each asker only for this many seconds after it
# first refused it that piece: then it serves it. The refusal assumes the first receiver passes
# the piece on to the asker, which holds only if the asker downloads from it, or from someone
# who does. A receiver nobody downloads from kept it to itself, and everyone else was refused
# it for as long as that receiver stayed connected: 300 nodes x 256 MiB @ 100 MiB/s with starts
# spread over 2 s stalled from t = 3.5 s with 41% of the pieces held, no piece moving, until
# the origin lease expired and another node fetched the blob again (p50 29x the bound). A hold
# bounds that stall. Refusing each asker only once cost the smallest swarms 1-4% (16 nodes x
# 100 MiB @ 10 MiB/s: 1.19 -> 1.23x the bound, mean max of 10 seeds), and so did a 2 s hold
# where a piece takes a second per upload slot (the emulator's 16 x 100 MiB @ 4 MiB/s, 512 KiB
# pieces: 1.19 -> 1.25x, 6 seeds); held 5 s or 10 s, both are as before (1.19).
SUPER_SEED_HOLD = 5.0

# A request withdrawn for waiting for an upload slot (head_patience) has waited at least this
# many times as long as a piece takes to arrive (the downloader's running mean, weighted
# PIECE_TIME_WEIGHT per new piece). HEAD_PATIENCE's 1 s was chosen at 100 MiB/s, where a 2 MiB
# piece takes 0.06 s through one of a sender's slots. At 1 MiB/s a 512 KiB piece takes 1.5 s,
# so waiting a second for a slot is the rule, not starvation: with real processes (32 nodes x
# 50 MiB @ 1 MiB/s) the 1 s patience withdrew 13,603 requests, 238 of them crossed their piece
# on the wire (7.7% of the bytes twice), and the rollout took 1.61-1.68x the bound; with 3 s,
# 3,411 withdrawals, 63 duplicates, 1.53x (the simulator predicted 1.51-1.53x for 3 s); with
# this rule, 2,740, 57 and 1.55x (the machine 95% busy). At 100 MiB/s it changes nothing.
PATIENCE_PIECE_TIMES = 2.0
PIECE_TIME_WEIGHT = 0.2


def super_seed_after_fetch(swarm_peers: int | None) -> bool:
    """Whether the agent that fetched a blob from the origin keeps refusing repeats after its
    fetch (agent/peer_server.py), for a swarm with ``swarm_peers`` other peers. Not in a large
    swarm: few of its nodes connect to the fetcher, and there it made the tails of 1,000 nodes
    in 3 zones worse (p99 1.75 -> 1.81, 1.78 -> 1.79, 1.80 -> 1.81, seeds 1-3)."""
    return swarm_peers is not None and swarm_peers <= LARGE_SWARM_PEERS


def upload_slots(swarm_peers: int | None) -> int:
    """Pieces to send at once, for a swarm with ``swarm_peers`` other peers (None: unknown)."""
    if swarm_peers is not None and swarm_peers <= SMALL_SWARM_PEERS:
        return SMALL_SWARM_UPLOAD_SLOTS
    return UPLOAD_SLOTS


def download_peers(swarm_peers: int | None, previous: int | None = None) -> int:
    """Peers to download a blob from at once, for a swarm with ``swarm_peers`` other peers now
    and ``previous`` at the announce before (None: this is the first)."""
    if swarm_peers is None or swarm_peers > LARGE_SWARM_PEERS:
        return DOWNLOAD_PEERS
    if previous is None:
        # A rollout's first count: every node announces in the same second, so most see a
        # fraction of the swarm ("The mid-size swarm" below).
        return SMALL_SWARM_DOWNLOAD_PEERS
    if swarm_peers > SMALL_SWARM_PEERS:
        return MID_SWARM_DOWNLOAD_PEERS
    return FEW_PEERS_DOWNLOAD_PEERS


def head_patience(swarm_peers: int | None, previous: int | None = None) -> float:
    """Seconds a request of ours may wait at a peer for an upload slot before we withdraw it
    and ask another peer (p2preg.upload_order.HEAD_PATIENCE; inf: never), for a swarm with
    ``swarm_peers`` other peers now and ``previous`` at the announce before (None: unknown,
    taken as large, as download_peers does; the first count). Not in a swarm of at most
    SMALL_SWARM_PEERS others, where a node downloads from most of the swarm and has nowhere
    better to ask; from 17 others from the second count on (see "The mid-size swarm" above).
    The agent and the simulator wait longer where pieces arrive slowly (patience_for)."""
    if swarm_peers is None or swarm_peers > LARGE_SWARM_PEERS:
        return HEAD_PATIENCE
    if previous is not None and swarm_peers > SMALL_SWARM_PEERS:
        return HEAD_PATIENCE
    return math.inf


def patience_for(patience: float, piece_seconds: float) -> float:
    """head_patience's ``patience``, but at least PATIENCE_PIECE_TIMES times ``piece_seconds``,
    the time a piece takes to arrive (0: none arrived yet). Never (inf) stays never."""
    return max(patience, PATIENCE_PIECE_TIMES * piece_seconds)


def piece_seconds_after(mean: float, seconds: float) -> float:
    """The running mean of how long a piece takes to arrive, ``mean`` (0: none yet), after a
    piece that took ``seconds``."""
    return seconds if mean <= 0 else mean + PIECE_TIME_WEIGHT * (seconds - mean)


def rotates_peers(swarm_peers: int | None, previous: int | None = None) -> bool:
    """Whether an agent at its download-peer limit swaps one peer for another at every tracker
    answer (p2preg.peer_rotation), for a swarm with ``swarm_peers`` other peers now and
    ``previous`` at the announce before (None: unknown, taken as large; the first count).
    Where head_patience withdraws requests, as it drops a peer where ours were withdrawn."""
    return head_patience(swarm_peers, previous) < math.inf
