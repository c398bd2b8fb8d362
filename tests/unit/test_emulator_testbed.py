"""The emulator's testbed: its pull launcher (simulations.bench_swarm.run_concurrently), all at
once or each command at its own offset from a common start (``p2preg emulate --start-spread``)
with every time counted from that common start; and the room it makes in the kernel's ARP table
for many namespaces (simulations.netns.neighbour_table_room)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from simulations.bench_swarm import run_concurrently
from simulations.emulator import start_offsets
from simulations.netns import neighbour_table_room

QUICK = [sys.executable, "-c", "print('ok')"]


def test_each_command_starts_at_its_offset_and_is_timed_from_the_common_start() -> None:
    ticks: list[int] = []
    finished = run_concurrently(
        [QUICK, QUICK, QUICK], 30, lambda p, _: ticks.append(p), [0, 0.6, 0.3]
    )
    assert [f.returncode for f in finished] == [0, 0, 0]
    assert [f.stdout for f in finished] == ["ok\n"] * 3  # in the commands' order
    first, late, middle = (f.seconds for f in finished)
    assert late >= 0.6 and middle >= 0.3
    assert first < middle < late
    assert ticks[-1] == 0


def test_without_offsets_every_command_starts_at_once() -> None:
    finished = run_concurrently([QUICK] * 4, 30, lambda *_: None)
    assert [f.returncode for f in finished] == [0] * 4
    assert max(f.seconds for f in finished) < 5


@pytest.mark.parametrize("offsets", [[0.0], [0.0, -1.0], [0.0, float("inf")]])
def test_offsets_must_be_one_finite_delay_per_command(offsets: list[float]) -> None:
    with pytest.raises(ValueError, match="offsets"):
        run_concurrently([QUICK, QUICK], 30, lambda *_: None, offsets)


def test_start_offsets_first_at_once_others_within_the_spread_and_seeded() -> None:
    offsets = start_offsets(16, 2.0, seed=7)
    assert offsets[0] == 0.0 and all(0 <= o <= 2.0 for o in offsets) and len(offsets) == 16
    assert max(offsets) > 1.0  # spread out, not bunched at 0
    assert offsets == start_offsets(16, 2.0, seed=7) != start_offsets(16, 2.0, seed=8)
    assert start_offsets(5, 0.0, seed=7) == [0.0] * 5


def test_the_arp_table_gets_room_for_every_pair_of_hosts_and_its_limits_come_back(
    tmp_path: Path,
) -> None:
    """netns.neighbour_table_room: the ARP table's limits are shared by all namespaces; at
    1,024 entries 48 emulated nodes overflowed it and could not connect to their peers."""
    for name, value in (("gc_thresh1", 128), ("gc_thresh2", 512), ("gc_thresh3", 1024)):
        (tmp_path / name).write_text(f"{value}\n")
    with neighbour_table_room(50, tmp_path) as note:
        assert [int((tmp_path / f"gc_thresh{i}").read_text()) for i in (1, 2, 3)] == [
            1250,
            2500,
            5000,
        ]
        assert note is not None and "gc_thresh3 1024 -> 5000" in note
    assert [int((tmp_path / f"gc_thresh{i}").read_text()) for i in (1, 2, 3)] == [128, 512, 1024]
    with neighbour_table_room(10, tmp_path) as note:  # 100 pairs: enough already
        assert note is None
    assert int((tmp_path / "gc_thresh3").read_text()) == 1024


def test_limits_that_cannot_be_read_are_left_alone(tmp_path: Path) -> None:
    with neighbour_table_room(50, tmp_path / "missing") as note:
        assert note is None
