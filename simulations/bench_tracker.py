"""The tracker's announce capacity, against what a rollout of N nodes asks of it.

    python -m simulations.bench_tracker [--peers 10000] [--announces 20000]
        [--connections 64] [--interval 1s] [--json FILE]
    python -m simulations.bench_tracker --storm [--peers 10000] [--deadline 30s]
        [--warm-sessions] [--three-calls] [--json FILE]

Why: a downloading agent announced once a second (now at the pace the tracker sets,
p2preg/announce_pacing.py, which these figures chose) and every announce of a blob goes to the
one tracker its digest ranks first (rendezvous hashing, docs/tracker.md), so a rollout of N
nodes sends N / interval announces a second to one tracker process. The simulator answers
every one of them at once; this measures what the real tracker can do.

It starts the real tracker (``p2preg tracker``) on 127.0.0.1, opens a session for each of
``--peers`` peer ids (the cluster-secret handshake), announces each once so the blob's swarm
holds them all, then sends ``--announces`` more, round robin over the peers, each with a random
piece count, over ``--connections`` keep-alive connections (one request in flight on each).
The requests are built beforehand and the answers read with a minimal HTTP/1.1 reader, so the
load generator costs far less than the tracker it drives. It reports the tracker process's CPU
per announce (user + system, from /proc), its throughput and the answers' latency, and side by
side: the announces a second one tracker core can answer against the rollout's demand.

``--storm`` instead starts ``--peers`` agents at once, each making the tracker calls of a
pull's start (StormResult), and reports how many got through within the client's deadline and
how many would have gone to the origin. ``--three-calls``: the start of agents before the
tracker's /v1/start (the metainfo, the lease and an announce), the baseline to compare with.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import trio

from p2preg.cluster_auth import authorization_header, client_mac
from p2preg.digest import Digest
from p2preg.errors import ConfigError
from p2preg.metainfo import MetaInfo
from p2preg.units import parse_duration
from simulations.bench_registry import free_port, wait_ready
from simulations.bench_swarm import process_cpu_seconds
from simulations.emulator import percentile
from simulations.netns import Child
from tracker.client import DEFAULT_TIMEOUT

DIGEST = "sha256:" + "ab" * 32
PIECES = 512  # a 1 GiB layer at the agent's default piece length (2 MiB)
MSGPACK = "application/msgpack"
SETUP_CONCURRENCY = 32
MAX_COUNT = 1_000_000
MAX_STORM = 15_000  # connections open at once: this machine's open-file limit is 20,000
ANSWER_TIMEOUT = 60.0  # one answer; the whole run is bounded by --announces


@dataclass(frozen=True, slots=True)
class Result:
    peers: int
    announces: int
    connections: int
    seconds: float
    tracker_cpu_s: float
    cpu_ms_per_announce: float
    announces_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    interval_s: float
    demand_per_s: float  # the rollout's announces a second: peers / interval
    capacity_per_core: float  # 1000 / cpu_ms_per_announce

    def report(self) -> str:
        ratio = self.capacity_per_core / self.demand_per_s
        rows = [
            f"tracker   {self.peers} peers in one blob's swarm, {self.announces} announces "
            f"over {self.connections} connections in {self.seconds:.1f} s",
            f"CPU       {self.cpu_ms_per_announce:.3f} ms per announce "
            f"({self.tracker_cpu_s:.1f} s in all, user + system)",
            f"served    {self.announces_per_s:.0f} announces/s; latency p50 "
            f"{self.latency_p50_ms:.1f} ms, p99 {self.latency_p99_ms:.1f} ms",
            "",
            "| | announces a second | ratio |",
            "| --- | --- | --- |",
            f"| demand: {self.peers} downloading nodes, one announce each "
            f"{self.interval_s:g} s (baseline) | {self.demand_per_s:.0f} | 1.00x |",
            f"| one tracker core at the measured CPU per announce | "
            f"{self.capacity_per_core:.0f} | {ratio:.2f}x |",
        ]
        return "\n".join(rows)


@dataclass(frozen=True, slots=True)
class StormResult:
    """Every agent starting a pull at once: each makes the start calls of agent/
    swarm_coordinator.py (a session: challenge + session; the metainfo; the lease, held by the
    blob's fetcher; an announce), each call within the client's deadline (tracker/client.py
    DEFAULT_TIMEOUT); an agent whose call misses it takes the tracker for down and pulls the
    blob from the origin."""

    peers: int
    warm_sessions: bool  # sessions open before the storm: no handshake
    three_calls: bool  # the start before /v1/start: metainfo, lease, announce
    deadline_s: float
    through: int  # agents whose every start call was answered within the deadline
    gave_up: int  # agents that would have gone to the origin
    all_through_s: float  # when the last agent that got through was through
    start_p50_s: float  # of the agents that got through
    start_p99_s: float
    tracker_cpu_s: float

    def report(self) -> str:
        calls: tuple[str, ...] = THREE_CALLS if self.three_calls else START_CALLS
        calls = calls if self.warm_sessions else HANDSHAKE + calls
        return "\n".join(
            [
                f"storm     {self.peers} agents start at once, {len(calls)} tracker "
                f"call{'s' if len(calls) > 1 else ''} each "
                f"({', '.join(calls)}), each within {self.deadline_s:g} s",
                f"through   {self.through} ({100 * self.through / self.peers:.1f}%), the last "
                f"at {self.all_through_s:.1f} s; start p50 {self.start_p50_s:.2f} s, p99 "
                f"{self.start_p99_s:.2f} s",
                f"origin    {self.gave_up} agents missed a deadline and would pull from the origin",
                f"CPU       {self.tracker_cpu_s:.1f} s of tracker CPU, "
                f"{1000 * self.tracker_cpu_s / self.peers:.2f} ms per agent's start",
            ]
        )


HANDSHAKE = ("challenge", "session")
START_CALLS = ("start",)
THREE_CALLS = ("metainfo", "lease", "announce")


async def open_sessions(port: int, secret: bytes, peer_ids: Sequence[bytes]) -> list[bytes]:
    """A session token per peer id (the handshake of ``handshake``), over SETUP_CONCURRENCY
    connections."""
    tokens: list[bytes] = [b""] * len(peer_ids)
    indexes = iter(range(len(peer_ids)))

    async def worker() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            call = _Call(stream, port)
            for index in indexes:
                tokens[index] = await handshake(call, secret, peer_ids[index])

    async with trio.open_nursery() as nursery:
        for _ in range(SETUP_CONCURRENCY):
            nursery.start_soon(worker)
    return tokens


def http_request(
    port: int, method: str, path: str, body: object = None, token: bytes | None = None
) -> bytes:
    """One request as tracker/client.py sends it, as bytes on the wire."""
    content: bytes = b"" if body is None else msgpack.packb(body, use_bin_type=True)
    auth = "" if token is None else f"Authorization: {authorization_header(token)}\r\n"
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        f"Content-Type: {MSGPACK}\r\nAccept: {MSGPACK}\r\n"
        f"Content-Length: {len(content)}\r\n\r\n"
    )
    return head.encode() + content


def announce_request(port: int, peer_id: bytes, token: bytes, index: int, pieces: int) -> bytes:
    """One announce as the agent sends it."""
    body = {
        "digest": DIGEST,
        "peer_id": peer_id,
        "addr": f"127.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}:7000",
        "zone": "",
        "complete": pieces == PIECES,
        "pieces": pieces,
    }
    return http_request(port, "POST", "/v1/announce", body, token)


async def read_answer(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bytes]:
    """Read one HTTP/1.1 answer with a Content-Length body from ``stream``: its status and
    body. ``buffer`` carries bytes read past it (none, with one request in flight)."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("the tracker closed the connection")
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end]).decode("latin-1").lower()
    status = int(head.split(" ", 2)[1])
    length = 0
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            length = int(line.partition(":")[2])
    while len(buffer) < end + length:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("the tracker closed the connection mid-answer")
        buffer += data
    body = bytes(buffer[end : end + length])
    del buffer[: end + length]
    return status, body


async def drive(port: int, requests: Sequence[bytes], connections: int) -> list[float]:
    """Send ``requests`` over ``connections`` keep-alive connections; the answers' latencies."""
    latencies: list[float] = []
    queue = iter(requests)

    async def connection() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buffer = bytearray()
        async with stream:
            for request in queue:
                start = time.perf_counter()
                await stream.send_all(request)
                with trio.fail_after(ANSWER_TIMEOUT):
                    status, _ = await read_answer(stream, buffer)
                if status != 200:
                    raise ConfigError(f"announce answered {status}")
                latencies.append(time.perf_counter() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(connection)
    return latencies


Caller = Callable[..., Awaitable[Any]]


class _Call:
    """One agent's connection to the tracker, one request at a time: the answer's msgpack
    payload (None for a 404), within ``deadline`` (else TooSlowError: the client gives up)."""

    def __init__(self, stream: trio.SocketStream, port: int, deadline: float = math.inf) -> None:
        self.stream, self.port, self.buffer = stream, port, bytearray()
        self.deadline = deadline

    async def __call__(
        self, method: str, path: str, body: object = None, token: bytes | None = None
    ) -> Any:
        with trio.fail_after(self.deadline):
            await self.stream.send_all(http_request(self.port, method, path, body, token))
            status, content = await read_answer(self.stream, self.buffer)
        payload = msgpack.unpackb(content) if content else None
        if status == 404:
            return None
        if status != 200:
            raise ConfigError(f"{method} {path} answered {status}: {content[:200]!r}")
        return payload


async def handshake(call: Caller, secret: bytes, peer_id: bytes) -> bytes:
    """A session token for ``peer_id``: the challenge and the session (docs/tracker.md)."""
    answer = await call("POST", "/v1/auth/challenge", {"peer_id": peer_id})
    nonce_t, nonce_c = answer["nonce_t"], secrets.token_bytes(32)
    mac_c = client_mac(secret, peer_id, nonce_t, nonce_c)
    session = {"peer_id": peer_id, "nonce_t": nonce_t, "nonce_c": nonce_c, "mac_c": mac_c}
    token: bytes = (await call("POST", "/v1/auth/session", session))["token"]
    return token


async def start_calls(
    call: Caller,
    secret: bytes,
    peer_id: bytes,
    index: int,
    token: bytes | None = None,
    three_calls: bool = False,
) -> bytes:
    """What an agent asks the tracker when a pull starts (agent/swarm_coordinator.py): a
    handshake unless it holds a session ``token``, then /v1/start (``three_calls``: the
    metainfo, the lease and an announce, as agents did before it); its token."""
    if token is None:
        token = await handshake(call, secret, peer_id)
    addr = f"10.9.{index >> 8 & 255}.{index & 255}:7000"
    body = {"digest": DIGEST, "peer_id": peer_id, "addr": addr, "zone": ""}
    if not three_calls:
        await call("POST", "/v1/start", body, token)
        return token
    await call("GET", f"/v1/metainfo/{DIGEST}", None, token)
    await call("POST", "/v1/lease", {"digest": DIGEST, "peer_id": peer_id}, token)
    await call("POST", "/v1/announce", {**body, "complete": False, "pieces": 0}, token)
    return token


async def publish(port: int, secret: bytes, peer_id: bytes) -> None:
    """The blob's fetcher, before the storm: the lease, then the metainfo with its first
    hashes (the others' starts find the lease held and the metainfo published)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        call = _Call(stream, port)
        token = await start_calls(call, secret, peer_id, 0)
        length = 2 * 1024 * 1024
        empty = MetaInfo.empty(Digest.parse(DIGEST), PIECES * length, length)
        hashes = tuple(bytes(16) if i < 32 else None for i in range(PIECES))
        metainfo = dataclasses.replace(empty, piece_hashes=hashes)
        await call("PUT", f"/v1/metainfo/{DIGEST}", metainfo.to_wire(), token)


async def storm(
    port: int,
    secret: bytes,
    peer_ids: Sequence[bytes],
    deadline: float,
    tokens: Sequence[bytes | None],
    three_calls: bool = False,
) -> list[float | None]:
    """Every agent's start calls at once; per agent, the seconds until it was through (None:
    its connect or a call missed the deadline, as tracker/client.py times them)."""
    through: list[float | None] = [None] * len(peer_ids)
    start = trio.current_time()

    async def agent(index: int) -> None:
        try:
            with trio.fail_after(deadline):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
        except (trio.TooSlowError, OSError):
            return
        async with stream:
            call = _Call(stream, port, deadline)
            try:
                await start_calls(
                    call, secret, peer_ids[index], index + 1, tokens[index], three_calls
                )
            except trio.TooSlowError:
                return
        through[index] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        for index in range(len(peer_ids)):
            nursery.start_soon(agent, index)
    return through


def run_storm(
    peers: int, deadline: float, warm: bool, work: Path, three_calls: bool = False
) -> StormResult:
    with started_tracker(work) as (port, pid, secret):
        rng = random.Random(2)
        trio.run(publish, port, secret, rng.randbytes(16))
        peer_ids = [rng.randbytes(16) for _ in range(peers)]
        tokens: list[bytes | None] = [None] * peers
        if warm:
            print(f"opening {peers} sessions first ...", file=sys.stderr)
            tokens = list(trio.run(open_sessions, port, secret, peer_ids))
        print(f"{peers} agents start at once ...", file=sys.stderr)
        cpu_before = process_cpu_seconds(pid)
        times = trio.run(storm, port, secret, peer_ids, deadline, tokens, three_calls)
        cpu = process_cpu_seconds(pid) - cpu_before
    done = sorted(t for t in times if t is not None)
    return StormResult(
        peers=peers,
        warm_sessions=warm,
        three_calls=three_calls,
        deadline_s=deadline,
        through=len(done),
        gave_up=peers - len(done),
        all_through_s=done[-1] if done else math.nan,
        start_p50_s=percentile(done, 50),
        start_p99_s=percentile(done, 99),
        tracker_cpu_s=cpu,
    )


@contextlib.contextmanager
def started_tracker(work: Path) -> Iterator[tuple[int, int, bytes]]:
    """The real tracker on 127.0.0.1: (port, pid, cluster secret); stopped at the end."""
    secret = secrets.token_hex(32).encode()
    secret_file = work / "cluster-secret"
    secret_file.write_bytes(secret)
    port = free_port()
    argv = [sys.executable, "-m", "p2preg", "tracker", "--addr", f"127.0.0.1:{port}"]
    argv += ["--cluster-secret-file", str(secret_file), "--log-level", "warning"]
    tracker = Child(argv, work / "tracker.log")
    try:
        wait_ready(tracker, f"http://127.0.0.1:{port}/healthz", None, "tracker")
        pid = tracker.pid
        assert pid is not None  # (started in __init__)
        yield port, pid, secret
    finally:
        tracker.close()


def run(peers: int, announces: int, connections: int, interval: float, work: Path) -> Result:
    with started_tracker(work) as (port, pid, secret):
        rng = random.Random(1)
        peer_ids = [rng.randbytes(16) for _ in range(peers)]
        print(f"opening {peers} sessions ...", file=sys.stderr)
        tokens = trio.run(open_sessions, port, secret, peer_ids)
        warm = [
            announce_request(port, peer, token, i, 0)
            for i, (peer, token) in enumerate(zip(peer_ids, tokens, strict=True))
        ]
        print(f"announcing {peers} peers once ...", file=sys.stderr)
        trio.run(drive, port, warm, connections)
        measured = [
            announce_request(
                port, peer_ids[n % peers], tokens[n % peers], n % peers, rng.randrange(PIECES)
            )
            for n in range(announces)
        ]
        print(f"measuring {announces} announces ...", file=sys.stderr)
        cpu_before, start = process_cpu_seconds(pid), time.perf_counter()
        latencies = trio.run(drive, port, measured, connections)
        seconds = time.perf_counter() - start
        cpu = process_cpu_seconds(pid) - cpu_before
    per_announce_ms = 1000 * cpu / announces
    return Result(
        peers=peers,
        announces=announces,
        connections=connections,
        seconds=seconds,
        tracker_cpu_s=cpu,
        cpu_ms_per_announce=per_announce_ms,
        announces_per_s=announces / seconds,
        latency_p50_ms=1000 * percentile(latencies, 50),
        latency_p99_ms=1000 * percentile(latencies, 99),
        interval_s=interval,
        demand_per_s=peers / interval,
        capacity_per_core=1000 / per_announce_ms if per_announce_ms > 0 else float("inf"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--announces", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--interval", default="1s", help="each node's announce interval")
    parser.add_argument(
        "--storm",
        action="store_true",
        help="instead: --peers agents start a pull at once (the start-up calls of each)",
    )
    parser.add_argument(
        "--deadline", default=f"{DEFAULT_TIMEOUT:g}s", help="a tracker call's deadline (5s)"
    )
    parser.add_argument(
        "--warm-sessions",
        action="store_true",
        help="--storm: the agents hold a session already (opened before the storm)",
    )
    parser.add_argument(
        "--three-calls",
        action="store_true",
        help="--storm: start as agents before /v1/start did (metainfo, lease, announce)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result: Result | StormResult
    try:
        interval = parse_duration(args.interval)
        deadline = parse_duration(args.deadline)
        for name in ("peers", "announces", "connections"):
            if not 1 <= getattr(args, name) <= MAX_COUNT:
                raise ConfigError(f"--{name} must be 1..{MAX_COUNT}")
        if interval <= 0 or deadline <= 0:
            raise ConfigError("--interval and --deadline must be positive")
        if args.storm and args.peers > MAX_STORM:
            raise ConfigError(f"--storm: at most {MAX_STORM} peers (a connection each)")
        with tempfile.TemporaryDirectory(prefix="p2preg-bench-tracker-") as work:
            if args.storm:
                result = run_storm(
                    args.peers, deadline, args.warm_sessions, Path(work), args.three_calls
                )
            else:
                result = run(args.peers, args.announces, args.connections, interval, Path(work))
    except ConfigError as exc:
        print(f"bench_tracker: {exc}", file=sys.stderr)
        return 2
    print(result.report())
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
