"""The peer handout policy (p2preg/handout.py): properties over random swarms, and load spread."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2preg import handout
from p2preg.handout import (
    LEECHER_LOAD_GRAIN,
    HandoutLoad,
    PeerRecord,
    PeerRef,
    PeerTiers,
    choose_peers,
)
from p2preg.swarm_limits import LARGE_SWARM_PEERS

ZONES = ("a", "b", "c")
POOL = [bytes([i]) * 16 for i in range(24)]


def record(
    index: int,
    zone: str = "a",
    complete: bool = False,
    pieces: int = 0,
    at: float = 0.0,
) -> PeerRecord:
    return PeerRecord(POOL[index], f"10.0.0.{index}:7000", zone, complete, pieces, at)


records = st.builds(
    PeerRecord,
    peer_id=st.sampled_from(POOL),
    addr=st.just("10.0.0.1:7000"),
    zone=st.sampled_from(ZONES),
    complete=st.booleans(),
    pieces=st.integers(0, 300),
    announced_at=st.floats(0, 100),
)
swarms = st.lists(records, max_size=40)
loads = st.dictionaries(st.sampled_from(POOL), st.integers(0, 100))
requesters = st.builds(PeerRef, peer_id=st.sampled_from(POOL), zone=st.sampled_from(ZONES))


def newest(candidates: list[PeerRecord]) -> dict[bytes, PeerRecord]:
    latest: dict[bytes, PeerRecord] = {}
    for candidate in candidates:
        seen = latest.get(candidate.peer_id)
        if seen is None or candidate.announced_at >= seen.announced_at:
            latest[candidate.peer_id] = candidate
    return latest


@given(swarms, requesters, st.integers(-1, 50), loads, st.integers(0, 2**32))
def test_basic_guarantees(
    candidates: list[PeerRecord], me: PeerRef, limit: int, load: dict[bytes, int], seed: int
) -> None:
    chosen = choose_peers(candidates, me, limit, random.Random(seed), load)
    ids = [peer.peer_id for peer in chosen]
    assert me.peer_id not in ids
    assert len(ids) == len(set(ids))
    assert len(chosen) <= max(limit, 0)
    others = newest(candidates)
    others.pop(me.peer_id, None)
    assert len(chosen) == min(max(limit, 0), len(others))
    # Of each peer, its newest announce is the one handed out.
    assert all(others[peer.peer_id] is peer for peer in chosen)


@given(
    swarms,
    requesters,
    st.integers(1, 50),
    loads,
    st.integers(0, 2**32),
    st.sampled_from([None, 40, LARGE_SWARM_PEERS + 1]),
)
def test_order_zone_then_seeders_then_load(
    candidates: list[PeerRecord],
    me: PeerRef,
    limit: int,
    load: dict[bytes, int],
    seed: int,
    swarm_peers: int | None,
) -> None:
    chosen = choose_peers(candidates, me, limit, random.Random(seed), load, swarm_peers)
    load_first = swarm_peers is not None and swarm_peers <= LARGE_SWARM_PEERS
    step = LEECHER_LOAD_GRAIN
    for before, after in itertools.pairwise(chosen):
        same_before, same_after = before.zone == me.zone, after.zone == me.zone
        assert same_before or not same_after, "a same-zone peer came after another zone's"
        if same_before == same_after:
            assert before.complete or not after.complete, "a seeder came after a leecher"
            early, late = load.get(before.peer_id, 0), load.get(after.peer_id, 0)
            bucket_early, bucket_late = before.pieces.bit_length(), after.pieces.bit_length()
            if before.complete and after.complete:
                assert early <= late
            elif before.complete:
                pass  # (the last seeder, then the first leecher)
            elif load_first:
                # Leechers where nodes keep their peers: by load in steps, then by pieces in
                # power-of-two buckets (a tier handed out whole is ranked by the exact load,
                # which keeps the steps' order).
                assert early // step <= late // step
                if early == late:
                    assert bucket_early >= bucket_late
            else:
                # Leechers in a swarm that rotates peers (or of unknown size): by pieces in
                # buckets, then by load in steps.
                assert bucket_early >= bucket_late
                if bucket_early == bucket_late:
                    assert early // step <= late // step


@given(swarms, requesters, st.integers(1, 10), loads, st.integers(0, 2**32))
def test_nothing_better_is_left_out(
    candidates: list[PeerRecord], me: PeerRef, limit: int, load: dict[bytes, int], seed: int
) -> None:
    """A peer left out is never strictly preferable to one handed out."""
    chosen = choose_peers(candidates, me, limit, random.Random(seed), load)
    picked = {peer.peer_id for peer in chosen}
    left_out = [
        peer for peer in newest(candidates).values() if peer.peer_id not in picked | {me.peer_id}
    ]
    for out in left_out:
        for peer in chosen:
            if out.zone == me.zone and peer.zone != me.zone:
                raise AssertionError("a same-zone peer was left out for another zone's")
            if out.zone == peer.zone or (out.zone != me.zone and peer.zone != me.zone):
                assert not (out.complete and not peer.complete), "a seeder was left out"
                if out.complete and peer.complete:
                    assert load.get(out.peer_id, 0) >= load.get(peer.peer_id, 0), "hot peer won"


@given(st.lists(st.integers(0, 1000), min_size=2, max_size=20), st.integers(0, 2**32))
def test_leechers_with_more_pieces_first(pieces: list[int], seed: int) -> None:
    candidates = [record(i + 1, pieces=count) for i, count in enumerate(pieces)]
    chosen = choose_peers(candidates, PeerRef(POOL[0], "a"), len(pieces), random.Random(seed), {})
    held = [peer.pieces for peer in chosen]
    assert held == sorted(held, reverse=True)


def test_leechers_handed_out_often_go_behind_those_with_fewer_pieces() -> None:
    """Nodes that start over a few seconds: the first ones hold the most pieces. Ranked by
    pieces first, every later requester would be handed them first and dial them all."""
    early = [record(i, pieces=200) for i in range(1, 9)]
    late = [record(i, pieces=3) for i in range(9, 24)]
    load = {peer.peer_id: 2.0 * LEECHER_LOAD_GRAIN for peer in early}
    me = PeerRef(POOL[0], "a")
    chosen = choose_peers(early + late, me, 10, random.Random(1), load, swarm_peers=23)
    assert [peer.pieces for peer in chosen] == [3] * 10
    fresh = choose_peers(early + late, me, 10, random.Random(1), {}, swarm_peers=23)
    assert [peer.pieces for peer in fresh] == [200] * 8 + [3] * 2
    # Where nodes rotate a peer a second, pieces still come first.
    rotating = choose_peers(
        early + late, me, 10, random.Random(1), load, swarm_peers=LARGE_SWARM_PEERS + 1
    )
    assert [peer.pieces for peer in rotating] == [200] * 8 + [3] * 2


def test_hot_seeder_demoted_but_seeders_still_before_leechers() -> None:
    seeders = [record(i, complete=True) for i in (1, 2, 3)]
    leecher = record(4, pieces=99)
    load = {POOL[1]: 5, POOL[2]: 1}
    chosen = choose_peers([*seeders, leecher], PeerRef(POOL[0], "a"), 4, random.Random(1), load)
    assert [peer.peer_id for peer in chosen] == [POOL[3], POOL[2], POOL[1], POOL[4]]
    # With room for two, the hottest seeder is the one left out.
    two = choose_peers([*seeders, leecher], PeerRef(POOL[0], "a"), 2, random.Random(1), load)
    assert {peer.peer_id for peer in two} == {POOL[2], POOL[3]}


def test_same_zone_beats_a_seeder_elsewhere() -> None:
    far_seeder = record(1, zone="b", complete=True)
    near_leecher = record(2, zone="a", pieces=1)
    chosen = choose_peers([far_seeder, near_leecher], record(0), 1, random.Random(0), {})
    assert chosen == [near_leecher]


def test_requester_given_as_a_record_is_excluded() -> None:
    me = record(0, complete=True)
    assert choose_peers([me, record(1)], me, 5, random.Random(0), {}) == [record(1)]


@given(swarms, requesters, st.integers(0, 50), loads, st.integers(0, 2**32))
def test_deterministic_for_a_seeded_rng(
    candidates: list[PeerRecord], me: PeerRef, limit: int, load: dict[bytes, int], seed: int
) -> None:
    first = choose_peers(candidates, me, limit, random.Random(seed), load)
    again = choose_peers(candidates, me, limit, random.Random(seed), load)
    assert first == again


def test_random_among_equals() -> None:
    candidates = [record(i, complete=True) for i in range(1, 21)]
    picks = {
        tuple(p.peer_id for p in choose_peers(candidates, record(0), 3, random.Random(s), {}))
        for s in range(20)
    }
    assert len(picks) > 10


def test_load_spreads_a_rollout_over_all_seeders() -> None:
    """1000 requesters, 10 seeders, 3 peers each: with the tracker's load bookkeeping every
    seeder gets about the same share; without it, the same would hold only by chance."""
    seeders = [record(i, complete=True) for i in range(1, 11)]
    load = HandoutLoad(half_life=10.0)
    counts: Counter[bytes] = Counter()
    rng = random.Random(7)
    for step in range(1000):
        now = step * 0.01
        ids = [s.peer_id for s in seeders]
        chosen = choose_peers(seeders, PeerRef(b"\xff" * 16, "a"), 3, rng, load.snapshot(ids, now))
        load.record([peer.peer_id for peer in chosen], now)
        counts.update(peer.peer_id for peer in chosen)
    assert max(counts.values()) - min(counts.values()) <= 2


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**32))
def test_ten_thousand_candidates(seed: int) -> None:
    rng = random.Random(seed)
    candidates = [
        PeerRecord(
            rng.randbytes(16), "h:1", rng.choice(ZONES), rng.random() < 0.3, rng.randrange(500), 0
        )
        for _ in range(10_000)
    ]
    load = {c.peer_id: rng.randrange(5) for c in candidates[:3000]}
    chosen = choose_peers(candidates, PeerRef(b"\0" * 16, "b"), 50, rng, load)
    assert len(chosen) == 50
    assert all(peer.zone == "b" and peer.complete for peer in chosen)
    assert max(load.get(p.peer_id, 0) for p in chosen) == 0


def test_handout_load_decays_with_half_life() -> None:
    load = HandoutLoad(half_life=10.0)
    peer = POOL[1]
    load.record([peer, peer], now=100.0)
    assert load.get(peer, 100.0) == 2.0
    assert abs(load.get(peer, 110.0) - 1.0) < 1e-9
    assert abs(load.snapshot([peer, POOL[2]], 120.0)[peer] - 0.5) < 1e-9
    load.record([peer], now=120.0)
    assert abs(load.get(peer, 120.0) - 1.5) < 1e-9
    assert load.sweep(200.0) == 1 and len(load) == 0


def test_handout_load_keeps_its_counts_across_rescaling() -> None:
    # Counts are kept scaled to a common instant that moves forward every
    # REBASE_EXPONENT / rate seconds; over many of those the counts stay exact.
    load = HandoutLoad(half_life=1.0)
    step = 0.9 * HandoutLoad.REBASE_EXPONENT / math.log(2)  # a rescale every other step
    steady, fresh = POOL[1], POOL[2]
    now = 0.0
    for _ in range(20):
        load.record([steady], now)
        assert load.get(steady, now) == pytest.approx(1.0)
        assert load.get(steady, now + 1.0) == pytest.approx(0.5)
        now += step
    load.record([fresh, fresh, fresh], now)
    assert load.snapshot([fresh, POOL[3]], now + 2.0) == {fresh: pytest.approx(0.75)}
    # the steady peer's last count decayed to nothing and is swept; the fresh one stays
    assert load.sweep(now + 2.0) == 1 and len(load) == 1


def test_handout_load_takes_an_earlier_time_as_its_latest() -> None:
    # The tracker's clock is monotonic, but a store driven by another clock may step back:
    # the counts then read as they are, and a step of days does not overflow.
    load = HandoutLoad(half_life=10.0)
    load.record([POOL[1]], now=1e6)
    assert load.get(POOL[1], now=0.0) == pytest.approx(1.0)
    load.record([POOL[1]], now=0.0)
    assert load.snapshot([POOL[1]], now=1e6 + 10.0) == {POOL[1]: pytest.approx(1.0)}
    assert load.sweep(-1e9) == 0 and len(load) == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.data())
def test_distinct_positions_are_distinct_and_in_range(size: int, data: st.DataObject) -> None:
    count = data.draw(st.integers(0, size))
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    places = handout._distinct_positions(size, count, rng)
    assert len(places) == count and all(0 <= x < size for x in places)


def test_distinct_positions_are_uniform() -> None:
    # 20,000 draws of 10 of 37 (a size far from a power of two: 27 of every 64 words are rejected)
    rng = random.Random(5)
    seen: Counter[int] = Counter()
    for _ in range(2000):
        seen.update(handout._distinct_positions(37, 10, rng))
    expected = 2000 * 10 / 37  # 540.5
    assert set(seen) == set(range(37))
    assert all(abs(n - expected) < 5 * expected**0.5 for n in seen.values()), seen


def test_handout_load_is_bounded() -> None:
    load = HandoutLoad(half_life=10.0, max_peers=5)
    load.record(POOL[:10], now=0.0)
    assert len(load) == 5
    assert load.get(POOL[0], 0.0) == 0.0 and load.get(POOL[9], 0.0) == 1.0


# -- PeerTiers: the tracker's bucketed records and the sampled candidates ------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 23), st.sampled_from(ZONES), st.booleans()), max_size=80),
    st.lists(st.integers(0, 23), max_size=10),
)
def test_peer_tiers_follow_upserts_and_removals(
    ops: list[tuple[int, str, bool]], removals: list[int]
) -> None:
    tiers = PeerTiers()
    model: dict[bytes, PeerRecord] = {}
    for step, (index, zone, complete) in enumerate(ops):
        rec = record(index, zone, complete, pieces=step, at=float(step))
        tiers.upsert(rec)
        model[rec.peer_id] = rec
    for index in removals:
        assert tiers.remove(POOL[index]) == model.pop(POOL[index], None)
    assert len(tiers) == len(model)
    assert sorted(tiers, key=lambda r: r.peer_id) == sorted(model.values(), key=lambda r: r.peer_id)
    for peer_id, rec in model.items():
        assert tiers.get(peer_id) is rec and peer_id in tiers


@settings(max_examples=60, deadline=None)
@given(swarms, requesters, st.integers(0, 50), loads, st.integers(0, 2**32))
def test_unsampled_candidates_answer_as_the_whole_swarm(
    candidates: list[PeerRecord], me: PeerRef, limit: int, load: dict[bytes, int], seed: int
) -> None:
    """With no sampling, choosing from PeerTiers.candidates is choosing from every record."""
    tiers = PeerTiers()
    for rec in sorted(candidates, key=lambda r: r.announced_at):
        tiers.upsert(rec)
    everyone = list(tiers)
    picked = tiers.candidates(me, limit, random.Random(seed), sample=0)
    assert me.peer_id not in {r.peer_id for r in picked}
    full = choose_peers(everyone, me, limit, random.Random(seed), load)
    part = choose_peers(picked, me, limit, random.Random(seed), load)

    # Same ranking keys in the same order (the random tie-breaks may differ).
    def key(r: PeerRecord) -> tuple[bool, bool, float]:
        return (r.zone != me.zone, not r.complete, load.get(r.peer_id, 0) if r.complete else 0)

    assert [key(r) for r in part] == [key(r) for r in full]


def test_big_tiers_are_sampled_uniformly() -> None:
    tiers = PeerTiers()
    for i in range(2000):
        tiers.upsert(
            PeerRecord(i.to_bytes(16, "big"), f"h{i}", "a" if i % 4 else "b", False, 0, 0.0)
        )
    rng = random.Random(3)
    me = PeerRef(b"\xff" * 16, "a")  # 1500 same-zone leechers: one tier, sampled
    seen: Counter[bytes] = Counter()
    for _ in range(300):
        picked = tiers.candidates(me, 50, rng, sample=100)
        assert len(picked) == 100 and len({r.peer_id for r in picked}) == 100
        assert all(r.zone == "a" for r in picked)
        seen.update(r.peer_id for r in picked)
    # 30,000 draws over 1500 records: each about 20 times; none far off.
    assert len(seen) == 1500 and max(seen.values()) < 45
    # A small tier is passed whole, and the next tier is added when it cannot fill the limit.
    few = PeerTiers()
    for i in range(30):
        few.upsert(PeerRecord(i.to_bytes(16, "big"), "h", "a" if i < 10 else "b", False, 0, 0.0))
    got = few.candidates(me, 20, rng, sample=100)
    assert len(got) == 30  # 10 same-zone, then all 20 of the other zone


def test_candidates_of_a_requester_in_the_swarm_leave_it_out() -> None:
    tiers = PeerTiers()
    for i in range(300):
        tiers.upsert(
            record(i % 24, "a", pieces=i)
            if i < 24
            else PeerRecord(i.to_bytes(16, "big"), "h", "a", False, 1, 0.0)
        )
    me = record(5, "a")
    for seed in range(20):
        picked = tiers.candidates(me, 50, random.Random(seed), sample=60)
        assert me.peer_id not in {r.peer_id for r in picked}
        assert len(picked) >= 50


def _announce_storm(nodes: int, dialled: int = 32) -> tuple[int, list[int]]:
    """``nodes`` announce one after another before any holds a piece (a rollout's start), each
    dialling the first ``dialled`` of its handout, with the tracker's sampling and load
    bookkeeping. Returns how many hops the first node's pieces need to reach every node
    (downloaders only get pieces from the peers they dialled), and each node's downloaders."""
    rng = random.Random(1)
    tiers, load = PeerTiers(), HandoutLoad(half_life=10.0)
    downloaders: list[list[int]] = [[] for _ in range(nodes)]
    for k in range(nodes):
        me = PeerRecord(k.to_bytes(16, "big"), f"h:{k}", "a", False, 0, 0.0)
        tiers.upsert(me)
        candidates = tiers.candidates(me, 50, rng)
        chosen = choose_peers(
            candidates, me, 50, rng, load.snapshot([r.peer_id for r in candidates], 0.0)
        )
        load.record([r.peer_id for r in chosen], 0.0)
        for peer in chosen[:dialled]:
            downloaders[int.from_bytes(peer.peer_id, "big")].append(k)
    hops, frontier = {0: 0}, [0]
    while frontier:
        reached = []
        for a in frontier:
            for b in downloaders[a]:
                if b not in hops:
                    hops[b] = hops[a] + 1
                    reached.append(b)
        frontier = reached
    assert len(hops) == nodes
    return max(hops.values()), [len(d) for d in downloaders]


def test_an_announce_storm_makes_a_shallow_even_overlay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leechers' load counts in steps (LEECHER_LOAD_GRAIN): ranked by the exact count, each
    node of a storm got the nodes that announced just before it, a chain that new pieces
    crawl along hop by hop."""
    depth, fan_in = _announce_storm(1000)
    assert depth <= 8 and max(fan_in) <= 50, (depth, max(fan_in))
    monkeypatch.setattr(handout, "LEECHER_LOAD_GRAIN", 1e-9)  # the exact count
    exact_depth, _ = _announce_storm(1000)
    assert exact_depth >= 2 * depth, (exact_depth, depth)
