"""Swarm benchmark: N agents pull one blob at once, against N direct pulls from the origin.

    python -m simulations.bench_swarm [--nodes 8] [--blob-size 500MiB] [--node-bandwidth 50MiB]
        [--origin-bandwidth SAME] [--runs 1] [--json FILE] [--shaping auto|netns|limits]
        [--agent-src DIR] [--keep-logs DIR]

One run starts a real origin (docker-registry holding a random blob, pushed in one monolithic
upload), a tracker and N agents as separate processes, then starts N curl pulls of the blob at
the same moment, one per agent. The baseline, in the same run and with the same caps, is N curl
pulls straight from the origin. Both sides are printed side by side:

- time for every node to get the blob (per node, p50, max) and the ratio of the max to the lower
  bound T = max(F/u_origin, F/d, N*F/(u_origin + sum u_i)) (Kumar & Ross, 2006), where F is the
  blob size, u_origin the origin's upload cap, and u_i = d every node's upload and download cap;
- bytes the origin served, against F.

Targets (for p2preg): origin bytes <= 1.1 x F; max time <= 1.3 x T.

Caps ("shaping"):

- ``netns`` (root, ``ip netns``; what ``auto`` picks when it works): the origin, the tracker and
  every node (its agent and its curl) live in their own network namespace, joined by one bridge
  on 10.204.0.0/24. A tbf on each node's veth caps it both ways at the node bandwidth; one on the
  origin's veth caps the origin both ways at the origin bandwidth; the tracker is unshaped. Agents
  run without --upload-limit/--download-limit: the links are the caps. Origin bytes come from
  docker-registry's access log (HTTP body bytes), cross-checked with the tc byte counter on the
  origin's veth (wire bytes: Ethernet, IP and TCP headers included).
- ``limits`` (no root): everything on 127.0.0.1. Agents cap themselves with --upload-limit and
  --download-limit at the node bandwidth (these pace peer traffic only). The origin is reached
  through a small TCP relay in this process (trio, in a thread): a token bucket at the origin
  bandwidth on the bytes it forwards from the origin, shared by all connections, and one at the
  node bandwidth per connection (a node's origin download is capped too, which the agents'
  limits do not cover). The baseline's direct pulls go through the same relay, and curl's
  --limit-rate caps each one at the node bandwidth. Origin bytes are counted at the relay (HTTP
  headers included), cross-checked with docker-registry's access log.

Per node, the agent's log says how many bytes came from the origin ("cached sha256:... (N bytes;
M from the origin)") and why (the lease holder; a swarm that stalled; no tracker). CPU use is
sampled during each side's pulls (machine-wide from /proc/stat, and per process), so a run where
the CPU rather than the links set the pace says so.

Safety: servers listen on 127.0.0.1 or on 10.204.0.0/24 inside namespaces this run creates
(``p2ps-<pid>-*``); curl runs with proxies off. Namespaces, processes and temp files are removed on
success, failure, Ctrl-C, SIGTERM and SIGHUP (simulations/netns.py). Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from p2preg.errors import ConfigError
from p2preg.token_bucket import TokenBucket
from p2preg.units import parse_size
from simulations.bench_registry import (
    TBF_LATENCY,
    AgentSource,
    BenchError,
    Blob,
    agent_env,
    agent_source,
    child_env,
    curl_version,
    default_burst,
    free_port,
    http_status,
    median,
    progress,
    push_blob,
    registry_version,
    run_until_done,
    start_origin,
    wait_ready,
    write_random_blob,
)
from simulations.netns import (
    Child,
    Namespace,
    NetnsError,
    NetnsLab,
    Tbf,
    deferred_signals,
    neighbour_table_room,
    netns_unavailable_reason,
    wrap,
)

MiB = 1024**2

# Targets, as the issue states them (p2preg side).
ORIGIN_BYTES_TARGET = 1.1  # origin bytes / F, at most
TIME_TARGET = 1.3  # max time / lower bound, at most

PIECE_LENGTH = "4MiB"
AGENT_LOG_LEVEL = "info"  # the per-node "cached ... (N bytes; M from the origin)" line is INFO

# The netns testbed's private network: it exists only inside the namespaces this run creates.
SUBNET_PREFIX = "10.204.0."
PREFIX_LEN = 24
ORIGIN_IP = SUBNET_PREFIX + "1"
TRACKER_IP = SUBNET_PREFIX + "2"
FIRST_NODE_HOST = 10  # node i (1-based) is 10.204.0.(9 + i)
MAX_NODES = 200
NS_ORIGIN_PORT = 5000
NS_TRACKER_PORT = 5081
NS_AGENT_PORT = 5080  # on 127.0.0.1 inside each node's namespace, next to its curl
NS_PEER_PORT = 5090
VETH_MTU = 1500
# tbf counts whole frames: a full frame of 1514 bytes (with its Ethernet header) carries 1448
# bytes of TCP payload (20 IP + 20 TCP + 12 timestamp option bytes).
PAYLOAD_FRACTION = (VETH_MTU - 52) / (VETH_MTU + 14)

# Bounds on every wait.
PULL_SLACK = 4.0  # a side's pulls may take this many times their ideal time (plus a minute)
PULL_GRACE = 60.0
COMMIT_TIMEOUT = 180.0  # after its client got the blob, an agent verifies, fsyncs and commits
LOG_SETTLE = 0.5  # docker-registry writes an access-log line just after the response ends
POLL_INTERVAL = 0.01
CPU_SAMPLE_INTERVAL = 0.5
CPU_SATURATED = 0.95  # a sample at least this busy counts as saturated
TOP_OTHERS = 3  # other processes named in the CPU report
CPU_BOUND_MEAN = 0.85  # mean machine busy share above which the CPU, not the links, set the pace

# The relay (limits mode).
RELAY_CHUNK = 64 * 1024
RELAY_BURST = 256 * 1024  # as the tbf burst in netns mode
RELAY_CONNECT_TIMEOUT = 10.0
RELAY_IDLE_TIMEOUT = 120.0
RELAY_START_TIMEOUT = 10.0

CURL_FORMAT = "%{http_code} %{size_download} %{time_total}"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Shaping = Literal["netns", "limits"]
Side = Literal["p2preg", "baseline"]


# --- caps and the lower bound -------------------------------------------------------------------


def mib(value: float) -> str:
    return f"{value / MiB:.1f} MiB"


def rate_text(bytes_per_second: float) -> str:
    return f"{bytes_per_second / MiB:g} MiB/s"


@dataclass(frozen=True, slots=True)
class Caps:
    """The swarm's shape: N nodes with upload = download = ``node_rate``, one origin."""

    nodes: int
    blob_size: int  # F, bytes
    node_rate: int  # u_i = d, bytes per second
    origin_rate: int  # u_origin, bytes per second

    @property
    def origin_term(self) -> float:
        return self.blob_size / self.origin_rate

    @property
    def download_term(self) -> float:
        return self.blob_size / self.node_rate

    @property
    def swarm_term(self) -> float:
        total_upload = self.origin_rate + self.nodes * self.node_rate
        return self.nodes * self.blob_size / total_upload

    @property
    def bound(self) -> float:
        """T = max(F/u_origin, F/d, N*F/(u_origin + sum u_i)) (Kumar & Ross)."""
        return max(self.origin_term, self.download_term, self.swarm_term)

    @property
    def direct_ideal(self) -> float:
        """The fastest N direct pulls can finish: each at d, all sharing u_origin."""
        return max(self.download_term, self.nodes * self.blob_size / self.origin_rate)

    def describe_bound(self) -> str:
        return (
            f"lower bound T = max(F/u_origin {self.origin_term:.2f} s, F/d {self.download_term:.2f}"
            f" s, N*F/(u_origin + sum u_i) {self.swarm_term:.2f} s) = {self.bound:.2f} s"
            " (Kumar & Ross)"
        )


# --- CPU accounting ---------------------------------------------------------------------------


def machine_cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot; idle and iowait are not busy."""
    with open("/proc/stat") as stat:
        values = [int(word) for word in stat.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def process_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a live process (all its threads); 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rpartition(")")[2].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def all_processes_cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process's name and CPU seconds so far (kernel threads such as ksoftirqd too)."""
    result = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name = text[text.find("(") + 1 : text.rfind(")")]
        fields = text.rpartition(")")[2].split()
        result[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return result


def reaped_children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu_seconds() -> float:
    """This process: the bench and, in limits mode, the relay thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(slots=True)
class CpuReport:
    """CPU during one side's pulls. Cores = CPU seconds / wall seconds."""

    wall_seconds: float = 0.0
    machine_busy: float = 0.0  # share of all CPUs busy (others' work included), mean
    machine_peak: float = 0.0  # busiest CPU_SAMPLE_INTERVAL
    saturated_share: float = 0.0  # share of samples at least CPU_SATURATED busy
    cores: dict[str, float] = field(default_factory=dict)  # our processes, by role
    # The busiest processes that are not ours ("name[pid]" -> cores): other users' work, and
    # kernel threads, which may be doing our network processing (ksoftirqd).
    top_others: dict[str, float] = field(default_factory=dict)
    load_after: float = 0.0

    @property
    def ours(self) -> float:
        return sum(self.cores.values())

    @property
    def others(self) -> float:
        """Cores busy with work that is not ours (other users of the machine)."""
        return max(0.0, self.machine_busy * (os.cpu_count() or 1) - self.ours)

    @property
    def cpu_bound(self) -> bool:
        return self.machine_busy >= CPU_BOUND_MEAN or self.saturated_share >= 0.5

    def describe(self) -> str:
        parts = ", ".join(f"{role} {cores:.2f}" for role, cores in self.cores.items())
        others = ", ".join(f"{name} {cores:.2f}" for name, cores in self.top_others.items())
        return (
            f"machine {self.machine_busy:.0%} busy on average (peak {self.machine_peak:.0%}, "
            f"{self.saturated_share:.0%} of {CPU_SAMPLE_INTERVAL:g} s samples >= "
            f"{CPU_SATURATED:.0%}); ours {self.ours:.2f} of {os.cpu_count()} cores ({parts}), "
            f"other work {self.others:.2f} cores (busiest: {others}); 1-min load after "
            f"{self.load_after:.2f}"
        )


class CpuMonitor:
    """Samples machine-wide CPU use while a side's pulls run, and our processes' CPU time."""

    def __init__(self, pids: dict[str, list[int | None]]) -> None:
        self._pids = pids  # role -> pids of long-running processes we started
        self._started = time.monotonic()
        self._first = self._last = machine_cpu_jiffies()
        self._last_at = self._started
        self._samples: list[float] = []
        self._process_start = {role: self._cpu_of(role) for role in pids}
        self._children_start = reaped_children_cpu_seconds()
        self._own_start = own_cpu_seconds()
        self._everyone_start = all_processes_cpu_seconds()

    def _cpu_of(self, role: str) -> float:
        return sum(process_cpu_seconds(pid) for pid in self._pids[role])

    def sample(self) -> None:
        now = time.monotonic()
        if now - self._last_at < CPU_SAMPLE_INTERVAL:
            return
        busy, total = machine_cpu_jiffies()
        if total > self._last[1]:
            self._samples.append((busy - self._last[0]) / (total - self._last[1]))
        self._last, self._last_at = (busy, total), now

    def finish(self) -> CpuReport:
        """Call once the pulls ended, before the long-running processes are stopped."""
        wall = max(time.monotonic() - self._started, 1e-6)
        busy, total = machine_cpu_jiffies()
        report = CpuReport(wall_seconds=wall, load_after=os.getloadavg()[0])
        if total > self._first[1]:
            report.machine_busy = (busy - self._first[0]) / (total - self._first[1])
        report.machine_peak = max(self._samples, default=report.machine_busy)
        if self._samples:
            saturated = sum(1 for value in self._samples if value >= CPU_SATURATED)
            report.saturated_share = saturated / len(self._samples)
        for role, start in self._process_start.items():
            report.cores[role] = (self._cpu_of(role) - start) / wall
        report.cores["curl"] = (reaped_children_cpu_seconds() - self._children_start) / wall
        report.cores["bench"] = (own_cpu_seconds() - self._own_start) / wall
        ours = {os.getpid()} | {pid for pids in self._pids.values() for pid in pids if pid}
        others = []
        for pid, (name, seconds) in all_processes_cpu_seconds().items():
            if pid not in ours:
                start = self._everyone_start.get(pid, (name, 0.0))[1]
                others.append(((seconds - start) / wall, f"{name}[{pid}]"))
        others.sort(reverse=True)
        report.top_others = {
            describe_process(name): cores for cores, name in others[:TOP_OTHERS] if cores >= 0.01
        }
        return report


def describe_process(name_pid: str) -> str:
    """``comm[pid]`` -> ``comm[pid] <start of its command line>`` if it still runs."""
    pid = name_pid.rpartition("[")[2].rstrip("]")
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return name_pid
    command = " ".join(arg.decode(errors="replace") for arg in argv if arg)
    return f"{name_pid} '{command[:60]}'" if command else name_pid


# --- the origin relay (limits mode) -------------------------------------------------------------


class OriginRelay:
    """A TCP relay in front of the origin that paces what the origin sends, and counts it.

    Origin -> client bytes take tokens from one bucket at ``origin_rate`` shared by every
    connection (the origin's upload) and from the connection's own at ``connection_rate`` (the
    node's download). Client -> origin bytes (requests) pass unpaced. Counters are read from
    other threads: ints, written only by the relay's trio thread.
    """

    def __init__(self, origin_port: int, origin_rate: int, connection_rate: int) -> None:
        self._origin_port = origin_port
        self._origin_rate = origin_rate
        self._connection_rate = connection_rate
        self._origin_bucket: TokenBucket | None = None
        self.bytes_from_origin = 0
        self.bytes_to_origin = 0
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        self._origin_bucket = TokenBucket(self._origin_rate, RELAY_BURST, trio.current_time())
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(int(listeners[0].socket.getsockname()[1]))
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            try:
                with trio.fail_after(RELAY_CONNECT_TIMEOUT):
                    origin = await trio.open_tcp_stream("127.0.0.1", self._origin_port)
            except (OSError, trio.TooSlowError):
                return  # the client sees the connection close
            async with origin:
                bucket = TokenBucket(self._connection_rate, RELAY_BURST, trio.current_time())
                try:
                    await self._relay(client, origin, bucket)
                except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass  # one side went away: close both

    async def _relay(
        self, client: trio.SocketStream, origin: trio.SocketStream, bucket: TokenBucket
    ) -> None:
        last_activity = [trio.current_time()]

        async def pump(source: trio.SocketStream, sink: trio.SocketStream, paced: bool) -> None:
            while data := await source.receive_some(RELAY_CHUNK):
                last_activity[0] = trio.current_time()
                if paced:
                    assert self._origin_bucket is not None
                    now = trio.current_time()
                    wait = max(
                        self._origin_bucket.take(len(data), now), bucket.take(len(data), now)
                    )
                    await trio.sleep(wait)
                await sink.send_all(data)
                if paced:
                    self.bytes_from_origin += len(data)
                else:
                    self.bytes_to_origin += len(data)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await sink.send_eof()

        async with trio.open_nursery() as nursery:

            async def both() -> None:
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(pump, client, origin, False)
                    pumps.start_soon(pump, origin, client, True)
                nursery.cancel_scope.cancel()  # both directions ended: stop the watchdog

            nursery.start_soon(both)
            while True:  # idle watchdog: a connection silent both ways this long is closed
                await trio.sleep(RELAY_IDLE_TIMEOUT / 4)
                if trio.current_time() - last_activity[0] > RELAY_IDLE_TIMEOUT:
                    nursery.cancel_scope.cancel()


class RelayThread:
    """Runs an OriginRelay in its own thread and trio loop; ``close()`` stops it (bounded)."""

    def __init__(self, relay: OriginRelay) -> None:
        self.relay = relay
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name="origin-relay", daemon=True)

    def start(self) -> int:
        self._thread.start()
        if not self._ready.wait(RELAY_START_TIMEOUT):
            raise BenchError(f"the origin relay did not start in {RELAY_START_TIMEOUT:.0f}s")
        if self._error is not None:
            raise BenchError(f"the origin relay failed to start: {self._error}")
        return self.port

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start(); the thread just ends
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(self.relay.serve)
                self._ready.set()

    def close(self) -> None:
        with deferred_signals():
            scope, token = self._scope, self._token
            if scope is not None and token is not None and self._thread.is_alive():
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(scope.cancel, trio_token=token)
            if self._thread.is_alive():
                self._thread.join(RELAY_START_TIMEOUT)


# --- testbeds: where everything runs and how the caps are applied --------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    netns: Namespace | None  # where its agent and its curl run (None: the root namespace)
    registry_addr: str  # the agent's registry endpoint, the node's curl pulls from it
    peer_addr: str


_ACCESS_LOG_RE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (\d{3}) (?P<size>\d+)')
_TC_SENT_RE = re.compile(r"Sent (\d+) bytes")


def access_log_counts(log_path: Path) -> dict[str, int]:
    """Totals of docker-registry's access log: body bytes of every response, blob GETs."""
    body_bytes = blob_gets = 0
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return {"access_log_bytes": 0, "access_log_blob_gets": 0}
    for match in _ACCESS_LOG_RE.finditer(text):
        body_bytes += int(match.group("size"))
        if match.group("method") == "GET" and "/blobs/sha256:" in match.group("path"):
            blob_gets += 1
    return {"access_log_bytes": body_bytes, "access_log_blob_gets": blob_gets}


class Testbed:
    """Where the origin, tracker, agents and clients run, and how the caps are applied."""

    shaping: Shaping
    primary_counter: str  # the origin-counters key that counts origin bytes
    counter_note: str  # how the origin bytes were counted, for the report

    def __init__(self, caps: Caps, origin: Child) -> None:
        self.caps = caps
        self.origin = origin
        self.nodes: list[Node] = []
        self.tracker_netns: Namespace | None = None
        self.tracker_addr = ""
        self.upstream = ""  # the origin's URL for agents
        self.direct_url = ""  # the origin's URL for baseline clients
        self.agent_flags: list[str] = []
        self.direct_curl_flags: list[str] = []

    def describe(self) -> str:
        raise NotImplementedError

    def origin_counters(self) -> dict[str, int]:
        return access_log_counts(self.origin.log_path)

    def link_counters(self) -> dict[str, tuple[int, int]]:
        """Node name -> (bytes sent, bytes received) on its link so far; empty if unknown."""
        return {}

    def close(self) -> None:
        self.origin.close()


class LimitsTestbed(Testbed):
    """Everything on 127.0.0.1; the agents' own limits and a pacing relay before the origin."""

    shaping = "limits"
    primary_counter = "relay_bytes"
    counter_note = (
        "counted at the relay (every byte it forwarded from the origin, HTTP headers included); "
        "docker-registry's access log (HTTP body bytes) as a cross-check"
    )

    def __init__(self, caps: Caps, origin: Child, origin_port: int) -> None:
        super().__init__(caps, origin)
        self.relay = RelayThread(OriginRelay(origin_port, caps.origin_rate, caps.node_rate))
        relay_url = f"http://127.0.0.1:{self.relay.start()}"
        self.tracker_addr = f"127.0.0.1:{free_port()}"
        self.upstream = self.direct_url = relay_url
        for index in range(1, caps.nodes + 1):
            self.nodes.append(
                Node(f"n{index}", None, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
            )
        rate = str(caps.node_rate)
        self.agent_flags = ["--upload-limit", rate, "--download-limit", rate]
        self.direct_curl_flags = ["--limit-rate", rate]

    def describe(self) -> str:
        c = self.caps
        return (
            "limits: everything on 127.0.0.1; agents run with --upload-limit and --download-limit "
            f"{rate_text(c.node_rate)} (peer traffic); the origin sits behind a trio relay "
            f"pacing what it sends to {rate_text(c.origin_rate)} in total and "
            f"{rate_text(c.node_rate)} per connection; direct pulls go through the relay with "
            f"curl --limit-rate {rate_text(c.node_rate)}"
        )

    def origin_counters(self) -> dict[str, int]:
        counters = super().origin_counters()
        counters["relay_bytes"] = self.relay.relay.bytes_from_origin
        counters["relay_connections"] = self.relay.relay.connections
        return counters

    def close(self) -> None:
        self.relay.close()
        super().close()


class NetnsTestbed(Testbed):
    """Origin, tracker and every node in its own namespace on one bridge, capped by tbf."""

    shaping = "netns"
    primary_counter = "access_log_bytes"
    counter_note = (
        "counted by docker-registry's access log (HTTP body bytes of every response); the tc "
        "counter on the origin's veth (wire bytes: Ethernet, IP, TCP headers) as a cross-check"
    )

    def __init__(
        self,
        caps: Caps,
        lab: NetnsLab,
        work: Path,
        storage: Path,
        agent_upload_limit: int | None = None,
    ) -> None:
        self.arp_note: str | None = None  # set by open_testbed (netns.neighbour_table_room)
        bridge = lab.namespace("br")
        origin_ns = lab.namespace("origin")
        tracker_ns = lab.namespace("tracker")
        node_namespaces = [lab.namespace(f"n{index}") for index in range(1, caps.nodes + 1)]
        ports = ["porigin", "ptracker"]
        lab.veth(origin_ns, "eth0", f"{ORIGIN_IP}/{PREFIX_LEN}", bridge, "porigin", None)
        lab.veth(tracker_ns, "eth0", f"{TRACKER_IP}/{PREFIX_LEN}", bridge, "ptracker", None)
        nodes = []
        for index, ns in enumerate(node_namespaces, start=1):
            ip = f"{SUBNET_PREFIX}{FIRST_NODE_HOST - 1 + index}"
            lab.veth(ns, "eth0", f"{ip}/{PREFIX_LEN}", bridge, f"pn{index}", None)
            ports.append(f"pn{index}")
            nodes.append(
                Node(f"n{index}", ns, f"127.0.0.1:{NS_AGENT_PORT}", f"{ip}:{NS_PEER_PORT}")
            )
        lab.bridge(bridge, "br0", ports)
        self.origin_tbf = self.tbf(caps.origin_rate)
        self.node_tbf = self.tbf(caps.node_rate)
        # The qdisc on each end shapes what that end sends: the node's eth0 its upload, the
        # bridge port its download.
        lab.shape(origin_ns, "eth0", self.origin_tbf)
        lab.shape(bridge, "porigin", self.origin_tbf)
        for index, ns in enumerate(node_namespaces, start=1):
            lab.shape(ns, "eth0", self.node_tbf)
            lab.shape(bridge, f"pn{index}", self.node_tbf)
        self.origin_ns = origin_ns
        self.bridge_ns = bridge
        origin_addr = f"{ORIGIN_IP}:{NS_ORIGIN_PORT}"
        origin = start_origin(work, storage, origin_addr, "origin-netns", origin_ns)
        super().__init__(caps, origin)
        self.nodes = nodes
        self.tracker_netns = tracker_ns
        self.tracker_addr = f"{TRACKER_IP}:{NS_TRACKER_PORT}"
        self.upstream = self.direct_url = f"http://{origin_addr}"
        self.agent_upload_limit = agent_upload_limit
        if agent_upload_limit is not None:
            self.agent_flags = ["--upload-limit", str(agent_upload_limit)]
        for node in (nodes[0], nodes[-1]):  # across the bridge, both ends of the address range
            if http_status(f"{self.direct_url}/v2/", node.netns) != "200":
                origin.close()
                raise BenchError(f"origin {self.direct_url} is not reachable from {node.name}")

    @staticmethod
    def tbf(rate: int) -> Tbf:
        rate_bps = rate * 8
        return Tbf(f"{rate_bps}bit", default_burst(rate_bps), TBF_LATENCY)

    def describe(self) -> str:
        c = self.caps
        return (
            "netns: origin, tracker and every node (agent + its curl) in its own network "
            f"namespace on one bridge ({SUBNET_PREFIX}0/{PREFIX_LEN}, MTU {VETH_MTU}); tbf on "
            f"each node's veth both ways at {rate_text(c.node_rate)} "
            f"({self.node_tbf.describe()}), on the origin's veth both ways at "
            f"{rate_text(c.origin_rate)}; tracker unshaped; agents "
            + (
                f"with --upload-limit {rate_text(self.agent_upload_limit)} (--agent-upload-limit)"
                if self.agent_upload_limit is not None
                else "without --upload-limit/--download-limit"
            )
            + (f"; {self.arp_note}" if self.arp_note else "")
        )

    def origin_counters(self) -> dict[str, int]:
        counters = super().origin_counters()
        stats = NetnsLab.qdisc_stats(self.origin_ns, "eth0")
        match = _TC_SENT_RE.search(stats)
        counters["veth_wire_bytes"] = int(match.group(1)) if match else 0
        return counters

    def link_counters(self) -> dict[str, tuple[int, int]]:
        """From the bridge's side of each node's veth: what it receives the node sent (upload),
        what it transmits the node received (download). Frame bytes, headers included."""
        result = self.bridge_ns.run(["ip", "-s", "-j", "link", "show"])
        by_port = {link["ifname"]: link.get("stats64", {}) for link in json.loads(result.stdout)}
        counters = {}
        for index, node in enumerate(self.nodes, start=1):
            stats = by_port.get(f"pn{index}", {})
            sent = int(stats.get("rx", {}).get("bytes", 0))
            received = int(stats.get("tx", {}).get("bytes", 0))
            counters[node.name] = (sent, received)
        return counters


# --- processes: tracker, agents, pulls ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    work: Path
    blob: Blob
    caps: Caps
    secret_file: Path
    agent_env: dict[str, str]
    piece_length: str = PIECE_LENGTH  # the agents' --piece-length


def start_tracker(setup: Setup, testbed: Testbed, name: str) -> Child:
    argv = [sys.executable, "-m", "p2preg", "tracker", "--addr", testbed.tracker_addr]
    argv += ["--cluster-secret-file", str(setup.secret_file), "--log-level", "info"]
    child = Child(
        argv,
        setup.work / f"{name}.log",
        netns=testbed.tracker_netns,
        env=setup.agent_env,
        cwd=setup.work,
    )
    try:
        url = f"http://{testbed.tracker_addr}/healthz"
        wait_ready(child, url, testbed.tracker_netns, f"tracker ({name})")
    except BaseException:
        child.close()
        raise
    return child


class AgentProcess:
    """One node's agent with its own data dir; ``close()`` stops it and wipes the dir."""

    def __init__(self, setup: Setup, testbed: Testbed, node: Node, run_name: str) -> None:
        self.node = node
        self.name = f"{run_name}-{node.name}"
        self.data_dir = setup.work / self.name
        self.data_dir.mkdir()
        self.log_path = setup.work / f"{self.name}.log"
        cache_size = 2 * setup.blob.size + 64 * MiB
        argv = [sys.executable, "-m", "p2preg", "agent", "--registry-addr", node.registry_addr]
        argv += ["--peer-addr", node.peer_addr, "--tracker", f"http://{testbed.tracker_addr}"]
        argv += ["--cluster-secret-file", str(setup.secret_file), "--upstream", testbed.upstream]
        argv += ["--data-dir", str(self.data_dir), "--cache-size", str(cache_size)]
        argv += ["--piece-length", setup.piece_length, "--log-level", AGENT_LOG_LEVEL]
        argv += testbed.agent_flags
        self.argv = argv
        self.child: Child | None = Child(
            argv, self.log_path, netns=node.netns, env=setup.agent_env, cwd=setup.work
        )

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def wait_ready(self) -> None:
        assert self.child is not None
        url = f"http://{self.node.registry_addr}/v2/"
        wait_ready(self.child, url, self.node.netns, f"agent {self.name}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def exited(self) -> int | None:
        return self.child.exited() if self.child is not None else None

    def close(self) -> None:
        with deferred_signals():
            child, self.child = self.child, None
            if child is not None:
                child.close()
            shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass(slots=True)
class NodeResult:
    node: str
    seconds: float | None = None  # from the common start to this node's curl exiting
    curl_seconds: float | None = None  # curl's own time_total
    error: str | None = None
    # p2preg only, from the agent's log:
    blob_bytes: int | None = None
    bytes_from_origin: int | None = None
    how: str = ""
    # netns only: frame bytes the node's link carried during the pulls (headers included)
    wire_sent: int | None = None
    wire_received: int | None = None

    @property
    def bytes_from_peers(self) -> int | None:
        """The blob's size less what came from the origin (the agent logs no peer count)."""
        if self.blob_bytes is None or self.bytes_from_origin is None:
            return None
        return max(0, self.blob_bytes - self.bytes_from_origin)


@dataclass(slots=True)
class Finished:
    """One command of run_concurrently: when it exited, and what it said."""

    seconds: float  # from the common start to its exit
    returncode: int
    stdout: str
    stderr: str


def run_concurrently(
    argvs: Sequence[Sequence[str]],
    timeout: float,
    tick: Callable[[int, float], None],
    offsets: Sequence[float] | None = None,
) -> list[Finished]:
    """Start every command at the same moment, or command i ``offsets[i]`` seconds after the
    common start, and wait (bounded by the last offset + ``timeout`` + 15 s) for all. Each
    command's time is counted from the common start.

    ``tick(pending, elapsed)`` runs on every poll (CPU sampling, progress lines). Commands still
    running when this returns or raises are killed.
    """
    delays = list(offsets) if offsets is not None else [0.0] * len(argvs)
    if len(delays) != len(argvs) or not all(0 <= d < math.inf for d in delays):
        raise ValueError("offsets: one finite delay >= 0 per command")
    processes: dict[int, subprocess.Popen[str]] = {}
    exited_at: dict[int, float] = {}
    to_start = sorted(range(len(argvs)), key=delays.__getitem__, reverse=True)  # next: last
    started = time.monotonic()
    try:
        pending = set(range(len(argvs)))
        deadline = started + max(delays, default=0.0) + timeout + 15
        while pending:
            while to_start and delays[to_start[-1]] <= time.monotonic() - started:
                index = to_start.pop()
                processes[index] = subprocess.Popen(
                    list(argvs[index]),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=child_env(),
                )
            for index in sorted(pending & processes.keys()):
                if processes[index].poll() is not None:
                    exited_at[index] = time.monotonic() - started
                    pending.discard(index)
            tick(len(pending), time.monotonic() - started)
            if time.monotonic() > deadline:
                raise BenchError(f"{len(pending)} pulls still running after {timeout + 15:.0f}s")
            time.sleep(POLL_INTERVAL)
        finished = []
        for index in range(len(argvs)):
            stdout, stderr = processes[index].communicate(timeout=5)
            finished.append(Finished(exited_at[index], processes[index].returncode, stdout, stderr))
        return finished
    finally:
        with deferred_signals():
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.communicate(timeout=5)


def run_pulls(
    targets: Sequence[tuple[str, str, Namespace | None]],
    blob: Blob,
    timeout: float,
    extra_args: Sequence[str],
    monitor: CpuMonitor,
) -> list[NodeResult]:
    """Start one curl per (node, base URL, namespace) at once; wait (bounded) for all of them.

    Every download is checked for HTTP 200 and the full size; the agent itself checks the
    blob's sha256 and aborts a response (curl then fails) if it does not match.
    """
    argvs = []
    for _, base, netns in targets:
        argv = ["curl", "-s", "-S", "-o", "/dev/null", "--noproxy", "*"]
        argv += ["--max-time", f"{timeout:.0f}", "-w", CURL_FORMAT, *extra_args, blob.url(base)]
        argvs.append(wrap(argv, netns))
    finished = run_concurrently(argvs, timeout, lambda pending, elapsed: monitor.sample())
    results = []
    for (node, _, _), done in zip(targets, finished, strict=True):
        result = NodeResult(node, seconds=done.seconds)
        results.append(result)
        fields = done.stdout.split()
        if done.returncode != 0 or len(fields) != 3:
            result.error = f"curl exit {done.returncode}: {done.stderr.strip()[:200]}"
            continue
        status, size, seconds = fields
        result.curl_seconds = float(seconds)
        if status != "200" or int(size) != blob.size:
            result.error = f"HTTP {status}, {size} of {blob.size} bytes"
    return results


# --- reading the agents' logs -------------------------------------------------------------------


def _cached_re(blob: Blob) -> re.Pattern[str]:
    return re.compile(
        rf"cached {re.escape(blob.digest)} \((?P<size>\d+) bytes; (?P<origin>\d+) from the origin\)"
    )


# Log messages (agent/swarm_coordinator.py) that say why a node went to the origin, and what the
# report calls it. A node with none of them got every piece from its peers.
_ORIGIN_REASONS = (
    (re.compile(r"fetching \S+ from the origin for the swarm"), "lease holder (origin)"),
    (re.compile(r"stalled; fetching from byte (\d+) from the origin"), "stalled -> origin"),
    (re.compile(r"tracker unavailable \(.*\); fetching \S+ from the origin"), "no tracker"),
    (re.compile(r"no metainfo for \S+ from the swarm; using the origin"), "no metainfo"),
)
_KEY_LINE_RE = re.compile(r" (WARNING|ERROR|CRITICAL) |from the origin|stalled|cached sha256")


def annotate_from_log(result: NodeResult, log_text: str, blob: Blob) -> list[str]:
    """Fill the node's origin/peer bytes and role from its agent's log; return its key lines."""
    match = _cached_re(blob).search(log_text)
    if match is not None:
        result.blob_bytes = int(match.group("size"))
        result.bytes_from_origin = int(match.group("origin"))
    reasons = []
    for pattern, label in _ORIGIN_REASONS:
        found = pattern.findall(log_text)
        if found:
            starts = [item for item in found if isinstance(item, str) and item.isdigit()]
            reasons.append(f"{label} from byte {','.join(starts)}" if starts else label)
    if match is None:
        reasons.append("not cached")
    result.how = "; ".join(reasons) or "peers only"
    return [line.strip() for line in log_text.splitlines() if _KEY_LINE_RE.search(line)]


def wait_committed(
    agents: Sequence[AgentProcess], results: Sequence[NodeResult], blob: Blob
) -> None:
    """Wait (bounded) until every agent whose client got the blob logged its commit."""
    pattern = _cached_re(blob)
    failed = f"download of {blob.digest} failed"
    waiting = [agent for agent, result in zip(agents, results, strict=True) if result.error is None]
    deadline = time.monotonic() + COMMIT_TIMEOUT
    while waiting and time.monotonic() < deadline:
        waiting = [
            agent
            for agent in waiting
            if not pattern.search(agent.log_text())
            and failed not in agent.log_text()
            and agent.exited() is None
        ]
        time.sleep(0.1)
    if waiting:
        progress(f"agents {', '.join(a.name for a in waiting)} did not commit in time")


# --- one side of a run ---------------------------------------------------------------------------


@dataclass(slots=True)
class SideResult:
    side: Side
    nodes: list[NodeResult] = field(default_factory=list)
    origin_counters: dict[str, int] = field(default_factory=dict)  # deltas over the side
    origin_bytes: int = 0  # the testbed's primary counter
    cpu: CpuReport = field(default_factory=CpuReport)
    key_lines: dict[str, list[str]] = field(default_factory=dict)  # p2preg: per node
    failed: str | None = None

    @property
    def times(self) -> list[float]:
        return [n.seconds for n in self.nodes if n.seconds is not None and n.error is None]

    @property
    def complete(self) -> bool:
        return self.failed is None and bool(self.nodes) and len(self.times) == len(self.nodes)

    @property
    def max_time(self) -> float:
        return max(self.times) if self.complete else float("nan")

    @property
    def p50_time(self) -> float:
        return median(self.times) if self.complete else float("nan")


def counter_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before.get(key, 0) for key in after}


def record_links(
    testbed: Testbed, before: dict[str, tuple[int, int]], nodes: Sequence[NodeResult]
) -> None:
    """Fill each node's link bytes since ``before`` (netns only)."""
    after = testbed.link_counters()
    for node in nodes:
        if node.node in after and node.node in before:
            node.wire_sent = after[node.node][0] - before[node.node][0]
            node.wire_received = after[node.node][1] - before[node.node][1]


def start_swarm(
    stack: contextlib.ExitStack, setup: Setup, testbed: Testbed, run_name: str
) -> tuple[Child, list[AgentProcess]]:
    """A tracker and one agent per node, ready; ``stack`` stops them and wipes their dirs."""
    tracker = start_tracker(setup, testbed, f"{run_name}-tracker")
    stack.callback(tracker.close)
    agents: list[AgentProcess] = []
    for node in testbed.nodes:
        agent = AgentProcess(setup, testbed, node, run_name)
        stack.callback(agent.close)
        agents.append(agent)
    for agent in agents:
        agent.wait_ready()
    return tracker, agents


def open_testbed(
    cleanup: contextlib.ExitStack,
    shaping: Shaping,
    caps: Caps,
    work: Path,
    storage: Path,
    origin: Child,
    origin_port: int,
    *,
    netns_prefix: str,
    agent_upload_limit: int | None = None,
) -> Testbed:
    """The links, around an origin on 127.0.0.1 that already holds the content: in netns mode
    that origin stops and one in the origin's namespace serves the same storage."""
    testbed: Testbed
    if shaping == "netns":
        origin.close()
        # Every node, the origin and the tracker on one LAN (netns.neighbour_table_room).
        arp_note = cleanup.enter_context(neighbour_table_room(caps.nodes + 2))
        lab = cleanup.enter_context(NetnsLab(prefix=netns_prefix))
        testbed = NetnsTestbed(caps, lab, work, storage, agent_upload_limit)
        testbed.arp_note = arp_note
    else:
        testbed = LimitsTestbed(caps, origin, origin_port)
    cleanup.callback(testbed.close)
    return testbed


def measure_p2preg(setup: Setup, testbed: Testbed, run_name: str) -> SideResult:
    result = SideResult("p2preg")
    timeout = PULL_GRACE + PULL_SLACK * setup.caps.bound
    with contextlib.ExitStack() as stack:
        tracker, agents = start_swarm(stack, setup, testbed, run_name)
        progress(f"[{run_name}] p2preg: tracker and {len(agents)} agents ready; pulling")
        before, links_before = testbed.origin_counters(), testbed.link_counters()
        monitor = CpuMonitor(
            {
                "agents": [agent.pid for agent in agents],
                "origin": [testbed.origin.pid],
                "tracker": [tracker.pid],
            }
        )
        targets = [(a.node.name, f"http://{a.node.registry_addr}", a.node.netns) for a in agents]
        result.nodes = run_pulls(targets, setup.blob, timeout, [], monitor)
        result.cpu = monitor.finish()
        record_links(testbed, links_before, result.nodes)
        wait_committed(agents, result.nodes, setup.blob)
        time.sleep(LOG_SETTLE)
        result.origin_counters = counter_deltas(before, testbed.origin_counters())
        result.origin_bytes = result.origin_counters[testbed.primary_counter]
        for agent, node_result in zip(agents, result.nodes, strict=True):
            result.key_lines[node_result.node] = annotate_from_log(
                node_result, agent.log_text(), setup.blob
            )
    return result


def measure_baseline(setup: Setup, testbed: Testbed, run_name: str) -> SideResult:
    result = SideResult("baseline")
    timeout = PULL_GRACE + PULL_SLACK * setup.caps.direct_ideal
    progress(f"[{run_name}] baseline: {len(testbed.nodes)} direct pulls from the origin")
    before, links_before = testbed.origin_counters(), testbed.link_counters()
    monitor = CpuMonitor({"origin": [testbed.origin.pid]})
    targets = [(node.name, testbed.direct_url, node.netns) for node in testbed.nodes]
    result.nodes = run_pulls(targets, setup.blob, timeout, testbed.direct_curl_flags, monitor)
    result.cpu = monitor.finish()
    record_links(testbed, links_before, result.nodes)
    time.sleep(LOG_SETTLE)
    result.origin_counters = counter_deltas(before, testbed.origin_counters())
    result.origin_bytes = result.origin_counters[testbed.primary_counter]
    return result


@dataclass(slots=True)
class RunResult:
    index: int
    order: tuple[Side, Side]
    p2preg: SideResult
    baseline: SideResult


def measure_run(setup: Setup, testbed: Testbed, index: int) -> RunResult:
    """One run: both sides, in an order that alternates between runs (drift favours neither)."""
    order: tuple[Side, Side] = ("p2preg", "baseline") if index % 2 == 0 else ("baseline", "p2preg")
    sides: dict[Side, SideResult] = {}
    run_name = f"run{index + 1}"
    for side in order:
        try:
            if side == "p2preg":
                sides[side] = measure_p2preg(setup, testbed, run_name)
            else:
                sides[side] = measure_baseline(setup, testbed, run_name)
        except (BenchError, NetnsError, OSError, subprocess.SubprocessError) as exc:
            sides[side] = SideResult(side, failed=str(exc))
            progress(f"[{run_name}] {side} failed: {exc}")
        summary = sides[side]
        if summary.complete:
            progress(
                f"[{run_name}] {side}: max {summary.max_time:.2f} s, p50 {summary.p50_time:.2f}"
                f" s, origin {mib(summary.origin_bytes)}"
            )
    return RunResult(index, order, sides["p2preg"], sides["baseline"])


# --- report -------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _seconds(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


@dataclass(slots=True)
class Conditions:
    shaping: Shaping
    shaping_detail: str
    counter_note: str
    caps: Caps
    blob: Blob
    runs: int
    curl: str
    registry: str
    load_before: float
    source: AgentSource | None = None
    source_after: AgentSource | None = None

    @property
    def source_changed(self) -> bool:
        before, after = self.source, self.source_after
        return before is not None and after is not None and before.fingerprint != after.fingerprint


def _side_cells(side: SideResult, caps: Caps) -> dict[str, str]:
    if side.failed is not None:
        return dict.fromkeys(("max", "p50", "ratio", "bytes", "bytes_ratio"), "FAILED")
    if not side.complete:
        failed = sum(1 for node in side.nodes if node.error is not None)
        return dict.fromkeys(("max", "p50", "ratio"), f"{failed} pulls failed") | {
            "bytes": mib(side.origin_bytes),
            "bytes_ratio": f"{side.origin_bytes / caps.blob_size:.2f}x",
        }
    return {
        "max": f"{side.max_time:.2f} s",
        "p50": f"{side.p50_time:.2f} s",
        "ratio": f"{side.max_time / caps.bound:.2f}x",
        "bytes": mib(side.origin_bytes),
        "bytes_ratio": f"{side.origin_bytes / caps.blob_size:.2f}x",
    }


def per_node_table(p2p: SideResult, base: SideResult) -> list[str]:
    """One line per node: p2preg time, where its bytes came from, its link, the direct time."""
    header = (
        f"  {'node':<5} {'p2preg s':>8}  {'from origin':>11}  {'from peers':>11}  "
        f"{'link sent':>10}  {'link recv':>10}   {'how (agent log)':<28}  {'direct s':>8}"
    )
    lines = [header]
    base_by_node = {node.node: node for node in base.nodes}
    for node in p2p.nodes or [NodeResult(n.node) for n in base.nodes]:
        direct = base_by_node.get(node.node)
        peers = node.bytes_from_peers
        cells = [
            mib(node.bytes_from_origin) if node.bytes_from_origin is not None else "-",
            mib(peers) if peers is not None else "-",
            mib(node.wire_sent) if node.wire_sent is not None else "-",
            mib(node.wire_received) if node.wire_received is not None else "-",
        ]
        how = node.how if node.error is None else f"FAILED: {node.error}"
        direct_text = "-"
        if direct is not None:
            direct_text = _seconds(direct.seconds) if direct.error is None else "FAILED"
        lines.append(
            f"  {node.node:<5} {_seconds(node.seconds):>8}  {cells[0]:>11}  {cells[1]:>11}  "
            f"{cells[2]:>10}  {cells[3]:>10}   {how:<28}  {direct_text:>8}"
        )
    return lines


def link_summary(p2p: SideResult, caps: Caps) -> list[str]:
    """How busy the nodes' links were during the p2preg pulls (netns: frame bytes)."""
    sent = [n.wire_sent for n in p2p.nodes if n.wire_sent is not None]
    received = [n.wire_received for n in p2p.nodes if n.wire_received is not None]
    if not sent or not received or not p2p.complete:
        return []
    window = p2p.max_time
    capacity = caps.node_rate * window
    return [
        f"  links during p2preg pulls (frame bytes, bridge-side counters): the nodes sent "
        f"{mib(sum(sent))} in all, {sum(sent) / (capacity * len(sent)):.0%} of their upload "
        f"capacity over the {window:.2f} s max time (busiest {max(sent) / capacity:.0%}); "
        f"received {sum(received) / (capacity * len(received)):.0%} of their download capacity "
        f"on average (busiest {max(received) / capacity:.0%})"
    ]


def report_run(run: RunResult, conditions: Conditions) -> list[str]:
    caps, p2p, base = conditions.caps, run.p2preg, run.baseline
    left, right = _side_cells(p2p, caps), _side_cells(base, caps)
    time_ok = p2p.complete and p2p.max_time <= TIME_TARGET * caps.bound
    bytes_ok = p2p.failed is None and p2p.origin_bytes <= ORIGIN_BYTES_TARGET * caps.blob_size
    widths = (18, 16, 19, 10)

    def row(*cells: str) -> str:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
        return ("  " + " ".join(padded + list(cells[len(widths) :]))).rstrip()

    lines = [
        f"run {run.index + 1} of {conditions.runs} (order: {' then '.join(run.order)})",
        row("", "p2preg (swarm)", "baseline (direct)", "target", "p2preg"),
        row("max time", left["max"], right["max"]),
        row("p50 time", left["p50"], right["p50"]),
        row(
            "max time / T",
            left["ratio"],
            right["ratio"],
            f"<= {TIME_TARGET:.2f}x",
            _verdict(time_ok),
        ),
        row("origin bytes", left["bytes"], right["bytes"]),
        row(
            "origin bytes / F",
            left["bytes_ratio"],
            right["bytes_ratio"],
            f"<= {ORIGIN_BYTES_TARGET:.2f}x",
            _verdict(bytes_ok),
        ),
    ]
    lines += per_node_table(p2p, base)
    lines += link_summary(p2p, caps)
    for side in (p2p, base):
        if side.failed is not None:
            lines.append(f"  {side.side} FAILED: {side.failed.splitlines()[0]}")
        for node in side.nodes:
            if node.error is not None and side is base:
                lines.append(f"  baseline {node.node} FAILED: {node.error}")
    counters = []
    for side in (p2p, base):
        detail = ", ".join(f"{key} {value:,}" for key, value in side.origin_counters.items())
        counters.append(f"{side.side}: {detail}")
    lines.append(f"  origin counters ({'; '.join(counters)})")
    for side in (p2p, base):
        if side.failed is None:
            lines.append(f"  CPU during {side.side} pulls: {side.cpu.describe()}")
    cpu_bound = [side for side in (p2p, base) if side.failed is None and side.cpu.cpu_bound]
    if cpu_bound:
        detail = "; ".join(
            f"{side.side}: ours {side.cpu.ours:.2f} cores, other work {side.cpu.others:.2f}"
            for side in cpu_bound
        )
        verdict = (
            f"the CPUs were saturated during {' and '.join(s.side for s in cpu_bound)} pulls "
            f"({detail}): the links may not have been the only bottleneck"
        )
    else:
        verdict = "the CPUs had headroom on both sides: the caps (links), not the CPU, set the pace"
    lines.append(f"  CPU verdict: {verdict}")
    if not (time_ok and bytes_ok):
        lines.append("  p2preg missed a target; the agents' key log lines:")
        for name, key_lines in p2p.key_lines.items():
            for line in key_lines[:12]:
                lines.append(f"    {name}: {line[:220]}")
            if len(key_lines) > 12:
                lines.append(f"    {name}: ... {len(key_lines) - 12} more")
    return lines


def report(runs: Sequence[RunResult], conditions: Conditions) -> str:
    c, caps = conditions, conditions.caps
    lines = [
        f"p2preg swarm benchmark: {caps.nodes} nodes pull one {mib(caps.blob_size)} blob at once "
        f"({c.blob.digest[:19]}...), {c.runs} run(s)",
        f"shaping: {c.shaping_detail}",
        f"caps: node upload u_i = download d = {rate_text(caps.node_rate)}, origin upload "
        f"u_origin = {rate_text(caps.origin_rate)}; F = {mib(caps.blob_size)}, N = {caps.nodes}",
        caps.describe_bound(),
    ]
    if c.shaping == "netns":
        lines.append(
            f"  (tbf counts whole frames: at MTU {VETH_MTU} at most {PAYLOAD_FRACTION:.1%} of a "
            f"cap is TCP payload, so T for the payload alone is "
            f"{caps.bound / PAYLOAD_FRACTION:.2f} s)"
        )
    lines += [
        f"targets (p2preg): origin bytes <= {ORIGIN_BYTES_TARGET}x F; max time <= {TIME_TARGET}x T",
        f"origin bytes: {c.counter_note}",
        "time: from the moment all N curls were started to each curl's exit (HTTP 200, full "
        "size); p2preg curls pull from their node's agent, baseline curls from the origin",
        "",
    ]
    for run in runs:
        lines += report_run(run, c)
        lines.append("")
    if len(runs) > 1:
        p2p_max = [r.p2preg.max_time for r in runs if r.p2preg.complete]
        p2p_bytes = [r.p2preg.origin_bytes for r in runs if r.p2preg.failed is None]
        base_max = [r.baseline.max_time for r in runs if r.baseline.complete]
        lines.append(
            f"median over runs: p2preg max {median(p2p_max):.2f} s "
            f"({median(p2p_max) / caps.bound:.2f}x T), origin {mib(median(p2p_bytes))}; "
            f"baseline max {median(base_max):.2f} s ({median(base_max) / caps.bound:.2f}x T)"
        )
    if c.source is not None:
        lines.append(
            f"agent under test: {c.source.describe()} (sha256 of its .py files "
            f"{c.source.fingerprint[:12]})"
        )
    if c.source_changed:
        lines.append(
            "WARNING: the agent's source (agent/, p2preg/) changed while the benchmark ran; "
            "runs may have measured different code (pin one with --agent-src)"
        )
    lines.append(
        f"machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python "
        f"{platform.python_version()}, docker-registry {c.registry}, curl {c.curl}, 1-min load "
        f"average before the run {c.load_before:.2f}"
        + (" (other work was competing for the CPUs)" if c.load_before >= 0.5 else "")
    )
    return "\n".join(lines)


def write_json(path: Path, runs: Sequence[RunResult], conditions: Conditions) -> None:
    c, caps = conditions, conditions.caps
    document: dict[str, Any] = {
        "benchmark": "p2preg swarm",
        "shaping": c.shaping,
        "shaping_detail": c.shaping_detail,
        "origin_bytes_counted": c.counter_note,
        "caps": asdict(caps),
        "bound_seconds": {
            "origin": caps.origin_term,
            "download": caps.download_term,
            "swarm": caps.swarm_term,
            "T": caps.bound,
        },
        "targets": {
            "origin_bytes_over_F_max": ORIGIN_BYTES_TARGET,
            "max_time_over_T_max": TIME_TARGET,
        },
        "blob": {"size": c.blob.size, "digest": c.blob.digest},
        "piece_length": PIECE_LENGTH,
        "agent_source": {
            "before": asdict(c.source) if c.source is not None else None,
            "after": asdict(c.source_after) if c.source_after is not None else None,
            "changed_during_run": c.source_changed,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "docker_registry": c.registry,
            "curl": c.curl,
            "load_average_1min_before": c.load_before,
        },
        "runs": [],
    }
    for run in runs:
        entry: dict[str, Any] = {"index": run.index, "order": list(run.order)}
        for side in (run.p2preg, run.baseline):
            data = asdict(side)
            data["max_time"] = side.max_time if side.complete else None
            data["p50_time"] = side.p50_time if side.complete else None
            entry[side.side] = data
        document["runs"].append(entry)
    path.write_text(json.dumps(document, indent=2) + "\n")


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench_swarm",
        description="N agents pulling one blob at once vs N direct pulls from the origin: time "
        "against the Kumar & Ross lower bound, and bytes the origin served.",
    )
    parser.add_argument("--nodes", type=int, default=8, help="agents / pulling nodes (8)")
    parser.add_argument("--blob-size", default="500MiB", help="size of the random blob (500MiB)")
    parser.add_argument(
        "--node-bandwidth", default="50MiB", help="each node's upload and download cap, bytes/s"
    )
    parser.add_argument(
        "--origin-bandwidth", help="the origin's upload cap, bytes/s (default: the node's)"
    )
    parser.add_argument("--runs", type=int, default=1, help="runs, each with both sides (1)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every raw number here")
    parser.add_argument(
        "--shaping",
        choices=("auto", "netns", "limits"),
        default="auto",
        help="netns: namespaces + tbf (root); limits: agents' own limits and a pacing relay on "
        "127.0.0.1; auto: netns when it works (default)",
    )
    parser.add_argument(
        "--agent-upload-limit",
        metavar="RATE",
        help="netns only: also pass --upload-limit RATE to the agents (default: none; the links "
        "are the caps), e.g. to leave headroom on a node's uplink for its download's ACKs",
    )
    parser.add_argument(
        "--keep-logs", type=Path, metavar="DIR", help="copy every process's log here at the end"
    )
    parser.add_argument(
        "--agent-src",
        type=Path,
        metavar="DIR",
        help="run the agents and the tracker from this source tree (holding agent/, p2preg/ and "
        "tracker/, e.g. a `git archive` snapshot) instead of the installed package",
    )
    args = parser.parse_args(argv)
    try:
        args.blob_bytes = parse_size(args.blob_size, "--blob-size")
        args.node_rate = parse_size(args.node_bandwidth, "--node-bandwidth")
        origin = args.origin_bandwidth
        args.origin_rate = parse_size(origin, "--origin-bandwidth") if origin else args.node_rate
        limit = args.agent_upload_limit
        args.agent_upload_limit = parse_size(limit, "--agent-upload-limit") if limit else None
    except ConfigError as exc:
        parser.error(str(exc))
    if args.blob_bytes <= 0 or args.node_rate <= 0 or args.origin_rate <= 0:
        parser.error("--blob-size and the bandwidths must be positive")
    if not 1 <= args.nodes <= MAX_NODES:
        parser.error(f"--nodes must be between 1 and {MAX_NODES}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.agent_src is not None:
        args.agent_src = args.agent_src.resolve()
        for package in ("agent", "p2preg", "tracker"):
            if not (args.agent_src / package / "__init__.py").is_file():
                parser.error(f"--agent-src {args.agent_src}: no {package}/ package there")
    for tool in ("curl", "docker-registry"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install -y {tool})")
    if args.shaping != "limits":
        reason = netns_unavailable_reason(f"p2ps-{os.getpid()}-probe")
        if reason is not None and args.shaping == "netns":
            parser.error(f"--shaping netns is not possible here: {reason}")
        args.shaping_reason = reason
        args.shaping = "netns" if reason is None else "limits"
    else:
        args.shaping_reason = None
    if args.agent_upload_limit is not None and args.shaping != "netns":
        parser.error("--agent-upload-limit is for --shaping netns (limits mode sets the limits)")
    return args


def run(args: argparse.Namespace) -> int:
    caps = Caps(args.nodes, args.blob_bytes, args.node_rate, args.origin_rate)
    load_before = os.getloadavg()[0]  # before we start anything: what others run here
    if args.shaping_reason is not None:
        progress(f"netns shaping not available ({args.shaping_reason}); using limits")
    with contextlib.ExitStack() as cleanup:
        work = Path(tempfile.mkdtemp(prefix=f"p2ps-{os.getpid()}-", dir="/tmp"))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        if args.keep_logs is not None:
            cleanup.callback(copy_logs, work, args.keep_logs)
        progress(f"working in {work}; generating a {mib(caps.blob_size)} random blob")
        blob = write_random_blob(work / "blob.bin", caps.blob_size)
        storage = work / "origin-storage"
        storage.mkdir()
        origin_port = free_port()
        origin = start_origin(work, storage, f"127.0.0.1:{origin_port}", "origin")
        cleanup.callback(origin.close)
        push_blob(f"http://127.0.0.1:{origin_port}", blob)
        blob.path.unlink()  # the origin holds it now
        progress(f"pushed {blob.digest}")

        testbed = open_testbed(
            cleanup,
            args.shaping,
            caps,
            work,
            storage,
            origin,
            origin_port,
            netns_prefix=f"p2ps-{os.getpid()}-",
            agent_upload_limit=args.agent_upload_limit,
        )

        secret_file = work / "cluster-secret"
        secret_file.write_text(secrets.token_hex(32) + "\n")
        env = agent_env(args.agent_src)
        setup = Setup(work, blob, caps, secret_file, env)
        conditions = Conditions(
            args.shaping,
            testbed.describe(),
            testbed.counter_note,
            caps,
            blob,
            args.runs,
            curl_version(),
            registry_version(),
            load_before,
            agent_source(env, work),
        )
        progress(f"shaping: {conditions.shaping_detail}")
        progress(caps.describe_bound())
        runs = [measure_run(setup, testbed, index) for index in range(args.runs)]
        with contextlib.suppress(BenchError, OSError, subprocess.SubprocessError):
            conditions.source_after = agent_source(env, work)
        print(report(runs, conditions))
        if args.json is not None:
            write_json(args.json, runs, conditions)
            print(f"raw numbers: {args.json}")
    failed = any(r.p2preg.failed or r.baseline.failed for r in runs)
    return 1 if failed else 0


def copy_logs(work: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for log in work.rglob("*.log"):
        with contextlib.suppress(OSError):
            shutil.copy2(log, destination / log.name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_until_done(lambda: run(args), progress, "bench_swarm")


if __name__ == "__main__":
    sys.exit(main())
