"""Fleet rollout simulator: one blob to N nodes, flow by flow, driven by the real policies.

    p2preg simulate --nodes 10000 --blob-size 1GiB --node-bandwidth 100MiB \
        --origin-bandwidth 100MiB --seed 1 [--zones 4 --inter-zone-bandwidth 1GiB] [--json FILE]

A discrete-event, flow-level model (docs/simulator.md has the whole story):

* Every node's piece choices come from :class:`p2preg.piece_picker.PiecePicker` and every announce
  is answered by :func:`p2preg.handout.choose_peers` on the candidates of a
  :class:`p2preg.handout.PeerTiers` (the tracker's sampled tiers) with a
  :class:`p2preg.handout.HandoutLoad`, imported, so a better policy shows up here and in the agent
  alike. Both are injectable (``Simulator(config, picker_factory=..., handout=...)``).
* The origin holds every piece and has only upload capacity. The first node takes the origin-fetch
  lease and streams the blob from the origin in order; the others announce to the tracker, dial up
  to ``download_peers(swarm size)`` of the peers it hands out (p2preg.swarm_limits; extra
  connections dropped when the swarm grows past a limit) and request pieces, up to 8 MiB in
  flight per peer. A node whose
  swarm made no progress for the stall timeout takes the lease once it expires (holder dead or
  done) and streams the rest from the origin.
* As the agent's peer server: a node sends at most ``upload_slots(swarm size)`` pieces at once
  (p2preg.swarm_limits) in p2preg.upload_order (requesters that are not busy receiving from
  others first, then the least-sent piece, then the requester holding fewest pieces, then the
  longest waiting request), and the
  origin fetcher refuses a piece it already sent to a peer that is still connected
  (super-seeding, during and after its fetch); refused requesters back off. A peer a node asks
  nothing of takes over its requests queued behind another elsewhere
  (p2preg.piece_picker.queued_to_take_over).
* A piece being sent is one fluid flow. Its rate is the smallest of its equal share of the
  receiver's download and of the zone pair's link, and its water-filled share of the sender's
  upload (local: a change re-rates only the flows of the nodes it touches).
* Events are processed in time order; everything that happens within ``batch_window`` of the first
  event of a batch is done before the touched flows are re-rated and refilled once.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import math
import random
import sys
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from heapq import heappush
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol, TextIO, cast

from p2preg.announce_pacing import ANNOUNCE_BUDGET, ANNOUNCE_INTERVAL, AnnounceCalendar
from p2preg.errors import ConfigError
from p2preg.handout import (
    HANDOUT_SAMPLE,
    HandoutLoad,
    PeerRecord,
    PeerTiers,
    Requester,
    choose_peers,
)
from p2preg.metainfo import (
    MAX_BLOB_SIZE,
    MAX_PIECE_LENGTH,
    MIN_PIECE_LENGTH,
    piece_count,
    piece_length_for,
)
from p2preg.peer_rotation import only_source, peer_to_dial, peer_to_drop, rotations_at_answer
from p2preg.piece_picker import PiecePicker, queued_to_take_over
from p2preg.swarm_limits import (
    DOWNLOAD_PEERS,
    SUPER_SEED_HOLD,
    download_peers,
    head_patience,
    patience_for,
    piece_seconds_after,
    rotates_peers,
    super_seed_after_fetch,
    upload_slots,
)
from p2preg.units import format_size, parse_duration, parse_size
from p2preg.upload_order import BUSY_INCOMING_PIECES, upload_rank
from simulations.sim_bounds import kumar_ross_bound, zone_bound
from simulations.sim_fast import FastShuffleRandom, PieceSet, install_piece_sets

# The agent's and tracker's constants and defaults (tests/unit/test_simulator.py checks that
# they still agree with agent/swarm.py, agent/peer_server.py, agent/swarm_coordinator.py and
# p2preg/config.py).
MAX_IN_FLIGHT = 8  # requests in flight per peer (agent/swarm.py) ...
MAX_IN_FLIGHT_BYTES = 8 * 1024 * 1024  # ... and at most this many bytes of them
MAX_CONNECTIONS = 512  # connections a peer server accepts (agent/peer_server.py)
REFUSAL_BACKOFF = 0.5  # a refused piece is not asked of that peer again this long (swarm.py)
REDIAL_BACKOFF = 2.0  # seconds before an address is dialled again (agent/swarm.py)
LEASE_RENEW_INTERVAL = 2.0  # agent/swarm_coordinator.py
HANDOUT_LIMIT = 50  # TrackerConfig.max_peers
PEER_TTL = 30.0  # TrackerConfig.peer_ttl
LEASE_TTL = 10.0  # TrackerConfig.lease_ttl
LOAD_HALF_LIFE = 10.0  # TrackerConfig.load_half_life
STALL_TIMEOUT = 3.0  # AgentConfig.swarm_stall_timeout
PIECE_TIMEOUT = 10.0  # AgentConfig.piece_timeout
STALL_POLL = 0.1  # the agent checks for a stalled swarm this often
DEFAULT_PICK_COUNT = 16  # pieces asked of the picker per call
DEFAULT_BATCH_WINDOW = 1e-3  # seconds of events merged into one batch
MAX_STUCK_BATCHES = 100_000  # batches in a row at one instant before the loop calls it a livelock
MAX_PIECES = 1 << 16  # simulation size limits (memory: ~130 bytes per node-piece, in all)
MAX_NODE_PIECES = 10**9
_INF = math.inf

PickerFactory = Callable[[int, random.Random], PiecePicker]


class HandoutPolicy(Protocol):
    """The tracker's handout (p2preg.handout.choose_peers) or a stand-in for it."""

    def __call__(
        self,
        candidates: Sequence[PeerRecord],
        requester: Requester,
        limit: int,
        rng: random.Random,
        load: Mapping[bytes, float],
        swarm_peers: int | None = None,
    ) -> list[PeerRecord]: ...


def default_picker(num_pieces: int, rng: random.Random) -> PiecePicker:
    return PiecePicker(num_pieces, rng=rng)


@dataclass(frozen=True, slots=True)
class SimConfig:
    nodes: int
    blob_size: int
    node_upload: float  # bytes per second
    node_download: float
    origin_upload: float
    piece_length: int = 0  # 0: by the blob's size, as the agent (metainfo.piece_length_for)
    zones: int = 1
    inter_zone: float | None = None  # per ordered zone pair (a -> b); None: unlimited
    fail_fraction: float = 0.0
    fail_window: float | None = None  # failures uniform in [0, this]; None: the bound
    start_spread: float = 0.0  # node start times uniform in [0, this]
    # Each node's start time, given (the emulator's drawn offsets, for its prediction); when
    # set, start_spread is not drawn from.
    start_times: tuple[float, ...] = ()
    seed: int = 0
    # Model knobs (docs/simulator.md): pieces asked of the picker per call, events merged into
    # one batch.
    pick_count: int = DEFAULT_PICK_COUNT
    batch_window: float = DEFAULT_BATCH_WINDOW
    # Records ranked per handout tier: the tracker's StoreLimits.handout_sample (0: all; for
    # experiments only, the tracker always samples).
    handout_sample: int = HANDOUT_SAMPLE
    max_time: float | None = None  # stop here (None: 100 x the bound + 600 s)
    fail_nodes: tuple[tuple[int, float], ...] = ()  # (node, time) failures on top of the fraction
    # What-ifs, not the agent (the defaults are the agent's): download connections per node
    # (0: by the swarm's size, as the agent: p2preg.swarm_limits.download_peers), and dropping
    # a peer that had nothing for us (no request, nothing to pick) for this long to dial
    # another (0: never, as the agent).
    max_peers: int = 0
    replace_idle: float = 0.0
    # What-if: seconds a head request waits for a slot before its requester withdraws it
    # (inf: never; None: by the swarm's size, as the agent: p2preg.swarm_limits.head_patience).
    head_patience: float | None = None
    # What-if: whether nodes at their peer limit swap one peer a second (None: by the swarm's
    # size, as the agent: p2preg.swarm_limits.rotates_peers).
    rotate_peers: bool | None = None
    # The tracker's TrackerConfig.announce_budget: announces a second it paces the downloaders
    # to (p2preg.announce_pacing.AnnounceCalendar).
    announce_budget: int = int(ANNOUNCE_BUDGET)
    # Seconds of the tracker's time a node's start takes (POST /v1/start: the metainfo, the
    # lease, an announce; `python -m simulations.bench_tracker --storm --warm-sessions`
    # measured 1.4-1.5 ms, 2.6 ms as the three calls of before; 2.55 ms with a session to open
    # first), answered in the order asked by one tracker; 0: answered at once.
    tracker_start_cost: float = 0.0

    def __post_init__(self) -> None:
        if self.piece_length == 0:
            object.__setattr__(self, "piece_length", piece_length_for(self.blob_size))

    def validate(self) -> None:
        if self.nodes < 1:
            raise ConfigError("--nodes must be at least 1")
        if not 0 < self.blob_size <= MAX_BLOB_SIZE:
            raise ConfigError("--blob-size must be more than 0 and at most 1TiB")
        if not MIN_PIECE_LENGTH <= self.piece_length <= MAX_PIECE_LENGTH or (
            self.piece_length & (self.piece_length - 1)
        ):
            raise ConfigError("--piece-length must be a power of two, 64KiB..64MiB")
        pieces = piece_count(self.blob_size, self.piece_length)
        if pieces > MAX_PIECES or self.nodes * pieces > MAX_NODE_PIECES:
            raise ConfigError(
                f"{self.nodes} nodes x {pieces} pieces is too large to simulate "
                f"(at most {MAX_PIECES} pieces and {MAX_NODE_PIECES:.0e} node-pieces)"
            )
        for name, value in (
            ("--node-upload", self.node_upload),
            ("--node-download", self.node_download),
            ("--origin-bandwidth", self.origin_upload),
        ):
            if not value > 0:
                raise ConfigError(f"{name} must be larger than zero")
        if not 1 <= self.zones <= self.nodes:
            raise ConfigError("--zones must be between 1 and --nodes")
        if self.inter_zone is not None and not self.inter_zone > 0:
            raise ConfigError("--inter-zone-bandwidth must be larger than zero")
        if not 0.0 <= self.fail_fraction < 1.0:
            raise ConfigError("--fail-fraction must be at least 0 and less than 1")
        if self.fail_window is not None and not self.fail_window > 0:
            raise ConfigError("--fail-window must be larger than zero")
        if any(not 0 <= node < self.nodes or not at >= 0 for node, at in self.fail_nodes):
            raise ConfigError("fail_nodes: (node, time) with 0 <= node < nodes and time >= 0")
        if self.start_spread < 0:
            raise ConfigError("--start-spread must not be negative")
        if self.start_times and (
            len(self.start_times) != self.nodes
            or not all(0 <= at < math.inf for at in self.start_times)
        ):
            raise ConfigError("start_times: one finite time >= 0 per node")
        if self.pick_count < 1:
            raise ConfigError("--pick-count must be at least 1")
        if self.batch_window < 0:
            raise ConfigError("--batch-window must not be negative")
        if not 0 <= self.max_peers <= MAX_CONNECTIONS:
            raise ConfigError(f"--max-peers must be between 0 (auto) and {MAX_CONNECTIONS}")
        if self.replace_idle < 0:
            raise ConfigError("--replace-idle must not be negative")
        if self.head_patience is not None and not self.head_patience > 0:
            raise ConfigError("head_patience must be larger than zero")
        if self.handout_sample != 0 and self.handout_sample < HANDOUT_LIMIT:
            raise ConfigError(f"handout_sample must be 0 (all) or at least {HANDOUT_LIMIT}")
        if self.announce_budget < 1:
            raise ConfigError("--announce-budget must be at least 1")
        if not 0 <= self.tracker_start_cost < math.inf:
            raise ConfigError("--tracker-start-cost must be a duration of at least 0")


# -- state ---------------------------------------------------------------------------------------


class _Node:
    __slots__ = (
        "addr_index",
        "addresses",
        "alive",
        "arriving",
        "died_at",
        "done_at",
        "down",
        "downloads",
        "endgame",
        "failed_at",
        "fan",
        "fetcher",
        "handed",
        "have",
        "index",
        "last_progress",
        "n_down",
        "n_up",
        "next_announce",
        "next_handout",
        "origin_conn",
        "patience",
        "peer_id",
        "peer_limit",
        "picker",
        "piece_seconds",
        "rated_down",
        "rated_up",
        "read_pos",
        "record",
        "rotates",
        "sending",
        "sent",
        "served",
        "share",
        "slot_limit",
        "slots",
        "stamp",
        "started",
        "swarm_count",
        "swarming",
        "up",
        "uploads",
        "waiters",
        "wake_at",
        "zone",
    )

    def __init__(self, index: int, zone: int, up: float, down: float, picker: PiecePicker) -> None:
        self.index = index
        self.peer_id = index.to_bytes(16, "big", signed=True)
        self.zone = zone
        self.up = up
        self.down = down
        self.alive = True
        self.started = False
        self.swarming = False  # downloads from peers (every node but a plain lease holder)
        self.died_at: float | None = None
        self.done_at: float | None = None
        self.picker = picker  # a shared empty placeholder until the node starts
        self.have = PieceSet(0)
        # Its downloaders as _deliver's HAVE fan-out reads them (_fan_out; None: rebuild).
        self.fan: _FanOut | None = None
        self.read_pos = 0  # = picker.first_missing(), kept incrementally
        self.endgame = False
        self.uploads: dict[_Conn, None] = {}  # connections this node serves
        self.downloads: dict[int, _Conn] = {}  # peer index -> connection we download on
        self.origin_conn: _Conn | None = None
        self.fetcher = False  # it fetched the blob from the origin (held the lease): super-seeds
        self.swarm_count: int | None = None  # the tracker's count at its last announce
        self.n_up = 0  # active flows out
        self.n_down = 0  # active flows in
        # Pieces arriving from peers at once: at BUSY_INCOMING_PIECES it is busy, and its
        # requests wait behind those of requesters that are not (p2preg.upload_order).
        self.arriving = 0
        self.share = down  # down / n_down: each flow's equal share of the download (_cap)
        self.rated_up = 0  # n_up when this node's flows were last re-rated
        self.rated_down = 0
        self.peer_limit = download_peers(None)  # resized at every announce, as the agent's
        self.addresses: list[int] = []  # handed-out peers, first seen first (as the agent)
        self.addr_index: set[int] = set()
        self.failed_at: dict[int, float] = {}
        self.next_announce = 0.0  # its next progress announce (at the tracker's pace)
        self.next_handout = 0.0
        self.wake_at = math.inf
        self.last_progress = 0.0
        self.record: PeerRecord | None = None
        self.stamp = 0
        # The peer server (agent/peer_server.py): free upload slots, the connections whose
        # head request waits for one (-> when it started waiting, for the order), how often
        # each piece was sent, and to whom each piece was last sent (super-seeding).
        self.slot_limit = upload_slots(None)  # resized at every announce, as the agent's
        # How long its requests wait for a slot before it withdraws them (resized likewise).
        self.patience = head_patience(None)
        self.piece_seconds = 0.0  # how long a piece takes to arrive (running mean; 0: none yet)
        self.rotates = rotates_peers(None)  # swaps a peer at every tracker answer (resized too)
        self.handed: list[int] = []  # the tracker's last answer (node indexes)
        self.slots = self.slot_limit  # free ones (below zero after a resize down)
        self.sending: list[_Conn] = []  # active flows out (at most slot_limit)
        # The connections whose head request waits for a slot (arrival and tie-break:
        # _Conn.wait_order), in no particular order: _grant ranks them as they are then.
        self.waiters: dict[_Conn, None] = {}
        self.sent = bytearray(0)
        self.served: list[_Conn | None] = []  # per piece (allocated when the node starts)


# A node's downloaders for the HAVE fan-out: a gather of their want flags, and the connections.
_FanOut = tuple[Callable[[bytearray], tuple[int, ...]], tuple["_Conn", ...]]


class _Link:
    """Traffic from one zone to another: capacity shared by the active flows on it."""

    __slots__ = ("cap", "conns", "n", "rated_n", "share", "stamp")

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.n = 0
        self.share = cap  # cap / n: each flow's equal share (_cap)
        self.rated_n = 0
        self.conns: dict[_Conn, None] = {}
        self.stamp = 0


class _Conn:
    __slots__ = (
        "active",
        "delivered",
        "delivered_at",
        "dry",
        "dst",
        "due",
        "last",
        "link",
        "open",
        "queue",
        "rate",
        "refused",
        "refused_here",
        "remaining",
        "req_at",
        "src",
        "stamp",
        "started",
        "stash",
        "tdue",
        "ver",
        "wait_order",
        "wait_serial",
        "waiting",
        "withdrawn",
    )

    def __init__(self, src: _Node, dst: _Node, link: _Link | None) -> None:
        self.src = src
        self.dst = dst
        self.link = link
        self.queue: list[int] = []  # requested pieces; the head is being sent
        self.req_at: list[float] = []  # when each was requested
        self.stash: list[int] = []  # picked but not yet requested, last = next
        self.remaining = 0.0  # bytes of the head piece still to send
        self.rate = 0.0
        self.last = 0.0  # when ``remaining`` was last brought up to date
        self.started = 0.0  # when the head piece began to be sent
        self.ver = 0  # bumps when the pending completion event is replaced or cancelled
        self.due = math.inf  # when the pending completion event fires (inf: none)
        self.tdue = math.inf  # when its pending timeout check fires (inf: none pending)
        self.active = False  # its head piece is being sent (holds an upload slot)
        self.waiting = False  # its head request waits for an upload slot, since ...
        # ... since when, and a random tie-break for requests queued at the same moment: the
        # order among waiters of equal rank (_send, _grant)
        self.wait_order = (0.0, 0.0)
        self.wait_serial = 0  # bumps when a head starts waiting (its _WITHDRAW event's version)
        self.open = True
        self.dry = False  # the last pick found nothing more to ask this peer
        self.refused: dict[int, float] = {}  # piece -> when this peer refused it
        # Super-seeding at its sender: piece -> when the sender first refused it on this
        # connection (it serves it SUPER_SEED_HOLD later; p2preg.swarm_limits).
        self.refused_here: dict[int, float] = {}
        self.delivered_at = 0.0  # when it last delivered a piece (or connected)
        # Since the last rotation (Simulator._rotate): pieces delivered, requests withdrawn.
        self.delivered = 0
        self.withdrawn = 0
        self.stamp = 0


# event kinds
_PIECE, _TIMEOUT, _FAIL, _START, _LEASE, _SWEEP, _WAKE, _REFILL, _WITHDRAW = range(9)


@dataclass(slots=True)
class SimResult:
    config: SimConfig
    bound_s: float
    zone_bound_s: float | None
    completion_s: list[float | None]  # per node, from the rollout start; None: failed
    alive: list[bool]  # per node: survived the rollout
    failed: int
    incomplete: int  # survivors that had not finished at the end (max_time or a deadlock)
    origin_bytes: int
    peer_bytes: int
    inter_zone_bytes: int  # peer bytes that crossed from one zone to another
    origin_egress: list[tuple[float, int]]  # (seconds, cumulative origin bytes), per piece
    end_s: float
    stats: dict[str, int]
    picker: str
    handout: str

    def percentile(self, q: float) -> float:
        """Over the surviving nodes; one that never finished counts as infinitely late."""
        times = sorted(
            math.inf if t is None else t
            for t, alive in zip(self.completion_s, self.alive, strict=True)
            if alive
        )
        if not times:
            return math.nan
        rank = max(0, math.ceil(q / 100 * len(times)) - 1)
        return times[rank]

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        p50, p90, p99, top = (self.percentile(q) for q in (50, 90, 99, 100))
        out: dict[str, Any] = {
            "nodes": cfg.nodes,
            "surviving": cfg.nodes - self.failed,
            "failed": self.failed,
            "incomplete": self.incomplete,
            "blob_bytes": cfg.blob_size,
            "piece_length": cfg.piece_length,
            "pieces": piece_count(cfg.blob_size, cfg.piece_length),
            "bound_s": self.bound_s,
            "p50_s": _finite(p50),
            "p90_s": _finite(p90),
            "p99_s": _finite(p99),
            "max_s": _finite(top),
            "ratio_p50": _finite(p50 / self.bound_s),
            "ratio_p90": _finite(p90 / self.bound_s),
            "ratio_p99": _finite(p99 / self.bound_s),
            "ratio_max": _finite(top / self.bound_s),
            "origin_bytes": self.origin_bytes,
            "origin_copies": self.origin_bytes / cfg.blob_size,
            "peer_bytes": self.peer_bytes,
            "inter_zone_bytes": self.inter_zone_bytes,
            "origin_egress": [[t, b] for t, b in self.origin_egress],
            "links": {
                "node_upload": cfg.node_upload,
                "node_download": cfg.node_download,
                "origin_upload": cfg.origin_upload,
                "inter_zone": cfg.inter_zone,
                "inter_zone_model": "per ordered zone pair (a->b), full duplex",
            },
            "zones": cfg.zones,
        }
        if self.zone_bound_s is not None:
            out["zone_bound_s"] = self.zone_bound_s
            for name, value in (("p50", p50), ("p90", p90), ("p99", p99), ("max", top)):
                out[f"zone_ratio_{name}"] = _finite(value / self.zone_bound_s)
        out.update(
            {
                "end_s": self.end_s,
                "seed": cfg.seed,
                "policies": {"picker": self.picker, "handout": self.handout},
                "model": {
                    "pick_count": cfg.pick_count,
                    "batch_window_s": cfg.batch_window,
                    "handout_sample": cfg.handout_sample,
                    "fail_fraction": cfg.fail_fraction,
                    "max_peers": cfg.max_peers,
                    "replace_idle_s": cfg.replace_idle,
                    "start_spread_s": max(cfg.start_times, default=cfg.start_spread),
                    "announce_budget": cfg.announce_budget,
                    "tracker_start_cost_s": cfg.tracker_start_cost,
                },
                "stats": self.stats,
                "completion_s": self.completion_s,
            }
        )
        return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- the simulator -------------------------------------------------------------------------------


class Simulator:
    def __init__(
        self,
        config: SimConfig,
        *,
        picker_factory: PickerFactory = default_picker,
        handout: HandoutPolicy = choose_peers,
        progress: TextIO | None = None,
    ) -> None:
        config.validate()
        self.cfg = config
        self.picker_factory = picker_factory
        self.handout = handout
        self.progress = progress
        self.report_every = 0.5  # seconds of wall time between progress lines
        self.rng = random.Random(config.seed)
        # Skip picks whose answer is known (see _deliver) only for the stock pick, whose
        # contract tests/unit/test_simulator.py checks; a policy under test is always asked.
        self.dry_shortcut = _stock_pick(picker_factory)
        # Likewise, a piece that arrives for the one request of it in flight goes straight to
        # the stock picker's mark_have (see _deliver) only when its bookkeeping is the stock's.
        self.lone_arrival = _stock_bookkeeping(picker_factory)
        # Likewise, a slot's waiters are compared on the rank's fields directly (see _grant)
        # only while upload_rank orders as that tuple does; a rank under test is always called.
        self.flat_rank = rank_order_holds()
        self.policy_rng = FastShuffleRandom(self.rng.getrandbits(64))
        self.order_rng = random.Random(self.rng.getrandbits(64))
        self.order_random = self.order_rng.random  # a slot race's tie-break (_send)
        self.num_pieces = piece_count(config.blob_size, config.piece_length)
        # requests in flight per peer, as agent/swarm.py bounds them
        self.depth = max(1, min(MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES // config.piece_length))
        self.piece_size = [
            min(config.piece_length, config.blob_size - i * config.piece_length)
            for i in range(self.num_pieces)
        ]
        self.piece_bytes = [float(size) for size in self.piece_size]
        self.known = PieceSet(self.num_pieces)  # published piece hashes (shared by all)
        # want[i][k] = 1: node k holds or has requested piece i (it is not fresh there). Piece
        # by piece, so a HAVE's fan-out reads its downloaders' flags in one C call (_fan_out);
        # the last byte is always 1 (a downloader that never wants: see _fan_out).
        self.want = [bytearray(config.nodes) + b"\x01" for _ in range(self.num_pieces)]
        # Piece i's digit in a node's ``held`` (_availability): a byte per piece, two if a node
        # may have 256 peers or more (--max-peers), whose sum would carry into the next digit.
        self.held_width = 1 if max(config.max_peers, DOWNLOAD_PEERS) < 256 else 2
        self.held_digit = [1 << (8 * self.held_width * i) for i in range(self.num_pieces)]
        # The pieces each node holds as the digits of one integer, 1 per piece held, by node
        # index; the origin's (index -1) is the last (_availability).
        self.held = [0] * config.nodes + [sum(self.held_digit)]
        placeholder = PiecePicker(0)
        self.nodes = [
            _Node(i, i % config.zones, config.node_upload, config.node_download, placeholder)
            for i in range(config.nodes)
        ]
        if config.max_peers:
            for node in self.nodes:
                node.peer_limit = config.max_peers
        self.origin = _Node(-1, -1, config.origin_upload, 0.0, placeholder)
        for i in range(self.num_pieces):
            self.origin.have.add(i)
        self.origin.have.size = self.num_pieces
        self.links: dict[tuple[int, int], _Link] = {}
        if config.inter_zone is not None and config.zones > 1:
            for a in range(config.zones):
                for b in range(config.zones):
                    if a != b:
                        self.links[(a, b)] = _Link(config.inter_zone)
        uploads = [n.up for n in self.nodes]
        downloads = [n.down for n in self.nodes]
        self.bound = kumar_ross_bound(config.blob_size, config.origin_upload, uploads, downloads)
        self.zone_bound: float | None = None
        if config.zones > 1:
            self.zone_bound = zone_bound(
                config.blob_size,
                config.origin_upload,
                uploads,
                downloads,
                [n.zone for n in self.nodes],
                config.inter_zone,
            )
        # tracker state: the records, bucketed as the tracker keeps them
        self.tiers = PeerTiers()
        self.load = HandoutLoad(LOAD_HALF_LIFE)
        self.calendar = AnnounceCalendar(config.announce_budget, PEER_TTL / 3)
        self.addr = [f"node-{i}" for i in range(config.nodes)]
        self.zone_names = [f"zone-{z}" for z in range(config.zones)]
        # lease
        self.lease_holder: _Node | None = None
        self.lease_since = 0.0
        self.lease_expires = math.inf
        self.lease_check_pending = False
        self.tracker_free = 0.0  # when the tracker has answered every start call queued so far
        # event queue and batch state
        # The event queue: a heap of distinct times (floats compare fast) and, per time, its
        # events in the order they were scheduled: (kind, object, version).
        self.times: list[float] = []
        self.slots: dict[float, list[tuple[int, Any, int]]] = {}
        self.now = 0.0
        self.refill: dict[_Conn, None] = {}
        self.dirty: dict[_Node, None] = {}
        self.fresh: list[_Conn] = []  # flows activated in this batch (rate still 0)
        self.dirty_links: dict[_Link, None] = {}
        self.dial: dict[_Node, None] = {}
        self.stamp = 0
        self.grant: dict[_Node, None] = {}  # senders with a free slot and waiters
        self.remaining_nodes = config.nodes  # alive and not complete
        self.origin_bytes = 0
        self.origin_pieces = 0
        self.origin_egress: list[tuple[float, int]] = [(0.0, 0)]
        self.peer_bytes = 0
        self.inter_zone_bytes = 0
        self.stats = {
            "events": 0,
            "batches": 0,
            "picks": 0,
            "handouts": 0,
            "dials": 0,
            "dial_failures": 0,
            "timeouts": 0,
            "rate_updates": 0,
            "lease_takeovers": 0,
            "duplicates": 0,
            "refusals": 0,
            "replaced": 0,
            "taken_over": 0,
            "withdrawn": 0,
            "rotated": 0,
            "pieces": 0,
        }

    # -- scheduling ------------------------------------------------------------------------------

    def _push(self, at: float, kind: int, obj: Any, ver: int = 0) -> None:
        slot = self.slots.get(at)
        if slot is None:
            self.slots[at] = [(kind, obj, ver)]
            heapq.heappush(self.times, at)
        else:
            slot.append((kind, obj, ver))

    def _schedule(self, c: _Conn, now: float) -> None:
        """Make sure an event fires no later than the head piece's completion at the current
        rate (``remaining`` and ``last`` are up to date at ``now``).

        Lazily: if the pending event fires earlier than the new finish (the rate went down), it
        stays, and ``_loop`` re-checks and re-schedules when it fires. Only a finish earlier
        than the pending event needs a new one; this halves the heap traffic of re-rating.
        """
        finish = now + c.remaining / c.rate
        if finish < c.due:
            ver = c.ver = c.ver + 1
            c.due = finish
            slot = self.slots.get(finish)
            if slot is None:
                self.slots[finish] = [(_PIECE, c, ver)]
                heapq.heappush(self.times, finish)
            else:
                slot.append((_PIECE, c, ver))

    def _wake(self, node: _Node, at: float) -> None:
        if at < node.wake_at:
            node.wake_at = at
            self._push(at, _WAKE, node)

    # -- running ---------------------------------------------------------------------------------

    def run(self) -> SimResult:
        cfg = self.cfg
        rng = self.rng
        starts = [0.0] * cfg.nodes
        if cfg.start_times:
            starts = list(cfg.start_times)
        elif cfg.start_spread > 0:
            starts = [0.0] + [rng.uniform(0, cfg.start_spread) for _ in range(cfg.nodes - 1)]
        for node, at in zip(self.nodes, starts, strict=True):
            self._push(at, _START, node)
        failing = round(cfg.fail_fraction * cfg.nodes)
        window = cfg.fail_window if cfg.fail_window is not None else self.bound
        for index in rng.sample(range(cfg.nodes), failing):
            self._push(rng.uniform(0, window), _FAIL, self.nodes[index])
        for index, at in cfg.fail_nodes:
            self._push(at, _FAIL, self.nodes[index])
        self._push(ANNOUNCE_INTERVAL, _SWEEP, None)
        max_time = cfg.max_time if cfg.max_time is not None else 100 * self.bound + 600
        # The run allocates millions of short-lived tuples and lists next to ~10^5 long-lived
        # objects; the cyclic GC's passes over the latter cost 10-20% and find almost nothing
        # (closed connections are the only cycles, collected when it is switched back on).
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._loop(max_time)
        finally:
            if was_enabled:
                gc.enable()
        completion = [n.done_at if n.alive else None for n in self.nodes]
        alive = [n.alive for n in self.nodes]
        incomplete = sum(1 for n in self.nodes if n.alive and n.done_at is None)
        return SimResult(
            config=cfg,
            bound_s=self.bound,
            zone_bound_s=self.zone_bound,
            completion_s=completion,
            alive=alive,
            failed=alive.count(False),
            incomplete=incomplete,
            origin_bytes=self.origin_bytes,
            peer_bytes=self.peer_bytes,
            inter_zone_bytes=self.inter_zone_bytes,
            # (and its total at the end, so a plot's line runs to the end of the rollout)
            origin_egress=self.origin_egress
            + ([(self.now, self.origin_bytes)] if self.now > self.origin_egress[-1][0] else []),
            end_s=self.now,
            stats=dict(self.stats),
            picker=_name(self.picker_factory),
            handout=_name(self.handout),
        )

    def _loop(self, max_time: float) -> None:
        times = self.times
        slots = self.slots
        pop = heapq.heappop
        window = self.cfg.batch_window
        stats = self.stats
        events = 0  # other than piece completions
        pieces = 0
        batches = 0
        progress = self.progress
        next_report = time.perf_counter() + self.report_every if progress is not None else _INF
        piece = self._piece_done
        inf = math.inf
        last_first = -1.0
        stuck = 0
        while times and self.remaining_nodes > 0:
            first = times[0]
            if first > max_time:
                break
            if first < self.now:
                raise AssertionError(f"an event at {first} s was scheduled in the past")
            until = first + window
            batches += 1
            if first == last_first:
                # Batches that never advance the clock are a livelock in the model (an event
                # that schedules itself at `now` again): fail loudly instead of spinning.
                stuck += 1
                if stuck > MAX_STUCK_BATCHES:
                    raise AssertionError(f"the simulation made no progress at {first} s")
            else:
                last_first = first
                stuck = 0
            while times and times[0] <= until:
                at = pop(times)
                self.now = at
                for kind, obj, ver in slots.pop(at):
                    if kind == _PIECE:
                        if ver == obj.ver:
                            obj.due = inf
                            left = obj.remaining - obj.rate * (at - obj.last)
                            if left > 1.0:  # re-rated lower since: not done yet
                                obj.remaining = left
                                obj.last = at
                                self._schedule(obj, at)
                                continue
                            pieces += 1
                            piece(obj, at)
                        continue
                    events += 1
                    if kind == _TIMEOUT:
                        # One pending check per connection with requests: its oldest request
                        # (the head) is overdue -> drop the peer, as the agent's ticker does;
                        # otherwise check again when the current head would be.
                        obj.tdue = inf
                        if obj.open and obj.queue:
                            due = obj.req_at[0] + PIECE_TIMEOUT
                            if due <= at:
                                stats["timeouts"] += 1
                                self._close(obj, at, backoff=True)
                            else:
                                obj.tdue = due
                                self._push(due, _TIMEOUT, obj)
                    elif kind == _START:
                        cost = self.cfg.tracker_start_cost
                        if ver == 0 and cost > 0:
                            # The pull starts; the node's start calls queue at the tracker
                            # (one FIFO server) and it goes on once they are answered.
                            self.tracker_free = max(self.tracker_free, at) + cost
                            self._push(self.tracker_free, _START, obj, 1)
                        else:
                            self._start(obj, at)
                    elif kind == _FAIL:
                        self._fail(obj, at)
                    elif kind == _WITHDRAW:
                        if ver == obj.wait_serial and obj.waiting and obj.open:
                            self._withdraw(obj, at)
                    elif kind == _REFILL:
                        if obj.open:
                            self.refill[obj] = None
                    elif kind == _WAKE:
                        if obj.wake_at == at:
                            obj.wake_at = inf
                            self.dial[obj] = None
                    elif kind == _LEASE:
                        self.lease_check_pending = False
                        self._lease_check(at)
                    elif kind == _SWEEP:
                        self._sweep(at)
            self._settle(self.now)
            if batches & 0xFF == 0 and time.perf_counter() >= next_report:
                next_report = time.perf_counter() + self.report_every
                stats["pieces"] = pieces  # (kept in a local in the loop, for speed)
                self._report(progress)
        stats["events"] = events + pieces
        stats["batches"] = batches
        stats["pieces"] = pieces
        if progress is not None:
            self._report(progress)
            progress.write("\n")

    def _report(self, out: TextIO | None) -> None:
        if out is None:
            return
        done = sum(1 for n in self.nodes if n.done_at is not None and n.alive)
        alive = sum(1 for n in self.nodes if n.alive)
        out.write(
            f"\rsimulated {self.now:8.2f}s  complete {done}/{alive}  "
            f"pieces {self.stats['pieces']}  picks {self.stats['picks']}   "
        )
        out.flush()

    # -- batch end: refill requests, dial, re-rate ----------------------------------------------

    def _settle(self, now: float) -> None:
        depth = self.depth
        while self.refill or self.dial or self.grant:
            refill, self.refill = self.refill, {}
            for c in refill:
                # (most were topped up since they were marked: a HAVE's dry shortcut)
                if c.open and len(c.queue) < depth:
                    self._fill(c, now)
            dial, self.dial = self.dial, {}
            for node in dial:
                self._dial_more(node, now)
            if not self.refill and not self.dial:
                grant, self.grant = self.grant, {}
                for src in grant:
                    self._grant(src, now)
        if self.dirty or self.dirty_links or self.fresh:
            self._rerate(now)

    def _rerate(self, now: float) -> None:
        """Re-rate the flows whose share changed: a flow's rate depends only on its sender's
        count of active uploads, its receiver's count of active downloads and its link's count,
        so only nodes (links) whose count differs from the last re-rating need a pass."""
        self.stamp += 1
        stamp = self.stamp
        # Every sender of a flow to re-rate splits its upload again over all its active flows
        # (at most its slot limit), together, so their rates never add up to more than it has.
        # The senders are collected in the order their first flow to re-rate is found: that
        # is the order the flows are rescheduled in, which orders equal finish times.
        senders: dict[_Node, None] = {}
        updates = 0  # flows to re-rate (the rate_updates statistic)
        for c in self.fresh:
            if c.active:
                c.stamp = stamp
                updates += 1
                senders[c.src] = None
        self.fresh = []
        # A count that went up lowers the share of every flow using it: re-rate them now, or
        # the resource would be over-committed. A count that went down raises the shares; the
        # flows pick that up at their next re-rating or piece start (conservative, and cheap:
        # most flows here carry one piece between idle spells).
        for node in self.dirty:
            if node.n_up > node.rated_up:
                for c in node.sending:  # its active uploads
                    if c.stamp != stamp:
                        c.stamp = stamp
                        updates += 1
                        senders[node] = None
            node.rated_up = node.n_up
            if node.n_down > node.rated_down:
                for c in node.downloads.values():
                    if c.active and c.stamp != stamp:
                        c.stamp = stamp
                        updates += 1
                        senders[c.src] = None
                oc = node.origin_conn
                if oc is not None and oc.active and oc.stamp != stamp:
                    oc.stamp = stamp
                    updates += 1
                    senders[oc.src] = None
            node.rated_down = node.n_down
        for link in self.dirty_links:
            if link.n > link.rated_n:
                for c in link.conns:
                    if c.stamp != stamp:
                        c.stamp = stamp
                        updates += 1
                        senders[c.src] = None
            link.rated_n = link.n
        self.dirty = {}
        self.dirty_links = {}
        self.stats["rate_updates"] += updates
        no_links = not self.links
        set_rate = self._set_rate
        for src in senders:
            flows = src.sending
            if len(flows) == 3 and no_links:  # the common case, unrolled (see _rates)
                f0, f1, f2 = flows
                r0, r1, r2 = _water_fill3(src.up, f0.dst.share, f1.dst.share, f2.dst.share)
                if r0 != f0.rate:
                    set_rate(f0, r0, now)
                if r1 != f1.rate:
                    set_rate(f1, r1, now)
                if r2 != f2.rate:
                    set_rate(f2, r2, now)
            else:
                for c, rate in zip(flows, self._rates(src), strict=True):
                    if rate != c.rate:
                        set_rate(c, rate, now)

    def _rates(self, src: _Node) -> Sequence[float]:
        """``src``'s upload water-filled over its active flows, each capped by _cap."""
        flows = src.sending
        up = src.up
        cap = self._cap
        n = len(flows)
        if n == 3:  # (the large-swarm slot count)
            return _water_fill3(up, cap(flows[0]), cap(flows[1]), cap(flows[2]))
        if n == 1:
            return (min(up, cap(flows[0])),)
        if n == 2:  # _water_fill for two flows, unrolled
            a, b = cap(flows[0]), cap(flows[1])
            if a <= b:
                ra = min(a, up / 2)
                return (ra, min(b, up - ra))
            rb = min(b, up / 2)
            return (min(a, up - rb), rb)
        return _water_fill(up, [cap(f) for f in flows])

    def _set_rate(self, c: _Conn, rate: float, now: float) -> None:
        """``c`` sends at ``rate`` from ``now``: what it sent at its old rate is accounted, and
        its completion is rescheduled if it now comes earlier (see _schedule)."""
        if c.rate > 0.0:
            c.remaining -= c.rate * (now - c.last)
            if c.remaining < 0.0:
                c.remaining = 0.0
        c.last = now
        c.rate = rate
        # _schedule, inline (this is its hottest caller)
        finish = now + c.remaining / rate
        if finish < c.due:
            ver = c.ver = c.ver + 1
            c.due = finish
            slot = self.slots.get(finish)
            if slot is None:
                self.slots[finish] = [(_PIECE, c, ver)]
                heappush(self.times, finish)
            else:
                slot.append((_PIECE, c, ver))

    @staticmethod
    def _cap(c: _Conn) -> float:
        """What the flow's receiver side allows: its equal share of the receiver's download and
        of its zone link (a share that can only shrink until the flow is re-rated)."""
        cap = c.dst.share
        link = c.link
        if link is not None and link.share < cap:
            cap = link.share
        return cap

    # -- flows -------------------------------------------------------------------------------------

    def _send(self, c: _Conn, now: float) -> None:
        """``c`` has requests and nothing being sent: its sender takes the head request when it
        has a free upload slot, or queues it (agent/peer_server.py, UploadSlots)."""
        src = c.src
        if src is self.origin:
            self._activate(c, now)
            return
        # Queued first, granted at the end of the batch (_grant): requests that reach a peer
        # at the same moment race in the agent, so none may win by the simulator's order.
        tie = self.order_random()
        c.waiting = True
        c.wait_order = (now, tie)
        src.waiters[c] = None
        dst = c.dst
        patience = patience_for(dst.patience, dst.piece_seconds)
        if patience < _INF:  # the requester withdraws it if no slot comes in time (_withdraw)
            c.wait_serial += 1
            self._push(now + patience, _WITHDRAW, c, c.wait_serial)
        if src.slots > 0:
            self.grant[src] = None
        if c.tdue == _INF:  # the requester drops the peer if a request takes too long
            c.tdue = max(now, c.req_at[0] + PIECE_TIMEOUT)
            self._push(c.tdue, _TIMEOUT, c)

    def _take(self, c: _Conn, now: float) -> None:
        """``c`` holds an upload slot: send its head piece. If its sender fetched the blob from
        the origin, a piece it already sent to another peer that is still connected is refused
        (super-seeding at the origin fetcher: its uplink brings new pieces into the swarm, so
        it carries each piece once, also after its fetch); the requester asks elsewhere. Not
        after SUPER_SEED_HOLD since it first refused this requester that piece."""
        src = c.src
        queue = c.queue
        served = src.served
        super_seeding = src.fetcher and (
            src.origin_conn is not None or super_seed_after_fetch(src.swarm_count)
        )
        while queue:
            index = queue[0]
            if super_seeding:
                other = served[index]
                if (
                    other is not None
                    and other is not c
                    and other.open
                    and now < c.refused_here.setdefault(index, now) + SUPER_SEED_HOLD
                ):
                    del queue[0]
                    del c.req_at[0]
                    self._refused(c, index, now)
                    continue
            served[index] = c
            self._activate(c, now)
            return
        self._release(src, now)

    def _release(self, src: _Node, now: float) -> None:
        """A slot of ``src`` is free: granted at the end of the batch (_grant)."""
        src.slots += 1
        if src.waiters:
            self.grant[src] = None

    def _grant(self, src: _Node, now: float) -> None:
        """Free slots go to the waiting requests of lowest p2preg.upload_order rank (requesters
        that are not busy, then the piece ``src`` has sent least often, then the requester
        holding fewest pieces), then to the ones that waited longest (agent/peer_server.py,
        UploadSlots)."""
        # The agent's min() over its waiters, ranked as they are now: the sender's counts, the
        # requester's held count and busy flag all change while a request waits. (A heap keyed
        # by the rank at queueing time, an entry re-pushed when it surfaced stale and each
        # time its requester stopped being busy, made the same choices at more cost: nearly
        # every entry was stale by the time it surfaced, the heaps held hundreds of dead
        # entries for 22 live waiters per grant, and 1,000 nodes x 256 MiB took 57.5 s of CPU
        # against 44.5 s this way.)
        waiters = src.waiters
        sent = src.sent

        # The p2preg.upload_order rank of a waiter's head request now, then (the longest
        # waiting, the slot race's random tie-break: _send). The requester's count as it is now
        # (an agent tells the peers it waits at at most 0.25 s late, agent/swarm.py
        # _tell_progress: a few pieces' difference); its busy flag as it is now (the agent's
        # busy message goes out the moment it changes).
        key: Callable[[_Conn], tuple[Any, ...]]
        if self.flat_rank:

            def key(c: _Conn) -> tuple[bool, int, int, tuple[float, float]]:
                # The rank's fields in its order, flat (rank_order_holds checked that this is
                # the rank's order): with a call of upload_rank per waiter the key was 15% of a
                # run.
                dst = c.dst
                return (
                    dst.arriving >= BUSY_INCOMING_PIECES,
                    sent[c.queue[0]],
                    len(dst.have),
                    c.wait_order,
                )

        else:

            def key(
                c: _Conn, rank: Callable[..., tuple[int, int, int]] = upload_rank
            ) -> tuple[tuple[int, int, int], tuple[float, float]]:
                dst = c.dst
                busy = dst.arriving >= BUSY_INCOMING_PIECES
                return (rank(sent[c.queue[0]], len(dst.have), busy), c.wait_order)

        while src.slots > 0 and waiters and src.alive:
            best = min(waiters, key=key)
            del waiters[best]
            best.waiting = False
            src.slots -= 1
            self._take(best, now)

    def _unwait(self, c: _Conn) -> None:
        if c.waiting:
            c.waiting = False
            del c.src.waiters[c]

    def _refused(self, c: _Conn, index: int, now: float) -> None:
        self.stats["refusals"] += 1
        fresh = self._not_asked_here(c, index, now)
        self._push(now + REFUSAL_BACKOFF, _REFILL, c)
        if not fresh:
            return
        dst = c.dst
        for other in dst.downloads.values():
            if other is not c and other.dry and index in other.src.have:
                other.dry = False
                self.refill[other] = None

    def _not_asked_here(self, c: _Conn, index: int, now: float) -> bool:
        """``c``'s request for ``index`` ended without the piece (refused, or withdrawn): not
        asked of that peer again for REFUSAL_BACKOFF, and ``c`` picks anew. True if no other
        request for it is out, so the other peers that have it may be asked now."""
        dst = c.dst
        picker = dst.picker
        picker.request_ended(index)
        c.refused[index] = now  # (_pick and _take_over read it)
        c.dry = False
        c.stash = []  # picked before: the next pick sees rarity as it is now
        self.refill[c] = None
        if index in picker.in_flight or index in dst.have:
            return False
        self.want[index][dst.index] = 0
        dst.endgame = False
        return True

    def _withdraw(self, c: _Conn, now: float) -> None:
        """``c``'s head request waited ``head_patience`` for a slot: its requester cancels it
        and asks another peer (agent/swarm.py, Swarm._withdraw_stalled_head), not this one
        again for REFUSAL_BACKOFF. The peers of the requester that hold the piece are offered
        it as if they had just announced it (_offer: the dry ones request it without a pick,
        which is what their pick would choose from; handled as a refusal instead, each picked
        anew: 3.2 million picks instead of 0.3 at 1,000 nodes x 1 GiB, twice the CPU). ``c``
        picks anew, as the agent's ticker does (keeping its stash instead was cheaper but
        slower, 10,000 nodes: 1.31/1.34/1.35 x the bound, against 1.30/1.33/1.34 this way and
        1.30/1.32/1.33 with every peer picking anew)."""
        self.stats["withdrawn"] += 1
        c.withdrawn += 1
        self._unwait(c)
        queue = c.queue
        index = queue.pop(0)
        c.req_at.pop(0)
        if queue:
            self._send(c, now)
        if not self._not_asked_here(c, index, now):
            return  # (an endgame copy is asked elsewhere)
        dst = c.dst
        wants = self.want[index]
        k = dst.index
        for other in dst.downloads.values():
            if other is not c and index in other.src.have:
                self._offer(other, index, now)
                if wants[k]:
                    break  # requested there

    def _activate(self, c: _Conn, now: float) -> None:
        c.active = True
        c.remaining = self.piece_bytes[c.queue[0]]
        c.last = c.started = now
        c.rate = 0.0
        self.fresh.append(c)
        src, dst = c.src, c.dst
        src.sending.append(c)
        src.n_up += 1
        dst.n_down += 1
        dst.share = dst.down / dst.n_down
        if src is not self.origin:
            dst.arriving += 1
        self.dirty[src] = None
        self.dirty[dst] = None
        link = c.link
        if link is not None:
            link.n += 1
            link.share = link.cap / link.n
            link.conns[c] = None
            self.dirty_links[link] = None

    def _deactivate(self, c: _Conn) -> None:
        c.active = False
        c.rate = 0.0
        c.ver += 1
        c.due = math.inf
        src, dst = c.src, c.dst
        src.sending.remove(c)
        src.n_up -= 1
        dst.n_down -= 1
        if dst.n_down:
            dst.share = dst.down / dst.n_down
        if src is not self.origin:
            dst.arriving -= 1
        self.dirty[src] = None
        self.dirty[dst] = None
        link = c.link
        if link is not None:
            link.n -= 1
            if link.n:
                link.share = link.cap / link.n
            del link.conns[c]
            self.dirty_links[link] = None

    def _piece_done(self, c: _Conn, now: float) -> None:
        """The head piece of ``c`` arrived (the hot path: written for speed)."""
        queue = c.queue
        index = queue.pop(0)
        c.req_at.pop(0)
        src, dst = c.src, c.dst
        if src is self.origin:
            self.origin_bytes += self.piece_size[index]
            self.origin_pieces += 1
            self.origin_egress.append((now, self.origin_bytes))
            self.known.add(index)
            self._deliver(dst, index, now, None)
            if c.open:
                if index + 1 < self.num_pieces:
                    queue.append(index + 1)
                    c.req_at.append(now)
                else:
                    self._origin_done(dst, now)
        else:
            self.peer_bytes += self.piece_size[index]
            if src.zone != dst.zone:
                self.inter_zone_bytes += self.piece_size[index]
            sent = src.sent
            if sent[index] < 255:
                sent[index] += 1
            c.delivered_at = now
            dst.piece_seconds = piece_seconds_after(dst.piece_seconds, now - c.started)
            c.delivered += 1
            self._deliver(dst, index, now, c)
            if not c.open:
                return  # closed meanwhile (dst complete): its slot went on already
            if c.stash or not c.dry or not queue:
                # (dry with an empty stash: nothing to ask until the peer announces a piece,
                # but with nothing asked of it either, it may take over a queued request)
                self.refill[c] = None
            # The slot goes back; our next request asks for one again, at the end of the batch
            # with every request that arrived meanwhile (the agent's send loop asks for a slot
            # per piece; which of simultaneous requests wins is a race there).
            self._deactivate(c)
            src.slots += 1  # (_release)
            if queue:
                self._send(c, now)
            elif src.waiters:
                self.grant[src] = None
            return
        if c.open:
            if queue:  # the origin's next piece: rated with the origin's flows (_rerate)
                c.remaining = self.piece_bytes[queue[0]]
                c.last = now
                c.rate = 0.0
                self.fresh.append(c)
            else:
                self._deactivate(c)

    def _deliver(self, dst: _Node, index: int, now: float, via: _Conn | None) -> None:
        picker = dst.picker
        have = dst.have
        if not (
            via is not None
            and self.lone_arrival
            and picker.in_flight.get(index) == 1
            and index not in have
        ):
            if via is not None:
                picker.request_ended(index)
            if index in have:
                self.stats["duplicates"] += 1
                return
            if picker.in_flight.get(index):
                self._cancel_duplicates(dst, index, via, now)
        # (else: the only request of a piece we lack arrived, the common case; the stock
        # picker's mark_have then leaves the state request_ended + mark_have would, a test
        # checks, so request_ended is not called)
        picker.mark_have(index)
        wants = self.want[index]
        wants[dst.index] = 1
        self.held[dst.index] += self.held_digit[index]
        dst.last_progress = now
        if index == dst.read_pos:
            pos = index + 1
            while pos in have:
                pos += 1
            dst.read_pos = pos
        # HAVE to every peer downloading from dst. (Their order does not matter for the slot
        # races: requests that arrive at once are granted at the end of the batch, in random
        # order, see _send. Their availability counts are not touched: _availability sums
        # them when a pick needs them.)
        gather, conns = dst.fan or self._fan_out(dst)
        flags = gather(wants)  # (and a last 1 for the never-wanting end)
        if 0 in flags:  # (most HAVEs: every downloader holds or requested the piece already)
            k = -1
            for _ in range(flags.count(0)):  # the downloaders that want it, in order
                k = flags.index(0, k + 1)
                self._offer(conns[k], index, now)
        if len(have) == self.num_pieces:
            self._complete(dst, now)

    def _offer(self, u: _Conn, index: int, now: float) -> None:
        """``u``'s sender announced ``index``, which ``u``'s downloader has neither nor asked
        for: request it at once if the dry shortcut allows, or have ``u`` refilled."""
        w = u.dst
        if u.dry and self.dry_shortcut and not w.endgame:
            # The last pick on u took every fresh piece its sender had for w, so the next
            # would choose among exactly these: skip the O(pieces) call (see _fill).
            queue = u.queue
            if u.stash or len(queue) >= self.depth:
                u.stash.append(index)
                self.refill[u] = None
                return
            # request it at once, as _fill would
            wp = w.picker
            wp.request_started(index)
            self.want[index][w.index] = 1
            queue.append(index)
            u.req_at.append(now)
            if not u.active and not u.waiting:
                self._send(u, now)
            elif len(queue) > 1:
                self._offer_queued(w, (index,))
            if len(wp.in_flight) == self.num_pieces - len(w.have):
                self._endgame(w)
        else:
            u.dry = False
            if len(u.queue) < self.depth:
                self.refill[u] = None

    def _fan_out(self, node: _Node) -> _FanOut:
        """``node``'s downloaders (its upload connections, in order) and a C-level gather of
        their flags from a piece's ``want`` array: a HAVE reads them all in one call instead of
        one attribute chase per downloader (cache misses at 10,000 nodes). The never-wanting
        last byte keeps the result a tuple (itemgetter of one index returns the bare item)."""
        conns = tuple(node.uploads)
        never = self.cfg.nodes
        gather = itemgetter(*[u.dst.index for u in conns], never)
        node.fan = (gather, conns) if conns else (itemgetter(never, never), conns)
        return node.fan

    def _endgame(self, node: _Node) -> None:
        """Every missing piece is requested somewhere: duplicates are allowed now."""
        node.endgame = True
        for other in node.downloads.values():
            other.dry = False
            self.refill[other] = None

    def _cancel_duplicates(self, dst: _Node, index: int, via: _Conn | None, now: float) -> None:
        """Endgame: the first copy won; cancel the other requests for it."""
        for c in dst.downloads.values():
            if c is via or index not in c.queue:
                continue
            position = c.queue.index(index)
            del c.queue[position]
            del c.req_at[position]
            dst.picker.request_ended(index)
            self.refill[c] = None
            if position == 0:
                if c.active:  # it was being sent: the sender's slot is free
                    self._deactivate(c)
                    self._release(c.src, now)
                    if c.queue:
                        self._send(c, now)
                elif not c.queue:
                    self._unwait(c)

    def _fill(self, c: _Conn, now: float) -> None:
        """Top up a connection's requests to ``depth`` with the picker's choices.

        The picker is asked for ``pick_count`` pieces at a time; what is not requested at once
        waits in the connection's stash (re-checked before use). When the last pick returned
        fewer than asked ("dry"), the stash plus the pieces the peer announced since is exactly
        the set pick would choose from; if it fits in the room it is requested without a call.
        """
        dst = c.dst
        if not dst.alive or dst.done_at is not None:
            return
        queue = c.queue
        room = self.depth - len(queue)
        if room <= 0:
            return
        picker = dst.picker
        want = self.want
        k = dst.index
        chosen: list[int]
        if c.dry and self.dry_shortcut and not dst.endgame and len(c.stash) <= room:
            chosen = [i for i in reversed(c.stash) if not want[i][k]]
            c.stash = []
        else:
            stash = [i for i in c.stash if not want[i][k]]
            if c.dry and self.dry_shortcut and not dst.endgame and len(stash) > room:
                chosen = self._pick(c, room, [], now)
            else:
                chosen = []
                while stash and len(chosen) < room:
                    chosen.append(stash.pop())
                c.stash = stash
                if len(chosen) < room and not c.dry:
                    chosen = self._pick(c, room, chosen, now)
        if not chosen:
            if not queue:
                self._take_over(c, room, now)
            return
        request = picker.request_started
        for index in chosen:
            request(index)
            want[index][k] = 1
            queue.append(index)
            c.req_at.append(now)
        if not c.active and not c.waiting:
            self._send(c, now)
        if len(queue) > 1:
            # (the chosen ones that are not the head: the first may be the only one there)
            self._offer_queued(dst, chosen if len(queue) > len(chosen) else chosen[1:])
        in_flight = picker.in_flight
        have = dst.have
        if not dst.endgame and len(in_flight) == self.num_pieces - len(have):
            self._endgame(dst)

    def _offer_queued(self, dst: _Node, pieces: Sequence[int]) -> None:
        """``pieces`` of ``dst`` were queued behind another request: a peer it asks nothing of
        that holds one may take it over (_take_over; the agent's ticker offers them to every
        such peer within 50 ms). Only those peers: refilling every idle connection of ``dst``
        made take-over a fifth of a 10,000-node run."""
        refill = self.refill
        for other in dst.downloads.values():
            if not other.queue:
                held = other.src.have
                for index in pieces:
                    if index in held:
                        refill[other] = None
                        break

    @staticmethod
    def _current_refusals(c: _Conn, now: float) -> dict[int, float]:
        """``c``'s refusals still within their back-off (older ones are forgotten)."""
        refused = c.refused
        for index, at in list(refused.items()):
            if at + REFUSAL_BACKOFF <= now:  # (the same sum as the _REFILL event's time)
                del refused[index]
        return refused

    def _take_over(self, c: _Conn, room: int, now: float) -> None:
        """Nothing to pick from ``c``'s peer and nothing asked of it: it takes over requests of
        its downloader that wait at other peers behind another one (the agent's rule, shared:
        p2preg.piece_picker.queued_to_take_over). Only the head of a connection's queue can be
        under way here, so the Cancel always wins (in the agent it may cross the piece). Not
        to a peer that refused us a piece lately: the origin fetcher, super-seeding, refuses
        pieces that others hold already, and a moved request it refuses is back at the end of
        a queue."""
        if c.refused and self._current_refusals(c, now):
            return
        dst = c.dst
        queues = (
            (other, other.queue)
            for other in dst.downloads.values()
            if other is not c and len(other.queue) > 1
        )
        moves = queued_to_take_over(c.src.have, queues, room)
        if not moves:
            return
        for other, index in moves:
            position = other.queue.index(index)
            del other.queue[position]
            del other.req_at[position]
            # Room there now; its dry flag stays true (the piece is still requested, so its
            # peer has nothing fresh that it had not before): no O(pieces) pick for it.
            self.refill[other] = None
            c.queue.append(index)
            c.req_at.append(now)
        self.stats["taken_over"] += len(moves)
        if not c.active and not c.waiting:
            self._send(c, now)

    def _pick(self, c: _Conn, room: int, chosen: list[int], now: float) -> list[int]:
        """``chosen`` plus what the picker picks to fill ``room``; the surplus goes to the stash."""
        picker = c.dst.picker
        need = room - len(chosen)
        count = max(need, self.cfg.pick_count)
        exclude = c.queue + chosen
        refused = c.refused
        if refused:  # as agent/swarm.py: not asked of this peer again for a while
            exclude += self._current_refusals(c, now)
        picker.availability = self._availability(c.dst)
        picks = picker.pick(c.src.have.as_bitfield(), count, c.dst.read_pos, exclude=exclude)
        self.stats["picks"] += 1
        rest = picks[need:]
        rest.reverse()
        c.stash = rest
        # Dry: it took every fresh piece the peer had for us (a refused one comes back later).
        c.dry = len(picks) < count and not refused
        return chosen + picks[:need]

    def _availability(self, node: _Node) -> list[int]:
        """How many of ``node``'s connected peers hold each piece: the picker's availability,
        the counts add_peer / peer_has / remove_peer would keep, summed when a pick needs them
        (1-2 picks per piece transfer) instead of counted on every HAVE (9-32 per transfer).
        Each peer's ``held`` has a digit of 1 per piece it holds; digits never carry (fewer
        than 256 peers per byte), so the sum's digits are the counts. (Summed over the peers'
        indexes in C: 14% of a 10,000-node run as a loop over the connections.)"""
        width = self.held_width
        total = sum(map(self.held.__getitem__, node.downloads))
        digits = total.to_bytes(self.num_pieces * width, "little")
        if width == 1:
            return cast(list[int], digits)
        counts = array("H", digits)
        if sys.byteorder == "big":
            counts.byteswap()
        return cast(list[int], counts)

    def _connect(self, node: _Node, peer: _Node, now: float) -> bool:
        self.stats["dials"] += 1
        if not peer.alive or not peer.started or len(peer.uploads) >= MAX_CONNECTIONS:
            self.stats["dial_failures"] += 1
            return False
        link = self.links.get((peer.zone, node.zone)) if peer.zone != node.zone else None
        c = _Conn(peer, node, link)
        c.delivered_at = now
        peer.uploads[c] = None
        peer.fan = None
        node.downloads[peer.index] = c
        if peer.have:  # (its pieces count in node's availability from now: _availability)
            self.refill[c] = None
        else:
            # Nothing to pick from a peer with no pieces (any picker picks only what the peer
            # has): wait for its HAVEs, as a pick that came back empty would.
            c.dry = self.dry_shortcut
        return True

    def _close(self, c: _Conn, now: float, *, backoff: bool) -> None:
        """End a connection: its requests go back to the picker, the downloader dials more."""
        if not c.open:
            return
        src, dst = c.src, c.dst
        held = c.active
        if held:
            self._deactivate(c)
        self._unwait(c)
        c.open = False
        c.ver += 1
        c.due = math.inf
        if src is self.origin:
            dst.origin_conn = None
            return
        if held and src.alive:
            self._release(src, now)
        del src.uploads[c]
        src.fan = None
        del dst.downloads[src.index]
        if dst.alive and dst.done_at is None:
            picker = dst.picker
            want, in_flight, have = self.want, picker.in_flight, dst.have
            for index in c.queue:
                picker.request_ended(index)
                if index not in in_flight and index not in have:
                    want[index][dst.index] = 0
            if c.queue:
                dst.endgame = False
                for other in dst.downloads.values():
                    other.dry = False
                    self.refill[other] = None
            if backoff:
                dst.failed_at[src.index] = now
            self.dial[dst] = None
        c.queue.clear()
        c.req_at.clear()

    # -- nodes -------------------------------------------------------------------------------------

    def _start(self, node: _Node, now: float) -> None:
        if not node.alive:
            return
        node.started = True
        node.last_progress = now
        picker = self.picker_factory(self.num_pieces, self.policy_rng)
        node.have = install_piece_sets(picker, self.known)
        node.sent = bytearray(self.num_pieces)
        node.served = [None] * self.num_pieces
        node.picker = picker
        if self.lease_holder is None and self.lease_expires == math.inf:
            # The first node to ask gets the origin-fetch lease and streams from the origin.
            self._grant_lease(node, now)
            self._announce(node, now, handout=False)
            return
        node.swarming = True
        self._announce(node, now, handout=True)
        self.dial[node] = None

    def _fail(self, node: _Node, now: float) -> None:
        if not node.alive:
            return
        if (node.started and node.done_at is None) or not node.started:
            self.remaining_nodes -= 1
        node.alive = False
        node.died_at = now
        for c in list(node.uploads):
            self._close(c, now, backoff=True)
        for c in list(node.downloads.values()):
            self._close(c, now, backoff=False)
        if node.origin_conn is not None:
            self._close(node.origin_conn, now, backoff=False)
        if self.lease_holder is node:
            self._release_lease(now)

    def _complete(self, node: _Node, now: float) -> None:
        node.done_at = now
        self.remaining_nodes -= 1
        for c in list(node.downloads.values()):
            self._close(c, now, backoff=False)
        if node.origin_conn is not None:
            self._close(node.origin_conn, now, backoff=False)
            if self.lease_holder is node:
                self._release_lease(now)
        self._announce(node, now, handout=False)

    def _dial_more(self, node: _Node, now: float, announced: bool = False) -> None:
        if not node.alive or not node.swarming or node.done_at is not None:
            return
        need = node.peer_limit - len(node.downloads)
        if need <= 0:
            return
        retry = math.inf
        downloads = node.downloads
        failed_at = node.failed_at
        nodes = self.nodes
        for index in node.addresses:
            if index in downloads:
                continue
            failed = failed_at.get(index)
            # Compared as the same sum the wake-up is scheduled at: with `now - failed <
            # REDIAL_BACKOFF` rounding could hold at the wake-up itself and wake the node at
            # `now` again, forever (seen at 8 nodes, 500 MiB, seed 2).
            if failed is not None and failed + REDIAL_BACKOFF > now:
                retry = min(retry, failed + REDIAL_BACKOFF)
                continue
            if self._connect(node, nodes[index], now):
                need -= 1
                if need == 0:
                    return
            else:
                failed_at[index] = now
                retry = min(retry, now + REDIAL_BACKOFF)
        # Still short of peers: ask the tracker for more (at most once per announce interval).
        if not announced and now >= node.next_handout:
            self._announce(node, now, handout=True)
            self._dial_more(node, now, announced=True)
            return
        self._wake(node, min(retry, max(node.next_handout, now + STALL_POLL)))

    # -- tracker -----------------------------------------------------------------------------------

    def _record(self, node: _Node, now: float) -> PeerRecord:
        pieces = len(node.have)
        complete = pieces == self.num_pieces
        record = PeerRecord(
            node.peer_id, self.addr[node.index], self.zone_names[node.zone], complete, pieces, now
        )
        self.tiers.upsert(record)
        node.record = record
        return record

    def _announce(self, node: _Node, now: float, *, handout: bool) -> None:
        record = self._record(node, now)
        if not handout:
            # What the tracker would answer (the agent sizes its limits on every answer).
            self._size_for_swarm(node, len(self.tiers) - 1, now)
            return
        node.next_handout = now + ANNOUNCE_INTERVAL
        candidates = self.tiers.candidates(
            record, HANDOUT_LIMIT, self.policy_rng, self.cfg.handout_sample
        )
        load = self.load.snapshot([r.peer_id for r in candidates], now)
        others = len(self.tiers) - 1  # the swarm count, less itself
        chosen = self.handout(
            candidates, record, HANDOUT_LIMIT, self.policy_rng, load, swarm_peers=others
        )
        self.load.record([r.peer_id for r in chosen], now)
        self.stats["handouts"] += 1
        self._size_for_swarm(node, others, now)
        known = node.addr_index
        node.handed = [int.from_bytes(r.peer_id, "big") for r in chosen]
        for r in chosen:
            index = int.from_bytes(r.peer_id, "big")
            if index not in known and index != node.index:
                known.add(index)
                node.addresses.append(index)

    def _size_for_swarm(self, node: _Node, peers: int, now: float) -> None:
        """The agent's PeerServer.note_swarm_size and Swarm.note_swarm_size: upload slots and
        download peers for a swarm of ``peers`` others, as the tracker's answer counts them
        (a --max-peers what-if fixes the download peers)."""
        previous = node.swarm_count
        limit = self.cfg.max_peers or download_peers(peers, previous)
        node.swarm_count = peers
        extra = len(node.downloads) - limit
        if extra > 0:
            # Fewer peers from now (the swarm grew): drop the connections with the fewest
            # requests out, their requests back to the picker (the agent's Swarm._drop_extra).
            by_load = sorted(node.downloads.values(), key=lambda c: len(c.queue))
            for c in by_load[:extra]:
                self._close(c, now, backoff=True)
        if limit > node.peer_limit and len(node.downloads) < limit:
            self.dial[node] = None  # room for more peers: dial now (Swarm.note_swarm_size wakes it)
        node.peer_limit = limit
        patience = self.cfg.head_patience
        node.patience = head_patience(peers, previous) if patience is None else patience
        rotate = self.cfg.rotate_peers
        node.rotates = rotates_peers(peers, previous) if rotate is None else rotate
        limit = upload_slots(peers)
        if limit != node.slot_limit:
            node.slots += limit - node.slot_limit
            node.slot_limit = limit
            if node.slots > 0 and node.waiters:
                self.grant[node] = None

    def _sweep(self, now: float) -> None:
        """Every second: downloading nodes due to announce (at the slot the tracker's
        calendar gave them, p2preg.announce_pacing) announce their progress, and the swarming
        ones rotate a peer at the answer; the tracker forgets peers that stopped announcing
        PEER_TTL ago; a stalled node may take the lease."""
        others = len(self.tiers) - 1  # an announce's swarm count, less the announcer
        downloading = sum(1 for n in self.nodes if n.record is not None and not n.record.complete)
        for node in self.nodes:
            if not node.started:
                continue
            record = node.record
            if node.alive:
                if node.done_at is None and now >= node.next_announce:
                    pace = self.calendar.pace(now, downloading)
                    node.next_announce = now + pace
                    if record is not None and record.pieces != len(node.have):
                        self._record(node, now)
                    if node.swarming and node.rotates and len(node.downloads) >= node.peer_limit:
                        # (every answer lists peers in the agent; here only a rotation reads
                        # them, so only then is one handed out)
                        self._announce(node, now, handout=True)
                    else:
                        self._size_for_swarm(node, others, now)
                    if node.swarming:
                        self._rotate(node, now, rotations_at_answer(pace))
            elif record is not None and node.died_at is not None and now - node.died_at >= PEER_TTL:
                self.tiers.remove(node.peer_id)
                node.record = None
        self.load.sweep(now)
        idle = self.cfg.replace_idle
        if idle > 0:
            for node in self.nodes:
                if node.alive and node.swarming and node.done_at is None:
                    for c in list(node.downloads.values()):
                        if c.dry and not c.queue and not c.stash and now - c.delivered_at >= idle:
                            self.stats["replaced"] += 1
                            self._close(c, now, backoff=True)
        if self.remaining_nodes > 0:
            self._push(now + ANNOUNCE_INTERVAL, _SWEEP, None)

    def _rotate(self, node: _Node, now: float, count: int = 1) -> None:
        """The tracker answered ``node``: where it rotates peers (more than 16 others, from its
        second count: p2preg.swarm_limits.rotates_peers), at its peer limit, it drops the peer
        where its requests starved most since the last answer and dials one of the answer
        instead, ``count`` times at most (agent/swarm.py, Swarm.rotate; the choices are
        p2preg.peer_rotation's)."""
        conns = list(node.downloads.values())
        counts = [(c, c.withdrawn, c.delivered) for c in conns]
        for c in conns:
            c.delivered = c.withdrawn = 0
        if not node.rotates or len(conns) < node.peer_limit:
            return
        downloads, failed_at = node.downloads, node.failed_at
        options = [
            index
            for index in dict.fromkeys(node.handed)
            if index not in downloads
            and index != node.index
            and failed_at.get(index, -_INF) + REDIAL_BACKOFF <= now
        ]
        if not options:
            return
        availability: list[int] = []

        def sole_source(c: _Conn) -> bool:
            if not availability:
                availability.extend(self._availability(node))
            return only_source(c.src.have, node.have, availability)

        for _ in range(count):
            out = peer_to_drop(counts, sole_source)
            if out is None:
                return
            index = peer_to_dial(options, self.policy_rng)
            assert index is not None
            self.stats["rotated"] += 1
            self._close(out, now, backoff=True)
            if not self._connect(node, self.nodes[index], now):
                failed_at[index] = now  # (_close asked _dial_more to fill the place meanwhile)
            # The next turn: the peers left, the answer's others not connected since (_close's
            # _dial_more may have dialled some), availability without the one dropped.
            counts = [entry for entry in counts if entry[0] is not out]
            options = [i for i in options if i != index and i not in downloads]
            availability.clear()
            if not options:
                return

    # -- origin-fetch lease ------------------------------------------------------------------------

    def _grant_lease(self, node: _Node, now: float) -> None:
        self.lease_holder = node
        node.fetcher = True
        self.lease_since = now
        self.lease_expires = math.inf  # renewed while the holder fetches
        c = _Conn(self.origin, node, None)
        self.origin.uploads[c] = None
        node.origin_conn = c
        c.queue.append(node.read_pos)
        c.req_at.append(now)
        self._activate(c, now)

    def _release_lease(self, now: float) -> None:
        """The holder stopped renewing (done or dead): the lease runs out LEASE_TTL after the
        last renewal."""
        since = self.lease_since
        last_renewal = since + math.floor((now - since) / LEASE_RENEW_INTERVAL) * (
            LEASE_RENEW_INTERVAL
        )
        self.lease_holder = None
        self.lease_expires = last_renewal + LEASE_TTL
        self._lease_wake(self.lease_expires)

    def _origin_done(self, node: _Node, now: float) -> None:
        c = node.origin_conn
        if c is not None:
            self._close(c, now, backoff=False)
            if c.active:
                self._deactivate(c)
        if self.lease_holder is node:
            self._release_lease(now)

    def _lease_wake(self, at: float) -> None:
        if not self.lease_check_pending:
            self.lease_check_pending = True
            self._push(at, _LEASE, None)

    def _lease_check(self, now: float) -> None:
        if self.lease_holder is not None or self.remaining_nodes <= 0:
            return
        if now < self.lease_expires:
            self._lease_wake(self.lease_expires)
            return
        stalled: _Node | None = None
        earliest = math.inf
        for node in self.nodes:
            if node.alive and node.started and node.done_at is None and node.swarming:
                since = node.last_progress
                if since < earliest:
                    earliest, stalled = since, node
        if stalled is None:
            return
        if now - earliest >= STALL_TIMEOUT:
            self.stats["lease_takeovers"] += 1
            self._grant_lease(stalled, now)
        else:
            self._lease_wake(max(earliest + STALL_TIMEOUT, now + STALL_POLL))


def _water_fill3(capacity: float, a: float, b: float, c: float) -> tuple[float, float, float]:
    """``_water_fill(capacity, [a, b, c])`` unrolled: the caps in the same order (ascending,
    ties in flow order, as the stable sort) and the same arithmetic, so the same rates to the
    bit (tests/unit/test_simulator.py checks), in a quarter of the time."""
    # x <= y <= z: the caps in the order _water_fill takes them; ``order`` says whose they are.
    if a <= b:
        if b <= c:
            order, x, y, z = 0, a, b, c
        elif a <= c:
            order, x, y, z = 1, a, c, b
        else:
            order, x, y, z = 2, c, a, b
    elif a <= c:
        order, x, y, z = 3, b, a, c
    elif b <= c:
        order, x, y, z = 4, b, c, a
    else:
        order, x, y, z = 5, c, b, a
    # _water_fill's loop: min(cap, left / count), count = 3, 2, 1 (x if x <= t else t is
    # min(x, t), without the call)
    t = capacity / 3
    rx = x if x <= t else t
    left = capacity - rx
    t = left / 2
    ry = y if y <= t else t
    left -= ry
    rz = z if z <= left else left
    if order == 0:
        return rx, ry, rz
    if order == 1:
        return rx, rz, ry
    if order == 2:
        return ry, rz, rx
    if order == 3:
        return ry, rx, rz
    if order == 4:
        return rz, rx, ry
    return rz, ry, rx


def _water_fill(capacity: float, caps: list[float]) -> list[float]:
    """Split ``capacity`` over flows that can each take at most ``caps[i]``: equal shares, and
    what a capped flow cannot use goes to the others (max-min fair at one sender, as TCP flows
    sharing an uplink settle)."""
    rates = [0.0] * len(caps)
    left, count = capacity, len(caps)
    for i in sorted(range(len(caps)), key=caps.__getitem__):
        rate = min(caps[i], left / count)
        rates[i] = rate
        left -= rate
        count -= 1
    return rates


def rank_order_holds() -> bool:
    """Whether p2preg.upload_order.upload_rank orders requests as the tuple (busy, times sent,
    requester's held count) does, so that Simulator._grant may compare those fields directly;
    checked on a grid of values when a simulator starts (a rank that orders otherwise, changed
    or under test, is called for every waiter instead)."""
    grid = [
        (busy, sent, held)
        for busy in (False, True)
        for sent in (0, 1, 2, 254, 255)
        for held in (0, 1, 2, 1000, 65535)
    ]
    order = sorted(grid, key=lambda v: upload_rank(v[1], v[2], v[0]))
    ranks = [upload_rank(sent, held, busy) for busy, sent, held in order]
    return order == sorted(grid) and all(a < b for a, b in itertools.pairwise(ranks))


def _stock_pick(factory: PickerFactory) -> bool:
    probe = factory(1, random.Random(0))
    return type(probe).pick is PiecePicker.pick


def _stock_bookkeeping(factory: PickerFactory) -> bool:
    kind = type(factory(1, random.Random(0)))
    return all(
        getattr(kind, name) is getattr(PiecePicker, name)
        for name in ("request_ended", "mark_have", "request_started")
    )


def _name(obj: object) -> str:
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    module = getattr(obj, "__module__", "")
    return f"{module}.{name}" if module else str(name)


def simulate(
    config: SimConfig,
    *,
    picker_factory: PickerFactory = default_picker,
    handout: HandoutPolicy = choose_peers,
    progress: TextIO | None = None,
) -> SimResult:
    return Simulator(
        config, picker_factory=picker_factory, handout=handout, progress=progress
    ).run()


# -- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--nodes", metavar="N", required=True, help="fleet size")
    add("--blob-size", metavar="SIZE", required=True, help="e.g. 1GiB")
    add("--node-bandwidth", metavar="RATE", help="per-node upload and download, e.g. 100MiB")
    add("--node-upload", metavar="RATE", help="per-node upload (default --node-bandwidth)")
    add("--node-download", metavar="RATE", help="per-node download (default --node-bandwidth)")
    add("--origin-bandwidth", metavar="RATE", required=True, help="origin upload, e.g. 100MiB")
    add(
        "--piece-length",
        metavar="SIZE",
        default="auto",
        help="piece size (default auto: by the blob's size, as the agent)",
    )
    add("--zones", metavar="K", default="1", help="zones, nodes spread round-robin (1)")
    add(
        "--inter-zone-bandwidth",
        metavar="RATE",
        help="capacity from each zone to each other zone, per direction (default unlimited)",
    )
    add("--fail-fraction", metavar="X", default="0", help="fraction of nodes that fail (0)")
    add(
        "--fail-window",
        metavar="DURATION",
        help="failures happen uniformly in [0, this] (default: the lower bound)",
    )
    add("--start-spread", metavar="DURATION", default="0", help="node starts spread over this")
    add("--seed", metavar="N", default="0", help="random seed (0)")
    add(
        "--pick-count",
        metavar="N",
        default=str(DEFAULT_PICK_COUNT),
        help=f"pieces asked of the picker per call ({DEFAULT_PICK_COUNT})",
    )
    add(
        "--batch-window",
        metavar="DURATION",
        default=f"{DEFAULT_BATCH_WINDOW * 1000:g}ms",
        help="events this close together are handled as one batch (1ms)",
    )
    add(
        "--max-peers",
        metavar="N",
        default="0",
        help="what-if: download connections per node (default 0: by the swarm's size, as the "
        "agent: p2preg.swarm_limits.download_peers)",
    )
    add(
        "--replace-idle",
        metavar="DURATION",
        default="0",
        help="what-if: drop a peer that had nothing for us this long and dial another "
        "(default 0: never, as the agent)",
    )
    add(
        "--announce-budget",
        metavar="N",
        default=str(int(ANNOUNCE_BUDGET)),
        help="the tracker's --announce-budget: announces a second it paces downloaders to "
        f"({int(ANNOUNCE_BUDGET)})",
    )
    add(
        "--tracker-start-cost",
        metavar="DURATION",
        default="0",
        help="tracker time a node's start calls take, served in order by one tracker "
        "(default 0: answered at once; measured: 1.4ms with a session open, 2.6ms with a "
        "handshake first; docs/tracker.md)",
    )
    add("--max-time", metavar="DURATION", help="stop the simulation at this simulated time")
    add("--json", metavar="FILE", help="write the results as JSON ('-' for stdout)")
    add(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr while running (default: when stderr is a terminal)",
    )
    add("--plot", metavar="FILE.png", help="plot completion times and origin egress to FILE.png")


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{what}: expected an integer, not {text!r}") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what}: expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{what}: expected a finite number, not {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> SimConfig:
    bandwidth = args.node_bandwidth
    upload = args.node_upload or bandwidth
    download = args.node_download or bandwidth
    if upload is None or download is None:
        raise ConfigError("give --node-bandwidth (or both --node-upload and --node-download)")
    config = SimConfig(
        nodes=_int(args.nodes, "--nodes"),
        blob_size=parse_size(args.blob_size, "--blob-size"),
        node_upload=float(parse_size(upload, "--node-upload")),
        node_download=float(parse_size(download, "--node-download")),
        origin_upload=float(parse_size(args.origin_bandwidth, "--origin-bandwidth")),
        piece_length=0
        if args.piece_length == "auto"
        else parse_size(args.piece_length, "--piece-length"),
        zones=_int(args.zones, "--zones"),
        inter_zone=(
            float(parse_size(args.inter_zone_bandwidth, "--inter-zone-bandwidth"))
            if args.inter_zone_bandwidth is not None
            else None
        ),
        fail_fraction=_float(args.fail_fraction, "--fail-fraction"),
        fail_window=(
            parse_duration(args.fail_window, "--fail-window")
            if args.fail_window is not None
            else None
        ),
        start_spread=parse_duration(args.start_spread, "--start-spread"),
        seed=_int(args.seed, "--seed"),
        pick_count=_int(args.pick_count, "--pick-count"),
        batch_window=parse_duration(args.batch_window, "--batch-window"),
        max_time=parse_duration(args.max_time, "--max-time") if args.max_time else None,
        max_peers=_int(args.max_peers, "--max-peers"),
        replace_idle=parse_duration(args.replace_idle, "--replace-idle"),
        announce_budget=_int(args.announce_budget, "--announce-budget"),
        tracker_start_cost=parse_duration(args.tracker_start_cost, "--tracker-start-cost"),
    )
    config.validate()
    return config


def plot(result: SimResult, path: Path) -> None:
    """Completion-time CDF against the bound, and the origin's egress over time, as a PNG."""
    from simulations.plots import plot_rollout

    cfg = result.config
    title = (
        f"simulated rollout: {cfg.nodes} nodes, {format_size(cfg.blob_size)}, node "
        f"{format_size(cfg.node_upload)}/s up, origin {format_size(cfg.origin_upload)}/s"
        + (f", {cfg.zones} zones" if cfg.zones > 1 else "")
        + (f", {cfg.fail_fraction:.0%} fail" if cfg.fail_fraction else "")
    )
    survivors = [t for t, alive in zip(result.completion_s, result.alive, strict=True) if alive]
    plot_rollout(
        path,
        title,
        {"p2preg (simulated)": survivors},
        result.bound_s,
        {"p2preg (simulated)": result.origin_egress},
        cfg.blob_size,
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def format_summary(summary: Mapping[str, Any], wall_s: float | None = None) -> str:
    links = summary["links"]
    rows = [
        (
            "nodes",
            f"{summary['nodes']} ({summary['failed']} failed, {summary['incomplete']} unfinished)",
        ),
        ("blob", f"{format_size(summary['blob_bytes'])} in {summary['pieces']} pieces"),
        (
            "links",
            f"node up {format_size(links['node_upload'])}/s, down "
            f"{format_size(links['node_download'])}/s, origin "
            f"{format_size(links['origin_upload'])}/s"
            + (
                f", inter-zone {format_size(links['inter_zone'])}/s per pair"
                if links["inter_zone"] is not None
                else ""
            ),
        ),
        ("lower bound", _seconds(summary["bound_s"])),
    ]
    if "zone_bound_s" in summary:
        rows.append((f"zone bound ({summary['zones']} zones)", _seconds(summary["zone_bound_s"])))
    for name in ("p50", "p90", "p99", "max"):
        value = summary[f"{name}_s"]
        ratio = summary[f"ratio_{name}"]
        text = _seconds(value)
        if ratio is not None:
            text += f"  ({ratio:.2f} x bound"
            zone_ratio = summary.get(f"zone_ratio_{name}")
            if zone_ratio is not None:
                text += f", {zone_ratio:.2f} x zone bound"
            text += ")"
        rows.append((f"completion {name}", text))
    rows.append(
        (
            "origin served",
            f"{format_size(summary['origin_bytes'])} ({summary['origin_copies']:.2f} copies)",
        )
    )
    if summary["zones"] > 1:
        rows.append(("between zones", format_size(summary["inter_zone_bytes"])))
    stats = summary["stats"]
    rows.append(
        (
            "simulated",
            f"{stats['pieces']} piece transfers, {stats['picks']} picks, "
            f"{stats['handouts']} handouts, {stats['events']} events",
        )
    )
    if wall_s is not None:
        rows.append(("wall time", f"{wall_s:.1f} s"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run_from_args(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``p2preg simulate``: bad input raises ConfigError (one line, exit 2 in the CLI)."""
    out = out or sys.stdout
    config = config_from_args(args)
    json_file: TextIO | None = None
    if args.json and args.json != "-":
        try:  # before the run, so a bad path fails at once
            json_file = open(args.json, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"--json {args.json}: {exc.strerror or exc}") from None
    try:
        started = time.perf_counter()
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        result = simulate(config, progress=sys.stderr if show else None)
        wall = time.perf_counter() - started
        summary = result.summary()
        if args.plot:
            plot(result, Path(args.plot))
        if args.json:
            text = json.dumps(summary, indent=1) + "\n"
            (json_file or out).write(text)
    finally:
        if json_file is not None:
            json_file.close()
    print(format_summary(summary, wall), file=sys.stderr if args.json == "-" else out)
    return 0
