"""`p2preg emulate`, run as operators run it: a small rollout with real processes end to end.

Three nodes, a 24 MiB layer, 8 MiB/s links: the real origin (docker-registry), a tracker and three
agents in network namespaces this run creates, against direct pulls and the BitTorrent baseline
(aria2c + opentracker) on the same links. The test reads the JSON and the plot the command
writes, checks the figures against physics (nobody beats the lower bound, direct pulls cost the
origin one copy per node, p2preg about one in all), and checks that no namespace or process of
the run is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tools import require_netns, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MiB = 1024 * 1024
NODES = 3
BLOB = 24 * MiB
RATE = 8 * MiB


def _leftovers(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def _namespaces(marker: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line for line in listed.stdout.splitlines() if marker in line]


def _emulate(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], int]:
    argv = [sys.executable, "-m", "p2preg", "emulate", "--nodes", str(NODES)]
    argv += ["--blob-size", str(BLOB), "--node-bandwidth", str(RATE), *extra]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        stdout, stderr = process.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        process.terminate()  # the emulator cleans up on SIGTERM
        process.communicate(timeout=30)
        raise
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr), process.pid


def test_emulated_rollout_against_baselines(tmp_path: Path) -> None:
    require_netns()
    for tool in ("docker-registry", "curl", "aria2c", "opentracker"):
        require_tool(tool)
    result, pid = _emulate(
        tmp_path, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Nothing of the run is left: its namespaces and work dir are named p2pe-<pid>-...
    assert _namespaces(f"p2pe-{pid}-") == []
    assert _leftovers(f"/tmp/p2pe-{pid}-") == []
    assert list(Path("/tmp").glob(f"p2pe-{pid}-*")) == []

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["nodes"] == NODES and report["blob_bytes"] == BLOB
    assert report["links"]["shaping"] == "netns"
    assert report["links"]["node_upload"] == RATE
    bound = report["bound_s"]
    assert bound == pytest.approx(BLOB / RATE)  # F/d = F/u_origin dominate with 3 nodes
    systems = report["systems"]
    assert set(systems) == {"p2preg", "direct", "bittorrent"}
    for name, system in systems.items():
        times = list(system["completion_s"].values())
        assert len(times) == NODES and all(t is not None for t in times), (name, system)
        # Physics: a node cannot get F bytes through a link of rate d in less than F/d (the
        # tbf burst of 256 KiB is the only slack).
        assert min(times) >= 0.95 * bound, (name, times)
        assert system["p50_s"] <= system["p90_s"] <= system["p99_s"] <= system["max_s"]
    p2p = systems["p2preg"]
    assert report["max_s"] == p2p["max_s"] and report["origin_bytes"] == p2p["origin_bytes"]
    assert BLOB <= p2p["origin_bytes"] <= 1.1 * BLOB  # about one copy for the whole fleet
    assert p2p["peer_bytes"] == (NODES - 1) * BLOB  # the rest came from peers
    direct = systems["direct"]
    assert direct["origin_bytes"] >= NODES * BLOB  # one copy per node, plus manifests
    assert direct["max_s"] >= 0.95 * NODES * BLOB / RATE  # all of it through the origin's link
    assert systems["bittorrent"]["origin_bytes"] >= BLOB
    assert "aria2c" in report["clients"] and "curl" in report["clients"]
    egress = p2p["origin_egress"]
    assert egress and egress[-1][1] >= 0.9 * BLOB
    assert "simulated" in report and report["simulated"]["max_s"] >= bound

    table = result.stdout
    for row in ("p2preg", "direct", "bittorrent", "simulated (p2preg)"):
        assert f"\n{row} " in table
    assert "origin bytes at most 1.1x the blob" in table
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_emulated_rollout_with_rate_limits_and_staggered_starts(tmp_path: Path) -> None:
    """Without namespaces (--shaping limits): the agents' own limits and a pacing relay. The
    pulls start over 1 s (--start-spread), each system's at the same offsets."""
    require_tool("docker-registry")
    require_tool("curl")
    result, _ = _emulate(
        tmp_path,
        "--shaping",
        "limits",
        "--baselines",
        "direct",
        "--no-simulate",
        "--start-spread",
        "1s",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["links"]["shaping"] == "limits"
    assert "limits" in result.stdout
    offsets = report["start_offsets_s"]
    assert len(offsets) == NODES and min(offsets.values()) == 0.0 <= max(offsets.values()) <= 1.0
    assert "starts: spread over" in result.stdout
    for system in report["systems"].values():
        times = system["completion_s"]
        assert set(times) == set(offsets)
        for node, at in offsets.items():
            # Timed from the first start: a late node's pull cannot end before its own start
            # plus F / d.
            assert times[node] is not None and times[node] >= at + 0.9 * BLOB / RATE, system
    assert report["origin_bytes"] <= 1.1 * BLOB
    assert report["systems"]["direct"]["origin_bytes"] >= NODES * BLOB


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nodes", "0"], "--nodes must be between"),
        (["--blob-size", "lots"], "--blob-size"),
        (["--baselines", "direct,ipfs"], "unknown ipfs"),
        (["--piece-length", "3MiB"], "power of two"),
        (["--start-spread", "soon"], "--start-spread"),
        (["--start-spread", "30s"], "--start-spread must be shorter than"),
    ],
)
def test_bad_flags_are_one_line_errors(flags: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2preg", "emulate", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
