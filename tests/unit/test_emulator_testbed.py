"""The emulator's testbed: its pull launcher (simulations.bench_swarm.run_concurrently), all at
once or each command at its own offset from a common start (``p2preg emulate --start-spread``)
with every time counted from that common start; and the room it makes in the kernel's ARP table
for many namespaces (simulations.netns.neighbour_table_room)."""

from __future__ import annotations

import json
import os
import subprocess
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
    holders = tmp_path / "holders.json"
    with neighbour_table_room(50, tmp_path, holders) as note:
        assert [int((tmp_path / f"gc_thresh{i}").read_text()) for i in (1, 2, 3)] == [
            1250,
            2500,
            5000,
        ]
        assert note is not None and "gc_thresh3 1024 -> 5000" in note
    assert [int((tmp_path / f"gc_thresh{i}").read_text()) for i in (1, 2, 3)] == [128, 512, 1024]
    with neighbour_table_room(10, tmp_path, holders) as note:  # 100 pairs: enough already
        assert note is None
    assert int((tmp_path / "gc_thresh3").read_text()) == 1024


def test_limits_that_cannot_be_read_are_left_alone(tmp_path: Path) -> None:
    with neighbour_table_room(50, tmp_path / "missing", tmp_path / "holders.json") as note:
        assert note is None


def _limits(sysctl: Path) -> list[int]:
    return [int((sysctl / f"gc_thresh{i}").read_text()) for i in (1, 2, 3)]


def test_runs_at_once_keep_the_limits_raised_until_the_last_one_ends(tmp_path: Path) -> None:
    """Two emulations at once: the first to end must not put the limits back under the other
    (its "before" is the defaults), and the last one out restores the values from before
    the first."""
    sysctl, holders = tmp_path / "sysctl", tmp_path / "holders.json"
    sysctl.mkdir()
    for name, value in (("gc_thresh1", 128), ("gc_thresh2", 512), ("gc_thresh3", 1024)):
        (sysctl / name).write_text(f"{value}\n")
    small = neighbour_table_room(30, sysctl, holders)  # 900 pairs
    large = neighbour_table_room(50, sysctl, holders)  # 2,500 pairs
    small.__enter__()
    assert _limits(sysctl) == [450, 900, 1800]
    large.__enter__()
    assert _limits(sysctl) == [1250, 2500, 5000]
    small.__exit__(None, None, None)  # the smaller run ends first
    assert _limits(sysctl) == [1250, 2500, 5000]
    large.__exit__(None, None, None)
    assert _limits(sysctl) == [128, 512, 1024]
    assert holders.read_text() == ""  # nobody holds them now


def test_a_holder_that_died_is_dropped_and_its_saved_limits_are_restored(
    tmp_path: Path,
) -> None:
    """A run killed with SIGKILL leaves the limits raised and its record behind; the next run
    drops it (its pid is gone) and, when it ends, puts back the values from before both."""
    sysctl, holders = tmp_path / "sysctl", tmp_path / "holders.json"
    sysctl.mkdir()
    for name, value in (("gc_thresh1", 1250), ("gc_thresh2", 2500), ("gc_thresh3", 5000)):
        (sysctl / name).write_text(f"{value}\n")  # raised by the dead run
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    original = {"gc_thresh1": 128, "gc_thresh2": 512, "gc_thresh3": 1024}
    holders.write_text(
        json.dumps({"original": original, "holders": {f"{dead.stdout.strip()}:0": original}})
    )
    with neighbour_table_room(10, sysctl, holders) as note:
        assert note is None  # enough already
        [mine] = json.loads(holders.read_text())["holders"]
        assert mine.startswith(f"{os.getpid()}:")
    assert _limits(sysctl) == [128, 512, 1024]
