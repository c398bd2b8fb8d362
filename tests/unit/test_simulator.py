"""The fleet rollout simulator: closed-form bounds, determinism, policy sensitivity, the CLI.

Small fleets and blobs only (the whole module runs in a few seconds); the 10,000-node timing is
measured by hand and recorded in docs/simulator.md.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

import pytest

from p2preg.bitfield import Bitfield
from p2preg.cli import main
from p2preg.config import AgentConfig, TrackerConfig
from p2preg.handout import HANDOUT_SAMPLE, PeerRecord, Requester, choose_peers
from p2preg.piece_picker import PiecePicker
from p2preg.swarm_limits import download_peers
from p2preg.upload_order import upload_rank
from simulations import simulator as sim
from simulations.sim_bounds import kumar_ross_bound, zone_bound
from simulations.sim_fast import FastShuffleRandom, PieceSet, install_piece_sets
from simulations.simulator import SimConfig, SimResult, simulate
from tracker.peer_store import StoreLimits

MiB = 1024 * 1024


def _run(**overrides: object) -> SimResult:
    return simulate(_config(**overrides))


def _config(**overrides: object) -> SimConfig:
    values: dict[str, object] = {
        "nodes": 10,
        "blob_size": 64 * MiB,
        "node_upload": 20 * MiB,
        "node_download": 20 * MiB,
        "origin_upload": 20 * MiB,
        "seed": 1,
    }
    values.update(overrides)
    return SimConfig(**values)  # type: ignore[arg-type]


# -- closed-form bounds --------------------------------------------------------------------------


def test_kumar_ross_bound_terms() -> None:
    f = 100.0
    assert kumar_ross_bound(100, 10.0, [50.0] * 4, [20.0] * 4) == f / 10  # origin: F/u_o
    assert kumar_ross_bound(100, 50.0, [50.0] * 4, [4.0, 8.0, 8.0, 8.0]) == f / 4  # F/d_min
    # N F / (u_o + sum u): 20 * 100 / (10 + 20 * 1)
    assert kumar_ross_bound(100, 10.0, [1.0] * 20, [50.0] * 20) == pytest.approx(2000 / 30)


def test_zone_bound_adds_what_the_links_let_through() -> None:
    uploads, downloads = [10.0] * 8, [100.0] * 8
    zones = [i % 2 for i in range(8)]
    base = kumar_ross_bound(1000, 10.0, uploads, downloads)
    assert zone_bound(1000, 10.0, uploads, downloads, zones, None) == base
    # Slow link: 2 zones must each take in 1000 bytes from the origin (10) and one link (1):
    # T >= 2 * 1000 / (10 + 2 * 1 * 1) = 166.7; per zone: 4 * 1000 / (40 + 10 + 1) = 78.4.
    assert zone_bound(1000, 10.0, uploads, downloads, zones, 1.0) == pytest.approx(2000 / 12)
    # A fast link: the Kumar & Ross bound again.
    assert zone_bound(1000, 10.0, uploads, downloads, zones, 1e9) == pytest.approx(base)


# -- the simulation against the bound ----------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "download"), [(4 * MiB, 10 * MiB), (40 * MiB, 8 * MiB), (10 * MiB, 10 * MiB)]
)
def test_one_node_takes_f_over_min_of_origin_and_download(origin: int, download: int) -> None:
    result = _run(nodes=1, node_download=download, origin_upload=origin)
    expected = 64 * MiB / min(origin, download)
    assert result.bound_s == pytest.approx(expected)
    assert result.percentile(100) == pytest.approx(expected, rel=1e-3)
    assert result.origin_bytes == 64 * MiB


def test_fast_origin_and_uploads_approach_the_download_bound() -> None:
    # The origin and every node's upload are far faster than the downloads, so F/d binds.
    result = _run(nodes=10, node_upload=200 * MiB, node_download=10 * MiB, origin_upload=100 * MiB)
    f_over_d = 64 * MiB / (10 * MiB)
    assert result.bound_s == pytest.approx(f_over_d)
    # Not at the bound: an agent sends at most upload_slots(swarm) pieces at once, each at the
    # receiver's 10 MiB/s, so a 200 MiB/s uplink carries 20; the holder refuses pieces it
    # already sent (super-seeding); requests for pieces sent before wait behind new ones
    # (docs/simulator.md, findings). 1.8 x and 2.2 x with the agent's peer server as it is.
    assert f_over_d * 0.999 <= result.percentile(50) <= 2.0 * f_over_d
    assert result.percentile(100) <= 2.5 * f_over_d
    assert result.origin_bytes == 64 * MiB  # the origin served one copy


def test_upload_bound_case_respects_the_bound_and_the_known_gap() -> None:
    # N F / (u_o + sum u) binds: 30 * 64 / (20 + 30 * 10) = 6 s.
    result = _run(nodes=30, node_upload=10 * MiB, node_download=80 * MiB, origin_upload=20 * MiB)
    assert result.bound_s == pytest.approx(30 * 64 / (20 + 300))
    assert result.percentile(100) >= result.bound_s * 0.999
    # Far from the bound with today's policies (docs/simulator.md, "findings": every
    # downloader of the lease holder asks it for every new piece, so pieces enter the swarm
    # at u/k). Tighten this when the policies improve.
    assert result.percentile(100) <= 15 * result.bound_s


def test_a_redial_backoff_ending_at_a_wake_up_does_not_livelock() -> None:
    # 8 nodes, 500 MiB, seed 2: a peer dropped at t ~ 30.11 s made `now - failed < 2.0` true
    # at the wake-up scheduled for `failed + 2.0`, and the node woke at the same instant
    # forever. The loop now raises on a livelock, so a regression fails instead of hanging.
    result = _run(nodes=8, blob_size=500 * MiB, seed=2)
    assert result.incomplete == 0
    assert result.percentile(100) >= result.bound_s


@pytest.mark.parametrize("seed", range(6))
def test_never_faster_than_the_bound(seed: int) -> None:
    rng = random.Random(seed)
    zones = rng.choice([1, 2, 3])
    result = _run(
        nodes=rng.randint(1, 40),
        blob_size=rng.choice([16, 40, 64]) * MiB,
        node_upload=rng.choice([5, 20, 80]) * MiB,
        node_download=rng.choice([10, 40, 100]) * MiB,
        origin_upload=rng.choice([5, 20, 200]) * MiB,
        zones=zones,
        inter_zone=rng.choice([None, 10 * MiB]) if zones > 1 else None,
        seed=seed,
    )
    assert result.incomplete == 0
    bound = result.zone_bound_s if result.zone_bound_s is not None else result.bound_s
    # The bound is on the whole rollout (the last node); the holder may finish earlier.
    assert result.percentile(100) >= bound * 0.999


def test_a_slow_inter_zone_link_holds_the_rollout_to_the_zone_bound() -> None:
    result = _run(nodes=20, zones=2, inter_zone=1 * MiB, node_upload=40 * MiB)
    assert result.zone_bound_s is not None
    assert result.zone_bound_s > 1.5 * result.bound_s  # the link is what limits
    assert result.incomplete == 0
    assert result.percentile(100) >= result.zone_bound_s * 0.999


# -- determinism and output ------------------------------------------------------------------------


def test_same_seed_same_json_and_another_seed_differs() -> None:
    config = {"nodes": 40, "fail_fraction": 0.1, "zones": 2, "inter_zone": 50 * MiB}
    first = json.dumps(_run(**config).summary(), sort_keys=True)
    second = json.dumps(_run(**config).summary(), sort_keys=True)
    assert first == second
    assert json.dumps(_run(**config, seed=2).summary(), sort_keys=True) != first


def test_summary_has_what_reports_need() -> None:
    summary = _run(nodes=12, zones=3, inter_zone=30 * MiB).summary()
    for key in (
        "nodes",
        "blob_bytes",
        "bound_s",
        "p50_s",
        "p90_s",
        "p99_s",
        "max_s",
        "origin_bytes",
        "completion_s",
        "links",
        "zone_bound_s",
        "zone_ratio_max",
        "ratio_max",
    ):
        assert key in summary
    assert len(summary["completion_s"]) == 12
    assert summary["links"]["inter_zone"] == 30 * MiB
    assert summary["policies"]["handout"] == "p2preg.handout.choose_peers"


# -- failures ------------------------------------------------------------------------------------


def test_failed_nodes_disappear_and_the_survivors_finish() -> None:
    result = _run(nodes=40, fail_fraction=0.25)
    assert result.failed == 10
    assert result.incomplete == 0
    assert sum(t is None for t in result.completion_s) == 10
    assert all(
        t is not None for t, alive in zip(result.completion_s, result.alive, strict=True) if alive
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_nodes_that_start_over_two_seconds_finish_together_from_one_origin_copy(
    seed: int,
) -> None:
    """The first nodes to start hold the most pieces. When the handout ranked leechers by
    pieces before load, every later node dialled the same few, some nodes had no downloaders,
    and the fetcher refused the pieces it had sent them to everyone else for as long as they
    stayed connected: seed 1 took 53.6 s and 2.64 origin copies, seed 2 had 76 nodes
    unfinished at 60 s (p2preg.handout, p2preg.swarm_limits.SUPER_SEED_HOLD)."""
    result = _run(
        nodes=100,
        blob_size=32 * MiB,
        start_spread=2.0,
        seed=seed,
        max_time=60.0,
    )
    assert result.incomplete == 0
    # (bound 1.6 s; the last node starts at up to 2 s: 3.72-4.05 s measured)
    assert max(t for t in result.completion_s if t is not None) < 6.0
    assert result.origin_bytes <= 1.1 * 32 * MiB


def test_given_start_times_start_each_node_then() -> None:
    """The emulator passes its drawn start offsets (start_times): a node cannot finish before
    its start plus F / d, and nodes that start late finish later than the rest."""
    late = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.5, 3.0)
    result = _run(start_times=late)
    times = [t for t in result.completion_s if t is not None]
    assert result.incomplete == 0 and len(times) == 10
    for start, done in zip(late, times, strict=True):
        assert done >= start + 64 * MiB / (20 * MiB) * 0.999
    assert min(times[8:]) > max(times[:8])
    assert result.summary()["model"]["start_spread_s"] == 3.0
    for bad in ((0.0,) * 9, (0.0,) * 9 + (-1.0,), (0.0,) * 9 + (math.inf,)):
        with pytest.raises(sim.ConfigError, match="start_times"):
            _run(start_times=bad)


def test_a_dead_lease_holder_hands_the_origin_to_a_stalled_node() -> None:
    result = _run(nodes=10, fail_nodes=((0, 1.0),))
    assert not result.alive[0]
    assert result.incomplete == 0
    assert result.stats["lease_takeovers"] >= 1
    # The first holder got 20 MiB before it died: the blob was fetched once more, in part.
    assert 64 * MiB < result.origin_bytes < 3 * 64 * MiB


# -- the policies are the real ones, and they matter -----------------------------------------------


class RandomPicker(PiecePicker):
    """No window, no rarest-first: any fresh piece the peer has, at random."""

    def pick(
        self,
        peer: Bitfield | AbstractSet[int],
        count: int,
        read_position: int = 0,
        *,
        exclude: Iterable[int] = (),
    ) -> list[int]:
        excluded = set(exclude)
        wanted = [
            i
            for i in range(self.num_pieces)
            if i in peer and i not in self.have and i not in self.in_flight and i not in excluded
        ]
        self._rng.shuffle(wanted)
        return wanted[:count]


def oldest_first(
    candidates: Sequence[PeerRecord],
    requester: Requester,
    limit: int,
    rng: random.Random,
    load: Mapping[bytes, float],
    swarm_peers: int | None = None,
) -> list[PeerRecord]:
    """No zones, no seeders first, no load spreading: the first announced, always."""
    return [c for c in candidates if c.peer_id != requester.peer_id][:limit]


def test_the_defaults_are_the_real_policies() -> None:
    simulator = sim.Simulator(
        SimConfig(nodes=2, blob_size=MiB, node_upload=1, node_download=1, origin_upload=1)
    )
    assert simulator.handout is choose_peers
    assert type(simulator.picker_factory(4, random.Random(0))) is PiecePicker
    assert simulator.dry_shortcut


def test_a_handout_without_load_spreading_makes_the_rollout_slower() -> None:
    config = {
        "nodes": 100,
        "blob_size": 32 * MiB,
        "node_upload": 20 * MiB,
        "node_download": 20 * MiB,
        "origin_upload": 20 * MiB,
        "seed": 3,
    }
    real = simulate(SimConfig(**config))  # type: ignore[arg-type]
    worse = simulate(SimConfig(**config), handout=oldest_first)  # type: ignore[arg-type]
    assert worse.handout.endswith("oldest_first")
    # (3.1-3.2x at seeds 1-3. With peers rotated in swarms of this size, 50 nodes x 64 MiB @
    # 10 MiB/s, this test's scenario before, is only 1.13-1.17x slower: rotation undoes some
    # of a bad handout there.)
    assert worse.percentile(50) > 2 * real.percentile(50)


def test_taking_over_queued_requests_makes_the_tight_case_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The agent's rule (p2preg.piece_picker.queued_to_take_over): a peer we ask nothing of
    # takes over a request of ours that waits at another peer behind a first one.
    # (16 nodes, 100 MiB at 10 MiB/s: the emulator's scenario; mean over 6 seeds 2.13 -> 1.94 x.)
    scenario = {"nodes": 16, "blob_size": 100 * MiB, "node_upload": 10 * MiB}
    scenario |= {"node_download": 10 * MiB, "origin_upload": 10 * MiB}

    def mean_max(seeds: Iterable[int]) -> float:
        times = [_run(**scenario, seed=seed).percentile(100) for seed in seeds]
        return sum(times) / len(times)

    with_it = mean_max(range(1, 7))
    assert _run(**scenario, seed=1).stats["taken_over"] > 0
    monkeypatch.setattr(sim.Simulator, "_take_over", lambda self, c, room, now: None)
    without = mean_max(range(1, 7))
    assert with_it < 0.97 * without


def test_serving_the_neediest_requester_first_shortens_a_mid_size_rollouts_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The agent's upload order (p2preg.upload_order): among requests for equally fresh pieces,
    # the requester holding fewest pieces first. (100 nodes, 200 MiB at 20 MiB/s, seeds 1-2: max
    # 1.17 and 1.19 x the bound with it, 1.26 and 1.23 without; with 8 download peers and
    # no patience or rotation at this size, as before, 1.57 and 1.61 against 1.83 and 2.05.)
    scenario = {"nodes": 100, "blob_size": 200 * MiB, "node_upload": 20 * MiB}
    scenario |= {"node_download": 20 * MiB, "origin_upload": 20 * MiB}

    def mean_max() -> float:
        return sum(_run(**scenario, seed=seed).percentile(100) for seed in (1, 2)) / 2

    with_it = mean_max()
    monkeypatch.setattr(sim, "upload_rank", lambda sent, held, busy=False: (int(busy), sent, 0))
    without = mean_max()
    assert with_it < 0.97 * without


def test_serving_requesters_that_are_not_busy_first_speeds_a_large_rollout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # p2preg.upload_order: a requester receiving BUSY_INCOMING_PIECES pieces at once waits
    # behind the others. (500 nodes, 128 MiB at 100 MiB/s, seeds 1-3: p50 / p99 1.71-1.75 /
    # 1.85-1.91 x the bound with it, 1.98-2.05 / 2.23-2.30 without.)
    scenario = {"nodes": 500, "blob_size": 128 * MiB, "node_upload": 100 * MiB}
    scenario |= {"node_download": 100 * MiB, "origin_upload": 100 * MiB, "seed": 1}
    with_it = _run(**scenario)
    monkeypatch.setattr(sim, "BUSY_INCOMING_PIECES", 10**9)  # nobody is ever busy
    without = _run(**scenario)
    assert with_it.percentile(50) < 0.9 * without.percentile(50)
    assert with_it.percentile(99) < 0.9 * without.percentile(99)


def test_withdrawing_requests_that_wait_too_long_speeds_a_large_rollout() -> None:
    # p2preg.upload_order.HEAD_PATIENCE: without it, requests starved behind fresher pieces
    # until the agent's piece timeout dropped their connections. (410 nodes, 64 MiB at 6 MiB/s,
    # seeds 1 and 2: p50 / p99 1.44-1.46 / 1.52-1.53 x the bound with it, 1.51-1.53 /
    # 1.62 without; 2,380-2,492 piece timeouts without, none with.)
    scenario = {"nodes": 410, "blob_size": 64 * MiB, "node_upload": 6 * MiB}
    scenario |= {"node_download": 6 * MiB, "origin_upload": 6 * MiB, "seed": 1}
    with_it = _run(**scenario)
    without = _run(**scenario, head_patience=math.inf)
    assert with_it.stats["withdrawn"] > 0 and without.stats["withdrawn"] == 0
    assert with_it.stats["timeouts"] < without.stats["timeouts"] / 10
    assert with_it.percentile(50) < 0.97 * without.percentile(50)
    assert with_it.percentile(99) < 0.97 * without.percentile(99)


def test_requests_are_withdrawn_only_in_swarms_of_more_than_16_others() -> None:
    # p2preg.swarm_limits.head_patience: a node of a smaller swarm downloads from most of it.
    scenario = {"nodes": 16, "blob_size": 64 * MiB, "node_upload": 2 * MiB}
    scenario |= {"node_download": 2 * MiB, "origin_upload": 2 * MiB}
    assert _run(**scenario).stats["withdrawn"] == 0
    assert _run(**scenario, head_patience=1.0).stats["withdrawn"] > 0  # (requests do wait)
    assert _run(**scenario | {"nodes": 40}).stats["withdrawn"] > 0


def test_rotating_peers_speeds_a_large_rollout() -> None:
    # p2preg.peer_rotation: without it, the nodes that joined last were dialled by few and
    # their uplinks idled. (410 nodes, 32 MiB at 4 MiB/s, seeds 1 and 2: p50 / p99
    # 1.56-1.59 / 1.62-1.66 x the bound with it, 1.67-1.69 / 1.78-1.80 without.)
    scenario = {"nodes": 410, "blob_size": 32 * MiB, "node_upload": 4 * MiB}
    scenario |= {"node_download": 4 * MiB, "origin_upload": 4 * MiB, "seed": 1}
    with_it = _run(**scenario)
    without = _run(**scenario, rotate_peers=False)
    assert with_it.stats["rotated"] > 0 and without.stats["rotated"] == 0
    assert with_it.percentile(50) < 0.96 * without.percentile(50)
    assert with_it.percentile(99) < 0.96 * without.percentile(99)


def test_peers_rotate_only_in_swarms_of_more_than_16_others() -> None:
    # p2preg.swarm_limits.rotates_peers (and a rotation needs withdrawn requests, which
    # head_patience also keeps to these swarms).
    scenario = {"nodes": 16, "blob_size": 64 * MiB, "node_upload": 2 * MiB}
    scenario |= {"node_download": 2 * MiB, "origin_upload": 2 * MiB}
    assert _run(**scenario, head_patience=1.0).stats["rotated"] == 0
    assert _run(**scenario, head_patience=1.0, rotate_peers=True).stats["rotated"] > 0
    assert _run(**scenario | {"nodes": 40}).stats["rotated"] > 0


def test_mid_size_swarms_rollout_faster_with_more_peers_patience_and_rotation() -> None:
    # p2preg.swarm_limits, "The mid-size swarm": from 17 others (and a second count), 16
    # download peers, requests withdrawn after HEAD_PATIENCE and a peer rotated at every
    # answer. With the rules of before (8 peers, neither), requests starved at the few peers
    # that had them until the piece timeout dropped their connections. (64 nodes, 100 MiB at
    # 10 MiB/s, seeds 1-2: p50 / max 1.21-1.22 / 1.23 x the bound, 0-2 piece timeouts, against
    # 1.38-1.39 / 1.48-1.58 and 84-112.)
    scenario = {"nodes": 64, "blob_size": 100 * MiB, "node_upload": 10 * MiB}
    scenario |= {"node_download": 10 * MiB, "origin_upload": 10 * MiB}
    before = {"max_peers": 8, "head_patience": math.inf, "rotate_peers": False}
    for seed in (1, 2):
        now, then = _run(**scenario, seed=seed), _run(**scenario, **before, seed=seed)
        assert now.stats["timeouts"] < then.stats["timeouts"] / 10
        assert now.percentile(50) < 0.92 * then.percentile(50)
        assert now.percentile(100) < 0.88 * then.percentile(100)


def test_a_custom_picker_is_always_asked() -> None:
    config = SimConfig(
        nodes=20,
        blob_size=32 * MiB,
        node_upload=10 * MiB,
        node_download=10 * MiB,
        origin_upload=10 * MiB,
        seed=2,
    )
    simulator = sim.Simulator(config, picker_factory=lambda n, rng: RandomPicker(n, rng=rng))
    assert not simulator.dry_shortcut  # the shortcut is only for the stock pick
    result = simulator.run()
    assert result.incomplete == 0
    assert result.picker.endswith("<lambda>")
    assert result.stats["picks"] > 0


def test_the_dry_shortcut_matches_the_stock_picks_contract() -> None:
    """When pick returned fewer than asked, a piece the peer announces later is exactly what
    the next pick returns (outside endgame): what the simulator relies on to skip the call."""
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(4, 40)
        picker = PiecePicker(n, rng=random.Random(rng.random()))
        for i in range(n):
            picker.mark_known(i)
        for i in rng.sample(range(n), rng.randint(0, n // 2)):
            picker.mark_have(i)
        peer = Bitfield(n)
        for i in rng.sample(range(n), rng.randint(0, n)):
            peer.add(i)
        picker.add_peer(i for i in range(n) if i in peer)
        count = rng.randint(1, 6)
        first = picker.pick(peer, count, picker.first_missing())
        for i in first:
            picker.request_started(i)
        missing = [i for i in range(n) if i not in picker.have and i not in peer]
        if len(first) == count or not missing or picker._endgame():
            continue
        new = rng.choice(missing)
        peer.add(new)
        picker.peer_has(new)
        if picker._endgame():
            continue
        assert picker.pick(peer, count, picker.first_missing(), exclude=first) == [new]


def test_a_lone_arrival_needs_only_mark_have_with_the_stock_picker() -> None:
    """The one request of a piece we lack arrives: the stock picker's mark_have alone leaves
    the state request_ended + mark_have would, which _deliver relies on to skip the call."""
    rng = random.Random(11)
    for _ in range(300):
        n = rng.randint(1, 40)
        pickers = [PiecePicker(n, rng=random.Random(1)) for _ in range(2)]
        for i in rng.sample(range(n), rng.randint(0, n)):
            for p in pickers:
                p.mark_have(i)
        for i in rng.sample(range(n), rng.randint(0, n)):
            times = 2 if rng.random() < 0.2 else 1  # (endgame duplicates: not lone)
            for p in pickers:
                for _ in range(times):
                    p.request_started(i)
        lone = [i for i in range(n) if pickers[0].in_flight.get(i) == 1]
        if not lone or lone[0] in pickers[0].have:
            continue
        index = rng.choice([i for i in lone if i not in pickers[0].have])
        pickers[0].request_ended(index)
        for p in pickers:
            p.mark_have(index)
        a, b = pickers
        assert [i in a.have for i in range(n)] == [i in b.have for i in range(n)]
        assert (a.in_flight, a.unrequested, a.first_missing()) == (
            b.in_flight,
            b.unrequested,
            b.first_missing(),
        )
    assert sim.Simulator(
        SimConfig(nodes=2, blob_size=MiB, node_upload=1, node_download=1, origin_upload=1)
    ).lone_arrival


def test_piece_sets_do_not_change_a_pick() -> None:
    for seed in range(30):
        rng = random.Random(seed)
        n = rng.randint(1, 64)
        plain = PiecePicker(n, rng=FastShuffleRandom(seed))
        fast = PiecePicker(n, rng=FastShuffleRandom(seed))
        known = PieceSet(n)
        install_piece_sets(fast, known)
        peer_bits, peer_set = Bitfield(n), PieceSet(n)
        for i in range(n):
            plain.mark_known(i)
            known.add(i)
            if rng.random() < 0.3:
                plain.mark_have(i)
                fast.mark_have(i)
            if rng.random() < 0.6:
                peer_bits.add(i)
                peer_set.add(i)
                plain.peer_has(i)
                fast.peer_has(i)
        for _ in range(3):
            count, position = rng.randint(1, 8), rng.randint(0, n)
            picked = plain.pick(peer_bits, count, position)
            assert fast.pick(peer_set.as_bitfield(), count, position) == picked
            for i in picked:
                plain.request_started(i)
                fast.request_started(i)


@pytest.mark.parametrize("max_peers", [8, 300])
def test_availability_is_the_count_of_connected_peers_holding_each_piece(max_peers: int) -> None:
    """The picker's availability, summed when a pick needs it, is what add_peer / peer_has /
    remove_peer would have counted (two bytes per piece from 256 peers on)."""
    checked = []

    class Checked(sim.Simulator):
        def _availability(self, node: sim._Node) -> list[int]:
            counts = super()._availability(node)
            expected = [0] * self.num_pieces
            for c in node.downloads.values():
                for i in c.src.have:
                    expected[i] += 1
            assert list(counts) == expected
            checked.append(sum(expected))
            return counts

    config = SimConfig(
        nodes=40,
        blob_size=32 * MiB,
        node_upload=10 * MiB,
        node_download=10 * MiB,
        origin_upload=10 * MiB,
        fail_fraction=0.1,
        max_peers=max_peers,
        seed=1,
    )
    assert Checked(config).run().incomplete == 0
    assert checked and max(checked) > 0


def test_slot_grants_compare_the_ranks_fields_with_the_same_choices_as_upload_rank() -> None:
    """_grant compares (busy, times sent, held) directly only because upload_rank orders so;
    the choices, and so the whole rollout, are the same as calling upload_rank per waiter."""
    assert sim.rank_order_holds()
    config = _config(nodes=60, fail_fraction=0.05, seed=3)  # 64 MiB @ 20 MiB/s
    flat = sim.Simulator(config)
    called = sim.Simulator(config)
    assert flat.flat_rank
    called.flat_rank = False
    assert flat.run().summary() == called.run().summary()


def test_a_rank_that_orders_otherwise_is_called_for_every_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    def held_first(sent: int, held: int, busy: bool = False) -> tuple[int, int, int]:
        calls.append(held)
        return (held, int(busy), sent)

    monkeypatch.setattr(sim, "upload_rank", held_first)
    assert not sim.rank_order_holds()
    rate = {"node_upload": 10 * MiB, "node_download": 10 * MiB, "origin_upload": 10 * MiB}
    simulator = sim.Simulator(_config(nodes=20, blob_size=16 * MiB, **rate))
    assert not simulator.flat_rank
    calls.clear()  # (rank_order_holds asked it too, when the simulator started)
    assert simulator.run().incomplete == 0
    assert calls  # the grants asked the rank under test


def test_unrolled_water_fill_is_the_loop_to_the_bit() -> None:
    up = 100.0 * MiB
    shares = [up / k for k in range(1, 10)] + [1.0, up / 3 + 1e-9, 2 * up / 3, 2 * up]
    for caps in itertools.product(shares, repeat=3):
        assert sim._water_fill3(up, *caps) == tuple(sim._water_fill(up, list(caps)))
    rng = random.Random(3)
    for _ in range(2000):
        drawn = [rng.uniform(0, 2 * up) for _ in range(3)]
        capacity = rng.uniform(1, 3 * up)
        assert sim._water_fill3(capacity, *drawn) == tuple(sim._water_fill(capacity, drawn))


def test_fast_shuffle_is_a_permutation() -> None:
    rng = FastShuffleRandom(1)
    items = list(range(100))
    rng.shuffle(items)
    assert sorted(items) == list(range(100))
    assert items != list(range(100))


def test_constants_agree_with_the_agent_and_the_tracker() -> None:
    from agent import incoming_pieces, peer_server, swarm, swarm_coordinator

    # One policy for both (p2preg.swarm_limits, p2preg.upload_order), imported, not copied.
    assert vars(sim)["download_peers"] is vars(swarm)["download_peers"] is download_peers
    assert vars(sim)["upload_rank"] is vars(peer_server)["upload_rank"] is upload_rank
    assert sim.BUSY_INCOMING_PIECES == incoming_pieces.BUSY_INCOMING_PIECES
    assert vars(sim)["super_seed_after_fetch"] is vars(peer_server)["super_seed_after_fetch"]
    assert sim.SUPER_SEED_HOLD == peer_server.SUPER_SEED_HOLD
    assert sim.MAX_IN_FLIGHT == swarm.MAX_IN_FLIGHT
    assert sim.MAX_IN_FLIGHT_BYTES == swarm.MAX_IN_FLIGHT_BYTES
    assert sim.MAX_CONNECTIONS == peer_server.MAX_CONNECTIONS
    assert sim.REFUSAL_BACKOFF == swarm.REFUSAL_BACKOFF
    assert StoreLimits().handout_sample == HANDOUT_SAMPLE
    assert (
        sim.SimConfig(
            nodes=1, blob_size=1, node_upload=1, node_download=1, origin_upload=1
        ).handout_sample
        == HANDOUT_SAMPLE
    )
    assert sim.ANNOUNCE_INTERVAL == swarm_coordinator.ANNOUNCE_INTERVAL
    tracker = TrackerConfig(cluster_secret=b"x" * 32)
    assert tracker.max_peers == sim.HANDOUT_LIMIT
    assert tracker.peer_ttl == sim.PEER_TTL
    assert tracker.lease_ttl == sim.LEASE_TTL
    assert tracker.load_half_life == sim.LOAD_HALF_LIFE
    assert (
        tracker.announce_budget
        == sim.SimConfig(
            nodes=1, blob_size=1, node_upload=1, node_download=1, origin_upload=1
        ).announce_budget
    )
    fields = AgentConfig.__dataclass_fields__
    assert fields["swarm_stall_timeout"].default == sim.STALL_TIMEOUT
    assert fields["piece_timeout"].default == sim.PIECE_TIMEOUT


# -- command line ----------------------------------------------------------------------------------


def test_cli_writes_json_and_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.json"
    args = ["simulate", "--nodes", "30", "--blob-size", "32MiB", "--node-bandwidth", "20MiB"]
    args += ["--origin-bandwidth", "20MiB", "--zones", "2", "--inter-zone-bandwidth", "40MiB"]
    args += ["--fail-fraction", "0.1", "--seed", "4", "--json", str(out), "--progress"]
    args += ["--plot", str(tmp_path / "sim.png")]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["nodes"] == 30 and data["failed"] == 3
    assert data["bound_s"] == pytest.approx(32 / 20)
    assert math.isfinite(data["zone_bound_s"])
    assert data["origin_egress"][-1][1] == data["origin_bytes"]
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    assert "completion p99" in captured.out and "lower bound" in captured.out
    assert "simulated" in captured.err and "complete 27/27" in captured.err  # --progress


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "x"], "--nodes: expected an integer"),
        (["--nodes", "0"], "--nodes must be at least 1"),
        (["--blob-size", "lots"], "--blob-size: cannot parse"),
        (["--origin-bandwidth", "0"], "--origin-bandwidth must be larger than zero"),
        (["--fail-fraction", "1.5"], "--fail-fraction"),
        (["--zones", "50"], "--zones must be between 1 and --nodes"),
        (["--piece-length", "3MiB"], "--piece-length must be a power of two"),
        (["--inter-zone-bandwidth", "fast"], "--inter-zone-bandwidth: cannot parse"),
        (["--json", "/nonexistent-dir/x.json"], "--json /nonexistent-dir/x.json"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"--nodes": "10", "--blob-size": "16MiB", "--node-bandwidth": "10MiB"}
    base["--origin-bandwidth"] = "10MiB"
    merged = dict(base)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        merged[flag] = value
    argv = ["simulate"] + [x for pair in merged.items() for x in pair]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--nodes", "10"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_handout_is_the_trackers_sampled_policy() -> None:
    """The simulator ranks what the tracker ranks: PeerTiers.candidates with the tracker's
    sample; 0 (all records, for experiments) changes the rollout, and both are deterministic."""
    assert (
        sim.SimConfig.__dataclass_fields__["handout_sample"].default == StoreLimits().handout_sample
    )
    config = {"nodes": 300, "blob_size": 16 * MiB, "zones": 2}
    sampled = _run(**config, handout_sample=60)
    assert sampled.incomplete == 0
    assert json.dumps(sampled.summary()) == json.dumps(_run(**config, handout_sample=60).summary())
    assert json.dumps(_run(**config, handout_sample=0).summary()) != json.dumps(sampled.summary())


def test_origin_egress_is_a_cumulative_series() -> None:
    result = _run(nodes=20, fail_nodes=((0, 1.0),))
    egress = result.origin_egress
    assert egress[0] == (0.0, 0) and egress[-1] == (result.end_s, result.origin_bytes)
    # A point per piece the origin served, then the total at the end.
    steps = [b[1] - a[1] for a, b in itertools.pairwise(egress[:-1])]
    assert steps and all(step == result.config.piece_length for step in steps)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(egress))
    # The origin sends at most its upload rate: 20 MiB/s here.
    assert all(b[1] <= 20 * MiB * b[0] * 1.0001 for b in egress[1:])
    assert result.summary()["origin_egress"][-1] == [egress[-1][0], result.origin_bytes]


def test_what_ifs_default_to_the_agent_and_change_the_rollout() -> None:
    fields = SimConfig.__dataclass_fields__
    assert fields["max_peers"].default == 0  # by the swarm's size, as the agent
    assert fields["replace_idle"].default == 0.0  # the agent never replaces a peer
    config = {"nodes": 80, "blob_size": 64 * MiB, "node_upload": 10 * MiB, "seed": 5}
    plain = _run(**config)
    assert plain.stats["replaced"] == 0
    replaced = _run(**config, replace_idle=1.0)
    assert replaced.stats["replaced"] > 0 and replaced.incomplete == 0
    wider = _run(**config, max_peers=48)
    assert wider.incomplete == 0
    assert wider.summary()["model"]["max_peers"] == 48
    assert wider.completion_s != plain.completion_s


def test_nodes_dial_more_peers_once_the_tracker_counts_a_large_swarm() -> None:
    """As the agent's Swarm.note_swarm_size: a node that started with 8 peers (the first
    announces saw a small swarm) dials up to 32 once an answer counts more than 400 others."""
    result = _run(nodes=402, blob_size=64 * MiB, max_time=30.0)
    assert result.incomplete == 0
    # 8 dials per node would be all there is without the wake-up (and before the threshold).
    assert result.stats["dials"] > 20 * 402


def test_progress_lines_while_it_runs() -> None:
    """--progress reports mid-run too (it once failed there on a count kept only at the end)."""
    out = io.StringIO()
    simulator = sim.Simulator(
        SimConfig(20, 64 * MiB, node_upload=8 * MiB, node_download=8 * MiB, origin_upload=8 * MiB),
        progress=out,
    )
    simulator.report_every = 0.0  # a line every 256 batches
    result = simulator.run()
    lines = out.getvalue().split("\r")[1:]
    assert len(lines) >= 2, lines
    assert f"complete {len(result.completion_s)}/20" in lines[-1]
    assert all(line.startswith("simulated") for line in lines)


def test_downloaders_announce_at_the_tracker_s_pace_and_rotate_at_its_answers() -> None:
    """p2preg.announce_pacing: a tracker tracking more peers than its budget answers once a
    second asks downloaders to announce less often (40 peers, 8 a second: every 5 s, the
    first answers spread over those 5 s); the nodes rotate a peer at an answer only, as the
    agent does (docs/simulator.md, finding 14: rotating every second from an older answer
    made the tail longer)."""

    def run(budget: int) -> dict[str, int]:
        cfg = SimConfig(
            nodes=40,
            blob_size=128 * MiB,
            node_upload=10 * MiB,
            node_download=10 * MiB,
            origin_upload=10 * MiB,
            seed=1,
            announce_budget=budget,
        )
        return simulate(cfg).stats

    every_second, paced = run(500), run(8)
    assert paced["handouts"] < 0.6 * every_second["handouts"]
    assert 0 < paced["rotated"] <= paced["handouts"]
    assert paced["rotated"] < 0.6 * every_second["rotated"]


def test_a_tracker_that_takes_time_per_start_answers_the_nodes_in_turn() -> None:
    """--tracker-start-cost: one tracker serves the start calls in the order asked (docs/
    tracker.md, "A rollout's start"), so the k-th node to ask goes on at k x the cost and
    finishes no sooner than that plus F/d."""
    cost, blob, rate = 0.1, 4 * MiB, 10 * MiB

    def run(start_cost: float) -> list[float]:
        cfg = SimConfig(
            nodes=20,
            blob_size=blob,
            node_upload=rate,
            node_download=rate,
            origin_upload=rate,
            seed=1,
            tracker_start_cost=start_cost,
        )
        times = simulate(cfg).completion_s
        assert all(t is not None for t in times)
        return [t for t in times if t is not None]

    at_once, queued = run(0.0), run(cost)
    for k, finished in enumerate(queued, start=1):  # all ask at t = 0, in node order
        assert finished >= k * cost + blob / rate - 1e-9
    assert max(queued) >= 20 * cost + blob / rate > max(at_once)
    with pytest.raises(sim.ConfigError, match="tracker-start-cost"):
        SimConfig(
            nodes=2,
            blob_size=1,
            node_upload=1,
            node_download=1,
            origin_upload=1,
            tracker_start_cost=-1.0,
        ).validate()
