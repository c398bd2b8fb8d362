"""simulations/bench_tracker.py against the real tracker process, small: the numbers in
docs/tracker.md come from this script, so it must keep measuring what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations import bench_tracker

pytestmark = pytest.mark.timeout(120)


def test_announces_are_answered_and_the_tracker_cpu_is_counted(tmp_path: Path) -> None:
    result = bench_tracker.run(peers=30, announces=200, connections=4, interval=1.0, work=tmp_path)
    assert result.announces == 200 and result.peers == 30
    assert result.tracker_cpu_s > 0 and result.cpu_ms_per_announce > 0
    assert result.announces_per_s > 0 and result.latency_p99_ms >= result.latency_p50_ms > 0
    assert result.demand_per_s == 30.0
    assert "announces a second" in result.report()


@pytest.mark.parametrize(("warm", "three_calls"), [(False, False), (True, False), (True, True)])
def test_a_storm_of_starts_gets_every_agent_through_a_tracker_with_room(
    tmp_path: Path, warm: bool, three_calls: bool
) -> None:
    result = bench_tracker.run_storm(40, 30.0, warm, tmp_path, three_calls)
    assert (result.through, result.gave_up) == (40, 0)
    assert result.tracker_cpu_s > 0 and result.start_p99_s >= result.start_p50_s > 0
    report = result.report()
    assert ("challenge" in report) is not warm
    assert ("metainfo, lease, announce" in report) is three_calls
    assert (("1 tracker call " if warm else "3 tracker calls") in report) is not three_calls


def test_the_command_line_writes_json_and_refuses_bad_counts(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert bench_tracker.main(["--peers", "5", "--announces", "20", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["announces"] == 20
    assert bench_tracker.main(["--peers", "0"]) == 2
    assert bench_tracker.main(["--storm", "--peers", "20000"]) == 2
