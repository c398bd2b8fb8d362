"""Rollout emulator (``p2preg emulate``): real processes on shaped links, against baselines.

    p2preg emulate --nodes 8 --blob-size 200MiB --node-bandwidth 20MiB \
        [--origin-bandwidth RATE] [--baselines direct,bittorrent] [--json FILE] [--plot FILE.png]

One run:

1. generates a test image (one random layer of ``--blob-size``, a config, an OCI manifest tagged
   ``rollout``) and pushes it to a real origin registry (docker-registry);
2. lays out the links (simulations/bench_swarm.py's testbeds): as root, the origin, the tracker
   and every node in its own network namespace with tbf caps both ways ("netns"); otherwise
   everything on 127.0.0.1 with the agents' own rate limits and a pacing relay before the origin
   ("limits"). The report says which;
3. p2preg: a tracker and N agents as separate processes, then N image pulls at the same instant
   (or, with ``--start-spread``, at seeded offsets over that span, the same for every system),
   one per node through its own agent (manifest by tag, config, layer: one curl per node);
4. each baseline on the same links: ``direct`` (every node pulls the image from the origin) and
   ``bittorrent`` (aria2c seeding the layer from the origin's node, opentracker, aria2c on every
   node; simulations/bittorrent.py);
5. prints a summary table (p50 / p90 / max completion, ratio to the Kumar & Ross bound, origin
   bytes) and, on request, the JSON and a plot (completion CDFs and the origin's egress).

Completion time of a node: from the common start until its pull's last byte arrived (for p2preg
and direct, curl exits after the layer; for BitTorrent, aria2c reports the file complete and
verified). The layer dominates: the manifest and config are a few hundred bytes.

Safety: as bench_swarm (servers on 127.0.0.1 or 10.204.0.0/24 inside namespaces this run makes;
everything removed on success, failure, Ctrl-C and SIGTERM; every wait bounded).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from p2preg.errors import ConfigError
from p2preg.metainfo import piece_length_for
from p2preg.units import parse_duration, parse_size
from simulations.bench_registry import (
    REPOSITORY,
    BenchError,
    Blob,
    agent_env,
    curl_version,
    free_port,
    push_blob,
    registry_version,
    run_until_done,
    start_origin,
    write_random_blob,
)
from simulations.bench_swarm import (
    MAX_NODES,
    ORIGIN_IP,
    PAYLOAD_FRACTION,
    PULL_GRACE,
    PULL_SLACK,
    TRACKER_IP,
    Caps,
    CpuMonitor,
    LimitsTestbed,
    NetnsTestbed,
    NodeResult,
    Setup,
    Testbed,
    annotate_from_log,
    copy_logs,
    open_testbed,
    run_concurrently,
    start_swarm,
    wait_committed,
)
from simulations.netns import (
    NetnsError,
    netns_unavailable_reason,
    wrap,
)

MiB = 1024**2
TAG = "rollout"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
SYSTEMS = ("direct", "bittorrent")  # the baselines
EGRESS_INTERVAL = 0.25  # seconds between samples of the origin's egress counter
POLL_INTERVAL = 0.02
LOG_SETTLE = 0.5
TIME_TARGET = 1.3
ORIGIN_TARGET = 1.1


def say(message: str) -> None:
    print(f"[emulate] {message}", file=sys.stderr, flush=True)


def percentile(times: Sequence[float | None], q: float) -> float:
    """Nearest rank, as the simulator; a node that never finished counts as infinitely late."""
    ordered = sorted(math.inf if t is None else t for t in times)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- the test image ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TestImage:
    layer: Blob
    config_digest: str
    config_size: int
    manifest_digest: str
    manifest_size: int

    def urls(self, base: str) -> list[tuple[str, int]]:
        """What a pull fetches, in order, with the size each answer must have."""
        v2 = f"{base}/v2/{REPOSITORY}"
        return [
            (f"{v2}/manifests/{TAG}", self.manifest_size),
            (f"{v2}/blobs/{self.config_digest}", self.config_size),
            (self.layer.url(base), self.layer.size),
        ]


def _push_small_blob(client: httpx.Client, origin_url: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    started = client.post(f"{origin_url}/v2/{REPOSITORY}/blobs/uploads/")
    if started.status_code != 202 or "location" not in started.headers:
        raise BenchError(f"upload POST: HTTP {started.status_code}")
    location = urljoin(origin_url, started.headers["location"])
    if not location.startswith(f"{origin_url}/"):
        raise BenchError(f"upload POST: unexpected Location {location}")
    separator = "&" if "?" in location else "?"
    put = client.put(
        f"{location}{separator}digest={digest}",
        content=data,
        headers={"content-type": "application/octet-stream"},
    )
    if put.status_code != 201:
        raise BenchError(f"upload PUT: HTTP {put.status_code} {put.text[:200]}")
    return digest


def push_test_image(origin_url: str, layer: Blob) -> TestImage:
    """The layer (already written to disk), a config and a manifest tagged ``rollout``."""
    push_blob(origin_url, layer)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
            "config": {},
        },
        sort_keys=True,
    ).encode()
    try:
        with httpx.Client(trust_env=False, timeout=30) as client:
            config_digest = _push_small_blob(client, origin_url, config)
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": MANIFEST_TYPE,
                    "config": {
                        "mediaType": CONFIG_TYPE,
                        "digest": config_digest,
                        "size": len(config),
                    },
                    "layers": [
                        {"mediaType": LAYER_TYPE, "digest": layer.digest, "size": layer.size}
                    ],
                },
                sort_keys=True,
            ).encode()
            put = client.put(
                f"{origin_url}/v2/{REPOSITORY}/manifests/{TAG}",
                content=manifest,
                headers={"content-type": MANIFEST_TYPE},
            )
            if put.status_code != 201:
                raise BenchError(f"manifest PUT: HTTP {put.status_code} {put.text[:200]}")
    except httpx.HTTPError as exc:
        raise BenchError(f"pushing the test image to {origin_url}: {exc}") from exc
    return TestImage(
        layer,
        config_digest,
        len(config),
        "sha256:" + hashlib.sha256(manifest).hexdigest(),
        len(manifest),
    )


# --- measuring one system ------------------------------------------------------------------------


class EgressSampler:
    """A thread sampling the origin's cumulative egress counter every EGRESS_INTERVAL seconds."""

    def __init__(self, read: Callable[[], int] | None) -> None:
        self.read = read
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_value = 0
        self._started = 0.0

    def start(self, started: float) -> None:
        if self.read is None:
            return
        self._started = started
        self._start_value = self.read()
        self._thread = threading.Thread(target=self._loop, name="egress-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        assert self.read is not None
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            value = self.read() - self._start_value
            self.samples.append((round(time.monotonic() - self._started, 3), value))

    def _loop(self) -> None:
        while not self._stop.wait(EGRESS_INTERVAL):
            self._sample()

    def stop(self) -> list[tuple[float, int]]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._sample()
        return self.samples


@dataclass(slots=True)
class SystemResult:
    system: str  # "p2preg", "direct", "bittorrent"
    completion_s: dict[str, float | None] = field(default_factory=dict)
    origin_bytes: int = 0
    peer_bytes: int | None = None  # bytes nodes received from each other
    origin_egress: list[tuple[float, int]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    clients: dict[str, str] = field(default_factory=dict)
    failed: str | None = None
    cpu_busy: float | None = None  # mean machine-wide busy share during the pulls
    cpu_detail: str = ""  # who used the CPU (ours by role, the busiest others)
    # CPU seconds our processes used during the pulls, by role ("agents", "origin", "curl", ...)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    # netns only: frame bytes each node's link carried during the pulls, (sent, received)
    link_bytes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def times(self) -> list[float | None]:
        return list(self.completion_s.values())

    def stats(self, caps: Caps) -> dict[str, Any]:
        p50, p90, p99, top = (percentile(self.times, q) for q in (50, 90, 99, 100))
        bound = caps.bound
        return {
            "p50_s": _finite(p50),
            "p90_s": _finite(p90),
            "p99_s": _finite(p99),
            "max_s": _finite(top),
            "ratio_p50": _finite(p50 / bound),
            "ratio_max": _finite(top / bound),
            "origin_bytes": self.origin_bytes,
            "origin_copies": self.origin_bytes / caps.blob_size,
            "peer_bytes": self.peer_bytes,
            "completed": sum(1 for t in self.times if t is not None),
        }


def pull_argv(image: TestImage, base: str, timeout: float, extra: Sequence[str]) -> list[str]:
    argv = ["curl", "-s", "-S", "--noproxy", "*", "--max-time", f"{timeout:.0f}"]
    argv += ["-H", f"Accept: {MANIFEST_TYPE}", *extra]
    for url, _size in image.urls(base):
        argv += ["-o", "/dev/null", "-w", "%{http_code} %{size_download}\\n", url]
    return argv


def run_image_pulls(
    targets: Sequence[tuple[str, str, Any]],
    image: TestImage,
    timeout: float,
    extra: Sequence[str],
    monitor: CpuMonitor,
    egress: EgressSampler,
    label: str,
    offsets: Sequence[float] | None = None,
) -> tuple[dict[str, float | None], dict[str, str]]:
    """One curl per (node, base URL, namespace), all started at once or each at its offset
    from the common start (``offsets``, in the targets' order); bounded wait for all."""
    argvs = [wrap(pull_argv(image, base, timeout, extra), netns) for _, base, netns in targets]
    next_report = 5.0

    def tick(pending: int, elapsed: float) -> None:
        nonlocal next_report
        monitor.sample()
        if elapsed >= next_report and pending:
            done = len(targets) - pending
            say(f"{label}: {done}/{len(targets)} nodes done after {elapsed:.0f} s")
            next_report = elapsed + 5.0

    egress.start(time.monotonic())
    try:
        finished = run_concurrently(argvs, timeout, tick, offsets)
    finally:
        egress.stop()
    times: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    expected = image.urls("")
    for (name, _, _), done in zip(targets, finished, strict=True):
        answers = [line.split() for line in done.stdout.splitlines() if line.strip()]
        good = done.returncode == 0 and answers == [["200", str(size)] for _, size in expected]
        times[name] = done.seconds if good else None
        if not good:
            errors[name] = f"curl exit {done.returncode}: {done.stdout.split()} {done.stderr[:200]}"
    return times, errors


@dataclass(slots=True)
class Emulation:
    setup: Setup
    testbed: Testbed
    image: TestImage
    layer_path: Path  # a copy of the layer, for the BitTorrent seeder
    # When each node's pull starts, in seconds after the common start (--start-spread), by
    # node name; empty: all at once.
    start_offsets: dict[str, float] = field(default_factory=dict)

    def offsets(self, names: Sequence[str]) -> list[float] | None:
        return [self.start_offsets[name] for name in names] if self.start_offsets else None

    def egress_reader(self) -> Callable[[], int] | None:
        """The origin's live egress: its veth's wire bytes (payload share) or the relay's count."""
        testbed = self.testbed
        if isinstance(testbed, NetnsTestbed):
            return lambda: int(testbed.origin_counters()["veth_wire_bytes"] * PAYLOAD_FRACTION)
        if isinstance(testbed, LimitsTestbed):
            return lambda: testbed.relay.relay.bytes_from_origin
        return None

    def measure_p2preg(self) -> SystemResult:
        setup, testbed = self.setup, self.testbed
        result = SystemResult("p2preg", clients={"curl": curl_version()})
        timeout = PULL_GRACE + PULL_SLACK * setup.caps.bound
        with contextlib.ExitStack() as stack:
            _tracker, agents = start_swarm(stack, setup, testbed, "p2preg")
            say(f"p2preg: tracker and {len(agents)} agents ready; {len(agents)} pulls start")
            before, links_before = testbed.origin_counters(), testbed.link_counters()
            monitor = CpuMonitor(
                {"agents": [a.pid for a in agents], "origin": [testbed.origin.pid]}
            )
            targets = [
                (a.node.name, f"http://{a.node.registry_addr}", a.node.netns) for a in agents
            ]
            result.completion_s, result.errors = run_image_pulls(
                targets,
                self.image,
                timeout,
                [],
                monitor,
                egress := self.sampler(),
                "p2preg",
                self.offsets([name for name, _, _ in targets]),
            )
            result.origin_egress = egress.samples
            cpu = monitor.finish()
            result.cpu_busy = cpu.machine_busy
            result.cpu_detail = cpu.describe()
            result.cpu_seconds = {
                role: cores * cpu.wall_seconds for role, cores in cpu.cores.items()
            }
            links_after = testbed.link_counters()
            result.link_bytes = {
                name: (sent - links_before[name][0], received - links_before[name][1])
                for name, (sent, received) in links_after.items()
                if name in links_before
            }
            node_results = [NodeResult(a.node.name) for a in agents]
            wait_committed(agents, node_results, self.image.layer)
            time.sleep(LOG_SETTLE)
            after = testbed.origin_counters()
            result.origin_bytes = after[testbed.primary_counter] - before[testbed.primary_counter]
            peer_bytes = 0
            for agent, node_result in zip(agents, node_results, strict=True):
                annotate_from_log(node_result, agent.log_text(), self.image.layer)
                peer_bytes += node_result.bytes_from_peers or 0
                if node_result.bytes_from_origin:
                    result.notes.append(
                        f"{node_result.node}: {node_result.bytes_from_origin / MiB:.1f} MiB from "
                        f"the origin ({node_result.how})"
                    )
            result.peer_bytes = peer_bytes
        return result

    def measure_direct(self) -> SystemResult:
        testbed = self.testbed
        result = SystemResult("direct", clients={"curl": curl_version()})
        timeout = PULL_GRACE + PULL_SLACK * self.setup.caps.direct_ideal
        say(f"direct: {len(testbed.nodes)} pulls straight from the origin")
        before = testbed.origin_counters()
        monitor = CpuMonitor({"origin": [testbed.origin.pid]})
        targets = [(node.name, testbed.direct_url, node.netns) for node in testbed.nodes]
        result.completion_s, result.errors = run_image_pulls(
            targets,
            self.image,
            timeout,
            testbed.direct_curl_flags,
            monitor,
            egress := self.sampler(),
            "direct",
            self.offsets([name for name, _, _ in targets]),
        )
        result.origin_egress = egress.samples
        result.cpu_busy = monitor.finish().machine_busy
        time.sleep(LOG_SETTLE)
        after = testbed.origin_counters()
        result.origin_bytes = after[testbed.primary_counter] - before[testbed.primary_counter]
        result.peer_bytes = 0
        return result

    def measure_bittorrent(self, piece_length: int) -> SystemResult:
        from simulations.bittorrent import BtHost, run_bittorrent

        setup, testbed = self.setup, self.testbed
        caps = setup.caps
        result = SystemResult("bittorrent")
        say(f"bittorrent: aria2c seeding from the origin's node, {len(testbed.nodes)} leechers")
        if isinstance(testbed, NetnsTestbed):
            seeder = BtHost("origin", testbed.origin_ns, ORIGIN_IP)
            tracker = BtHost("tracker", testbed.tracker_netns, TRACKER_IP)
            leechers = [
                BtHost(n.name, n.netns, n.peer_addr.rsplit(":", 1)[0]) for n in testbed.nodes
            ]
            rates: dict[str, int | None] = {"per_node_rate": None, "origin_rate": None}
        else:
            seeder = BtHost("origin", None, "127.0.0.1")
            tracker = BtHost("tracker", None, "127.0.0.1")
            leechers = [BtHost(n.name, None, "127.0.0.1") for n in testbed.nodes]
            rates = {"per_node_rate": caps.node_rate, "origin_rate": caps.origin_rate}
        egress = self.sampler() if isinstance(testbed, NetnsTestbed) else EgressSampler(None)
        work = setup.work / "bittorrent"
        work.mkdir(exist_ok=True)
        timeout = PULL_GRACE + PULL_SLACK * caps.direct_ideal
        monitor = CpuMonitor({})
        stop_monitor = threading.Event()

        def sample_cpu() -> None:
            while not stop_monitor.wait(0.5):
                monitor.sample()

        cpu_thread = threading.Thread(target=sample_cpu, daemon=True)
        cpu_thread.start()
        sampling_since = time.monotonic()
        egress.start(sampling_since)
        try:
            bt = run_bittorrent(
                work,
                self.layer_path,
                seeder,
                tracker,
                leechers,
                piece_length=piece_length,
                deadline_s=timeout,
                progress=lambda message: say(f"bittorrent: {message}"),
                start_offsets=self.offsets([host.name for host in leechers]),
                per_node_rate=rates["per_node_rate"],
                origin_rate=rates["origin_rate"],
            )
        finally:
            stop_monitor.set()
            cpu_thread.join(timeout=5)
            egress.stop()
        result.cpu_busy = monitor.finish().machine_busy
        result.completion_s = dict(bt.completion_s)
        result.origin_bytes = bt.seeder_upload_bytes
        result.peer_bytes = bt.peer_upload_bytes
        result.clients = dict(bt.clients)
        result.notes = list(bt.notes)
        # The sampler started before run_bittorrent's t = 0 (the seeder's hash check and its
        # registration at the tracker): shift the samples to t = 0 and count bytes from there.
        offset = (bt.t0_monotonic - sampling_since) if bt.t0_monotonic else 0.0
        before = [b for t, b in egress.samples if t <= offset]
        base = before[-1] if before else 0
        result.origin_egress = [
            (round(t - offset, 3), b - base) for t, b in egress.samples if t > offset
        ]
        if not isinstance(testbed, NetnsTestbed):  # no live counter: one point at the end
            end = max((t for t in result.times if t is not None), default=0.0)
            result.origin_egress = [(end, bt.seeder_upload_bytes)]
        return result

    def sampler(self) -> EgressSampler:
        return EgressSampler(self.egress_reader())


# --- the simulator's prediction for the same scenario --------------------------------------------


def simulate_same(
    caps: Caps,
    piece_length: int,
    payload_fraction: float,
    seed: int,
    start_offsets: Sequence[float] = (),
) -> Any:
    """``p2preg simulate`` on this run's N, sizes and caps (payload rates: what tbf leaves for TCP
    payload after Ethernet, IP and TCP headers) and the same start offsets, for the
    simulator-vs-emulator comparison."""
    from simulations.simulator import SimConfig, simulate

    config = SimConfig(
        nodes=caps.nodes,
        blob_size=caps.blob_size,
        node_upload=caps.node_rate * payload_fraction,
        node_download=caps.node_rate * payload_fraction,
        origin_upload=caps.origin_rate * payload_fraction,
        piece_length=piece_length,
        seed=seed,
        start_times=tuple(start_offsets),
    )
    return simulate(config)


# --- report --------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def summary_table(results: Sequence[SystemResult], caps: Caps, simulated: Any | None) -> str:
    header = (
        f"{'system':<22} {'done':>7} {'p50 s':>8} {'p90 s':>8} {'max s':>8} {'p50/T':>7} "
        f"{'max/T':>7} {'origin MiB':>11} {'copies':>7} {'peers MiB':>10}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        if result.failed:
            lines.append(f"{result.system:<22} failed: {result.failed}")
            continue
        st = result.stats(caps)
        peers = "-" if st["peer_bytes"] is None else f"{st['peer_bytes'] / MiB:.1f}"
        lines.append(
            f"{result.system:<22} {st['completed']:>3}/{caps.nodes:<3} {_s(st['p50_s']):>8} "
            f"{_s(st['p90_s']):>8} {_s(st['max_s']):>8} {_x(st['ratio_p50']):>7} "
            f"{_x(st['ratio_max']):>7} {st['origin_bytes'] / MiB:>11.1f} "
            f"{st['origin_copies']:>7.2f} {peers:>10}"
        )
    if simulated is not None:
        summary = simulated.summary()
        lines.append(
            f"{'simulated (p2preg)':<22} {caps.nodes:>3}/{caps.nodes:<3} "
            f"{_s(summary['p50_s']):>8} {_s(summary['p90_s']):>8} {_s(summary['max_s']):>8} "
            f"{_x(summary['p50_s'] / caps.bound):>7} {_x(summary['max_s'] / caps.bound):>7} "
            f"{summary['origin_bytes'] / MiB:>11.1f} {summary['origin_copies']:>7.2f} "
            f"{summary['peer_bytes'] / MiB:>10.1f}"
        )
    return "\n".join(lines)


def verdicts(results: Sequence[SystemResult], caps: Caps, simulated: Any | None) -> list[str]:
    by_name = {r.system: r for r in results if not r.failed}
    p2p = by_name.get("p2preg")
    if p2p is None:
        return ["p2preg did not complete: no verdicts"]
    st = p2p.stats(caps)
    out = []
    ratio = st["ratio_max"]
    out.append(
        f"p2preg max within {TIME_TARGET}x of the bound: "
        + (
            "MISSED (a node did not finish)"
            if ratio is None
            else f"{ratio:.2f}x {'met' if ratio <= TIME_TARGET else 'MISSED'}"
        )
    )
    copies = st["origin_copies"]
    out.append(
        f"origin bytes at most {ORIGIN_TARGET}x the blob: {copies:.2f}x "
        + ("met" if copies <= ORIGIN_TARGET else "MISSED")
    )
    bt = by_name.get("bittorrent")
    if bt is not None:
        bt_max = bt.stats(caps)["max_s"]
        if st["max_s"] is not None and bt_max is not None:
            faster = st["max_s"] < bt_max
            out.append(
                f"p2preg max faster than BitTorrent's: {st['max_s']:.2f} s vs {bt_max:.2f} s "
                + ("met" if faster else "MISSED")
            )
    if simulated is not None and st["p50_s"] is not None and st["max_s"] is not None:
        summary = simulated.summary()
        for key in ("p50_s", "max_s"):
            predicted, measured = summary[key], st[key]
            if predicted is None:
                continue
            error = predicted / measured - 1
            within = "yes" if abs(error) <= 0.2 else "no"
            out.append(
                f"simulator vs emulator {key[:-2]}: predicted {predicted:.2f} s, measured "
                f"{measured:.2f} s ({error:+.0%}; within 20%: {within})"
            )
    return out


@dataclass(slots=True)
class Report:
    caps: Caps
    shaping: str
    shaping_detail: str
    piece_length: int
    results: list[SystemResult]
    simulated: Any | None
    clients: dict[str, str]
    load_before: float
    wall_s: float = 0.0
    start_offsets: dict[str, float] = field(default_factory=dict)  # by node; empty: at once

    def text(self) -> str:
        c = self.caps
        lines = [
            "",
            f"rollout of a {c.blob_size / MiB:.0f} MiB image layer to {c.nodes} nodes; "
            f"node links {c.node_rate / MiB:g} MiB/s up and down, origin "
            f"{c.origin_rate / MiB:g} MiB/s",
            f"shaping: {self.shaping_detail}",
            *(
                [
                    f"starts: spread over {max(self.start_offsets.values()):.2f} s (the same "
                    "offsets for every system); times count from the first start"
                ]
                if self.start_offsets
                else []
            ),
            c.describe_bound(),
            "",
            summary_table(self.results, c, self.simulated),
            "",
            *verdicts(self.results, c, self.simulated),
        ]
        for result in self.results:
            if result.errors:
                lines.append(f"{result.system} errors: {result.errors}")
            if result.cpu_busy is not None and result.cpu_busy >= 0.85:
                lines.append(
                    f"{result.system}: the machine's CPUs were {result.cpu_busy:.0%} busy during "
                    "the pulls: the CPU, not only the links, may have set the pace"
                )
            if result.cpu_detail:
                lines.append(f"{result.system} CPU: {result.cpu_detail}")
            for note in result.notes:
                lines.append(f"{result.system}: {note}")
            if result.link_bytes:
                f = self.caps.blob_size
                cells = ", ".join(
                    f"{name} {sent / f:.2f}/{received / f:.2f}"
                    for name, (sent, received) in result.link_bytes.items()
                )
                lines.append(f"{result.system} link bytes sent/received, in blobs: {cells}")
        lines.append(f"clients: {', '.join(f'{k} {v}' for k, v in self.clients.items())}")
        lines.append(f"1-min load before the run: {self.load_before:.2f}; wall {self.wall_s:.0f} s")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        c = self.caps
        systems = {}
        for result in self.results:
            entry: dict[str, Any] = {"failed": result.failed}
            if not result.failed:
                entry.update(result.stats(c))
            entry.update(
                completion_s=result.completion_s,
                origin_egress=[list(sample) for sample in result.origin_egress],
                errors=result.errors,
                notes=result.notes,
                clients=result.clients,
                cpu_busy=result.cpu_busy,
                cpu_detail=result.cpu_detail,
                cpu_seconds=result.cpu_seconds,
                link_bytes=result.link_bytes,
            )
            systems[result.system] = entry
        p2p = systems.get("p2preg", {})
        out: dict[str, Any] = {
            "nodes": c.nodes,
            "blob_bytes": c.blob_size,
            "piece_length": self.piece_length,
            "bound_s": c.bound,
            # p2preg's figures at the top level; every system's under "systems".
            **{k: p2p.get(k) for k in ("p50_s", "p90_s", "p99_s", "max_s", "origin_bytes")},
            "completion_s": p2p.get("completion_s"),
            "links": {
                "node_upload": c.node_rate,
                "node_download": c.node_rate,
                "origin_upload": c.origin_rate,
                "shaping": self.shaping,
                "detail": self.shaping_detail,
            },
            "clients": self.clients,
            "start_offsets_s": self.start_offsets,
            "systems": systems,
            "load_before": self.load_before,
            "wall_s": self.wall_s,
        }
        if self.simulated is not None:
            summary = self.simulated.summary()
            out["simulated"] = {
                k: summary[k]
                for k in ("p50_s", "p90_s", "p99_s", "max_s", "origin_bytes", "peer_bytes")
            }
        return out

    def plot(self, path: Path) -> None:
        from simulations.plots import plot_rollout

        c = self.caps
        series: dict[str, list[float | None]] = {}
        egress: dict[str, list[tuple[float, int]]] = {}
        for result in self.results:
            if result.failed:
                continue
            series[result.system] = result.times
            egress[result.system] = result.origin_egress
        if self.simulated is not None:
            series["simulated p2preg"] = list(self.simulated.completion_s)
        title = (
            f"{c.nodes} nodes, {c.blob_size / MiB:.0f} MiB, nodes {c.node_rate / MiB:g} MiB/s, "
            f"origin {c.origin_rate / MiB:g} MiB/s ({self.shaping})"
        )
        plot_rollout(path, title, series, c.bound, egress, c.blob_size)


# --- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=8, help="pulling nodes (default 8)")
    parser.add_argument("--blob-size", default="200MiB", help="the image layer's size (200MiB)")
    parser.add_argument(
        "--node-bandwidth",
        default="8MiB",
        help="each node's upload and download cap, per second (8MiB: 8 nodes leave the CPUs of "
        "a 2-vCPU machine room, docs/rollouts.md)",
    )
    parser.add_argument("--origin-bandwidth", help="the origin's cap (default: the node's)")
    parser.add_argument(
        "--baselines",
        default="direct,bittorrent",
        help="comma-separated: direct, bittorrent, or none (default: both)",
    )
    parser.add_argument(
        "--piece-length",
        default="auto",
        help="p2preg's piece length (default auto: by the blob's size, as the agent)",
    )
    parser.add_argument(
        "--bt-piece-length",
        default="256KiB",
        help="the BitTorrent baseline's (256KiB: mktorrent's default, usual for this size)",
    )
    parser.add_argument(
        "--shaping",
        choices=("auto", "netns", "limits"),
        default="auto",
        help="netns: namespaces + tbf (root); limits: rate limits on 127.0.0.1; auto (default)",
    )
    parser.add_argument(
        "--no-simulate",
        action="store_true",
        help="skip the simulator's prediction for the same scenario",
    )
    parser.add_argument(
        "--start-spread",
        default="0",
        metavar="DURATION",
        help="start the pulls at random moments over this long instead of all at once, as a "
        "real rollout does (0; drawn with --seed; every system gets the same offsets)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="the simulator's seed and the start offsets' (1)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the full results here")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw CDFs and egress here")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the logs here")
    parser.add_argument(
        "--agent-src",
        type=Path,
        metavar="DIR",
        help="run the agents and tracker from this source tree (e.g. a `git archive` snapshot)",
    )


@dataclass(frozen=True, slots=True)
class Options:
    caps: Caps
    piece_length: int
    bt_piece_length: int
    baselines: tuple[str, ...]
    shaping: str  # "netns" or "limits"
    shaping_reason: str | None  # why not netns, when auto fell back
    simulate: bool
    seed: int
    json: Path | None
    plot: Path | None
    keep_logs: Path | None
    agent_src: Path | None = None
    start_spread: float = 0.0  # seconds


def options_from_args(args: argparse.Namespace) -> Options:
    """Validate everything before anything starts; a bad value is a ConfigError (one line)."""
    blob = parse_size(args.blob_size, "--blob-size")
    node_rate = parse_size(args.node_bandwidth, "--node-bandwidth")
    origin_rate = (
        parse_size(args.origin_bandwidth, "--origin-bandwidth")
        if args.origin_bandwidth
        else node_rate
    )
    piece_length = (
        piece_length_for(blob)
        if args.piece_length == "auto"
        else parse_size(args.piece_length, "--piece-length")
    )
    bt_piece_length = parse_size(args.bt_piece_length, "--bt-piece-length")
    start_spread = parse_duration(args.start_spread, "--start-spread")
    if not 16 * 1024 <= bt_piece_length <= 64 * MiB:
        raise ConfigError("--bt-piece-length must be between 16KiB and 64MiB")
    if blob <= 0 or node_rate <= 0 or origin_rate <= 0:
        raise ConfigError("--blob-size and the bandwidths must be larger than zero")
    if piece_length < 64 * 1024 or piece_length & (piece_length - 1):
        raise ConfigError("--piece-length must be a power of two, at least 64KiB")
    if not 1 <= args.nodes <= MAX_NODES:
        raise ConfigError(f"--nodes must be between 1 and {MAX_NODES}")
    if not start_spread < blob / node_rate:
        raise ConfigError(
            f"--start-spread must be shorter than a node's own download, F/d = "
            f"{blob / node_rate:.2f} s: longer, the pulls no longer overlap as a rollout's do"
        )
    names = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if names == ["none"]:
        names = []
    unknown = [b for b in names if b not in SYSTEMS]
    if unknown:
        raise ConfigError(
            f"--baselines: unknown {', '.join(unknown)} (choose from direct, bittorrent)"
        )
    tools = ["curl", "docker-registry"] + (
        ["aria2c", "opentracker"] if "bittorrent" in names else []
    )
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} not installed (apt-get install -y "
            + " ".join({"aria2c": "aria2"}.get(t, t) for t in missing)
            + ")"
        )
    shaping, reason = args.shaping, None
    if shaping != "limits":
        reason = netns_unavailable_reason(f"p2pe-{os.getpid()}-probe")
        if reason is not None and shaping == "netns":
            raise ConfigError(f"--shaping netns is not possible here: {reason}")
        shaping = "netns" if reason is None else "limits"
    agent_src = args.agent_src.resolve() if args.agent_src is not None else None
    packages = ("agent", "p2preg", "tracker")
    if agent_src is not None and not all(
        (agent_src / package / "__init__.py").is_file() for package in packages
    ):
        raise ConfigError(f"--agent-src {agent_src}: needs agent/, p2preg/ and tracker/ there")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ConfigError("--plot needs matplotlib: pip install 'p2preg[plot]'") from exc
    return Options(
        Caps(args.nodes, blob, node_rate, origin_rate),
        piece_length,
        bt_piece_length,
        tuple(dict.fromkeys(names)),
        shaping,
        reason,
        not args.no_simulate,
        args.seed,
        args.json,
        args.plot,
        args.keep_logs,
        agent_src,
        start_spread,
    )


def start_offsets(nodes: int, spread: float, seed: int) -> list[float]:
    """When each node's pull starts after the common start: the first at once, the others
    uniform over ``spread`` seconds (as ``p2preg simulate --start-spread`` draws them)."""
    if spread <= 0:
        return [0.0] * nodes
    rng = random.Random(seed)
    return [0.0] + [round(rng.uniform(0, spread), 3) for _ in range(nodes - 1)]


def emulate(options: Options) -> Report:
    caps = options.caps
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    if options.shaping_reason is not None:
        say(f"network namespaces not available ({options.shaping_reason}); using rate limits")
    with contextlib.ExitStack() as cleanup:
        work = Path(tempfile.mkdtemp(prefix=f"p2pe-{os.getpid()}-", dir="/tmp"))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        if options.keep_logs is not None:
            cleanup.callback(copy_logs, work, options.keep_logs)
        say(f"generating a {caps.blob_size / MiB:.0f} MiB random layer in {work}")
        layer = write_random_blob(work / "layer.bin", caps.blob_size)
        storage = work / "origin-storage"
        storage.mkdir()
        origin_port = free_port()
        origin = start_origin(work, storage, f"127.0.0.1:{origin_port}", "origin-push")
        cleanup.callback(origin.close)
        image = push_test_image(f"http://127.0.0.1:{origin_port}", layer)
        say(f"pushed {REPOSITORY}:{TAG} ({image.manifest_digest}), layer {layer.digest}")
        if "bittorrent" not in options.baselines:
            layer.path.unlink()
        testbed = open_testbed(
            cleanup,
            "netns" if options.shaping == "netns" else "limits",
            caps,
            work,
            storage,
            origin,
            origin_port,
            netns_prefix=f"p2pe-{os.getpid()}-",
        )
        say(f"shaping: {testbed.describe()}")
        say(caps.describe_bound())
        secret_file = work / "cluster-secret"
        secret_file.write_text(secrets.token_hex(32) + "\n")
        setup = Setup(
            work, layer, caps, secret_file, agent_env(options.agent_src), str(options.piece_length)
        )
        # (empty: every pull at once; else one per node, in the testbed's order)
        offsets = (
            start_offsets(caps.nodes, options.start_spread, options.seed)
            if options.start_spread > 0
            else []
        )
        if offsets:
            say(f"pulls start over {options.start_spread:g} s: offsets {offsets}")
        names = [node.name for node in testbed.nodes]
        emulation = Emulation(
            setup, testbed, image, layer.path, dict(zip(names, offsets, strict=False))
        )
        results: list[SystemResult] = []
        measures: list[tuple[str, Callable[[], SystemResult]]] = [
            ("p2preg", emulation.measure_p2preg)
        ]
        if "direct" in options.baselines:
            measures.append(("direct", emulation.measure_direct))
        if "bittorrent" in options.baselines:
            measures.append(
                ("bittorrent", lambda: emulation.measure_bittorrent(options.bt_piece_length))
            )
        for name, measure in measures:
            try:
                result = measure()
            except (BenchError, NetnsError, OSError, subprocess.SubprocessError) as exc:
                result = SystemResult(name, failed=str(exc))
            results.append(result)
            if result.failed:
                say(f"{name} failed: {result.failed}")
            else:
                st = result.stats(caps)
                say(
                    f"{name}: p50 {_s(st['p50_s'])} s, max {_s(st['max_s'])} s, origin "
                    f"{st['origin_bytes'] / MiB:.1f} MiB"
                )
        clients = {"curl": curl_version(), "docker-registry": registry_version()}
        for result in results:
            clients.update(result.clients)
    simulated = None
    if options.simulate:
        fraction = PAYLOAD_FRACTION if options.shaping == "netns" else 1.0
        simulated = simulate_same(
            caps,
            options.piece_length,
            fraction,
            options.seed,
            offsets,
        )
    return Report(
        caps,
        options.shaping,
        testbed.describe(),
        options.piece_length,
        results,
        simulated,
        clients,
        load_before,
        time.monotonic() - started,
        emulation.start_offsets,
    )


def run_from_args(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    return run_until_done(lambda: _emulate_and_report(options), say, "failed")


def _emulate_and_report(options: Options) -> int:
    report = emulate(options)
    print(report.text())
    if options.json is not None:
        options.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"results: {options.json}")
    if options.plot is not None:
        report.plot(options.plot)
        print(f"plot: {options.plot}")
    return 1 if any(r.failed for r in report.results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2preg emulate")
    add_arguments(parser)
    try:
        return run_from_args(parser.parse_args(argv))
    except ConfigError as exc:
        print(f"p2preg emulate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
