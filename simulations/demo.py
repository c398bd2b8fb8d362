"""``p2preg demo``: the whole system on one machine, in one command, cleaned up afterwards.

It starts an origin registry with a freshly generated three-layer image (docker-registry when it
is installed, else a small read-only registry serving an OCI image layout), a tracker and several
agents as separate processes, all on 127.0.0.1. The origin's upload and every node's links are
capped (a throttling relay in front of the origin; the agents' own rate limits), so the numbers
mean what they would on a real network: then every node pulls the image through its agent at the
same instant, with live progress, and the same pull straight from the origin runs for comparison.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from p2preg.units import format_size
from simulations.bench_swarm import OriginRelay

MiB = 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REPO = "demo/app"
TAG = "v1"


@dataclass(frozen=True)
class DemoOptions:
    nodes: int = 4
    layer_sizes: tuple[int, ...] = (40 * MiB, 8 * MiB, 256 * 1024)
    node_rate: int = 40 * MiB
    origin_rate: int = 40 * MiB
    keep: bool = False


@dataclass
class Blob:
    digest: str
    data: bytes
    media_type: str


@dataclass
class Image:
    manifest: Blob
    config: Blob
    layers: list[Blob]

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]

    @property
    def size(self) -> int:
        return sum(len(b.data) for b in (self.manifest, *self.blobs))


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_image(layer_sizes: tuple[int, ...], seed: int) -> Image:
    """Random (incompressible) tar layers, a config and a manifest, all in memory."""
    rng = random.Random(seed)
    layers, diff_ids = [], []
    for index, size in enumerate(layer_sizes):
        payload = rng.randbytes(size)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"layer{index}/data.bin")
            info.size, info.mtime = size, 0
            tar.addfile(info, io.BytesIO(payload))
        data = buffer.getvalue()
        diff_ids.append(_digest(data))
        layers.append(Blob(_digest(data), data, OCI_LAYER))
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {},
    }
    config_bytes = json.dumps(config_doc, sort_keys=True).encode()
    config = Blob(_digest(config_bytes), config_bytes, OCI_CONFIG)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": len(config_bytes)},
        "layers": [
            {"mediaType": b.media_type, "digest": b.digest, "size": len(b.data)} for b in layers
        ],
    }
    manifest_bytes = json.dumps(manifest_doc, sort_keys=True).encode()
    return Image(Blob(_digest(manifest_bytes), manifest_bytes, OCI_MANIFEST), config, layers)


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Processes:
    """Every child process the demo starts, stopped (TERM, then KILL) whatever happens."""

    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            child = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for child in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=5)


async def wait_http(url: str, seconds: float = 20.0) -> None:
    async with httpx.AsyncClient(timeout=1, trust_env=False) as client:
        with trio.fail_after(seconds):
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(url)).status_code in (200, 401, 404):
                        return
                await trio.sleep(0.05)


# -- the origin ----------------------------------------------------------------------------------


def start_origin(procs: Processes, work: Path, port: int) -> str:
    """docker-registry when installed, else the project's own read-only layout registry."""
    registry = shutil.which("docker-registry")
    if registry:
        config = work / "origin.yml"
        config.write_text(
            "version: 0.1\nlog: {level: error}\n"
            f"storage: {{filesystem: {{rootdirectory: {work / 'origin'}}}}}\n"
            f"http: {{addr: 127.0.0.1:{port}, secret: demo-{os.getpid()}}}\n"
        )
        env_free = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(work / "origin.log", "ab") as out:
            child = subprocess.Popen(
                [registry, "serve", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env_free,
                start_new_session=True,
            )
        procs.children.append(child)
        return "docker-registry (CNCF distribution)"
    procs.start(
        [
            sys.executable,
            "-m",
            "simulations.layout_registry",
            "--addr",
            f"127.0.0.1:{port}",
            "--root",
            str(work / "layout"),
        ],
        work / "origin.log",
    )
    return "p2preg layout registry (docker-registry is not installed)"


def write_layout(image: Image, root: Path) -> None:
    """Blobs by digest plus the manifest under its tag: what the layout registry serves."""
    for blob in (image.manifest, *image.blobs):
        path = root / "blobs" / blob.digest.replace(":", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob.data)
    (root / "tags.json").write_text(json.dumps({f"{REPO}:{TAG}": image.manifest.digest}))


async def push_image(origin: str, image: Image) -> None:
    """The registry API's monolithic upload: POST, then PUT with the digest; then the manifest."""
    async with httpx.AsyncClient(base_url=origin, timeout=60, trust_env=False) as client:
        for blob in image.blobs:
            started = await client.post(f"/v2/{REPO}/blobs/uploads/")
            started.raise_for_status()
            location = started.headers["location"]
            # Keep the upload's own query (its _state token): httpx's params= would replace it.
            separator = "&" if "?" in location else "?"
            done = await client.put(
                f"{location}{separator}digest={blob.digest}",
                content=blob.data,
                headers={"Content-Type": "application/octet-stream"},
            )
            done.raise_for_status()
        response = await client.put(
            f"/v2/{REPO}/manifests/{TAG}",
            content=image.manifest.data,
            headers={"Content-Type": OCI_MANIFEST},
        )
        response.raise_for_status()


# -- a throttling relay in front of the origin -------------------------------------------------


# -- pulling -----------------------------------------------------------------------------------


@dataclass
class Pull:
    name: str
    received: int = 0
    started: float = 0.0
    finished: float | None = None
    error: str | None = None


async def pull(registry: str, image: Image, state: Pull) -> None:
    """Manifest then blobs, as a client pulls; every byte checked against its digest.
    Links are paced by the agents' limits and the origin relay, not by the client."""
    state.started = trio.current_time()
    try:
        async with httpx.AsyncClient(base_url=registry, timeout=120, trust_env=False) as client:
            for blob, kind in [(image.manifest, "manifests"), *[(b, "blobs") for b in image.blobs]]:
                headers = {"Accept": OCI_MANIFEST} if kind == "manifests" else {}
                hasher = hashlib.sha256()
                async with client.stream(
                    "GET", f"/v2/{REPO}/{kind}/{blob.digest}", headers=headers
                ) as response:
                    if response.status_code != 200:
                        raise RuntimeError(
                            f"{kind} {blob.digest[:19]}: HTTP {response.status_code}"
                        )
                    async for chunk in response.aiter_raw():
                        hasher.update(chunk)
                        state.received += len(chunk)
                if "sha256:" + hasher.hexdigest() != blob.digest:
                    raise RuntimeError(f"{blob.digest[:19]} arrived corrupted")
        state.finished = trio.current_time()
    except Exception as exc:
        state.error = str(exc)


def progress_line(pulls: list[Pull], total: int, label: str) -> str:
    cells = []
    for state in pulls:
        done = "done" if state.finished else ("FAIL" if state.error else "")
        cells.append(
            f"{state.name} {100 * state.received // max(1, total):3d}%{done and ' ' + done}"
        )
    return f"\r  {label}: " + "  ".join(cells) + "   "


async def run_pulls(label: str, registries: list[str], image: Image) -> list[Pull]:
    pulls = [Pull(f"node{i + 1}") for i in range(len(registries))]
    async with trio.open_nursery() as nursery:
        for registry, state in zip(registries, pulls, strict=True):
            nursery.start_soon(pull, registry, image, state)
        while any(p.finished is None and p.error is None for p in pulls):
            print(progress_line(pulls, image.size, label), end="", flush=True)
            await trio.sleep(0.2)
    print(progress_line(pulls, image.size, label), flush=True)
    return pulls


def origin_bytes_per_node(logs: list[Path]) -> list[tuple[int, int]]:
    """(bytes cached, bytes of them from the origin) per agent, from its log lines."""
    result = []
    for log in logs:
        cached = from_origin = 0
        for line in log.read_text(errors="replace").splitlines():
            if "cached sha256:" in line and "from the origin)" in line:
                inside = line.rsplit("(", 1)[1]
                total_text, _, origin_text = inside.partition(" bytes; ")
                cached += int(total_text)
                from_origin += int(origin_text.split()[0])
        result.append((cached, from_origin))
    return result


async def run_demo(options: DemoOptions) -> int:
    work = Path(tempfile.mkdtemp(prefix="p2preg-demo-"))
    procs = Processes()
    try:
        image = build_image(options.layer_sizes, seed=int(time.time()))
        print(
            f"p2preg demo: {options.nodes} nodes pull a {len(image.layers)}-layer image of "
            f"{format_size(image.size)} at once"
        )
        origin_port = free_port()
        write_layout(image, work / "layout")
        kind = start_origin(procs, work, origin_port)
        await wait_http(f"http://127.0.0.1:{origin_port}/v2/")
        if kind.startswith("docker-registry"):
            await push_image(f"http://127.0.0.1:{origin_port}", image)
        secret = work / "cluster-secret"
        secret.write_text(os.urandom(32).hex())
        tracker_port = free_port()
        procs.start(
            [
                sys.executable,
                "-m",
                "p2preg",
                "tracker",
                "--addr",
                f"127.0.0.1:{tracker_port}",
                "--cluster-secret-file",
                str(secret),
                "--log-level",
                "warning",
            ],
            work / "tracker.log",
        )
        # The same relay bench_swarm uses: the origin's upload capped for everyone together,
        # each connection at a node's download rate, and the origin's bytes counted.
        relay = OriginRelay(origin_port, options.origin_rate, options.node_rate)
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(relay.serve)
            rate = f"{options.node_rate}"
            agents, logs = [], []
            for index in range(options.nodes):
                registry_port, peer_port = free_port(), free_port()
                log = work / f"agent{index + 1}.log"
                procs.start(
                    [
                        sys.executable,
                        "-m",
                        "p2preg",
                        "agent",
                        "--registry-addr",
                        f"127.0.0.1:{registry_port}",
                        "--peer-addr",
                        f"127.0.0.1:{peer_port}",
                        "--tracker",
                        f"http://127.0.0.1:{tracker_port}",
                        "--cluster-secret-file",
                        str(secret),
                        "--upstream",
                        f"http://127.0.0.1:{relay_port}",
                        "--data-dir",
                        str(work / f"agent{index + 1}"),
                        "--upload-limit",
                        rate,
                        "--download-limit",
                        rate,
                        "--piece-length",
                        "1MiB",
                        "--log-level",
                        "info",
                    ],
                    log,
                )
                agents.append(f"http://127.0.0.1:{registry_port}")
                logs.append(log)
            print(f"  origin: {kind}, upload capped at {format_size(options.origin_rate)}/s")
            print(
                f"  nodes: {options.nodes} agents + a tracker, each node capped at "
                f"{format_size(options.node_rate)}/s up and down"
            )
            for url in [f"http://127.0.0.1:{tracker_port}/healthz", *[a + "/v2/" for a in agents]]:
                await wait_http(url)
            p2p = await run_pulls("through p2preg", agents, image)
            p2p_origin = relay.bytes_from_origin
            direct = await run_pulls(
                "straight from the origin",
                [f"http://127.0.0.1:{relay_port}"] * options.nodes,
                image,
            )
            direct_origin = relay.bytes_from_origin - p2p_origin
            nursery.cancel_scope.cancel()
        return report(options, image, p2p, direct, p2p_origin, direct_origin, logs)
    finally:
        procs.stop_all()
        if options.keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(
    options: DemoOptions,
    image: Image,
    p2p: list[Pull],
    direct: list[Pull],
    p2p_origin: int,
    direct_origin: int,
    logs: list[Path],
) -> int:
    failures = [p for p in (*p2p, *direct) if p.error]
    per_node = origin_bytes_per_node(logs)
    print()
    print(f"  {'node':<7}{'p2preg':>10}{'from peers':>14}{'from origin':>14}{'direct':>10}")
    for state, base, (cached, from_origin) in zip(p2p, direct, per_node, strict=True):
        took = f"{state.finished - state.started:.1f} s" if state.finished else "failed"
        base_took = f"{base.finished - base.started:.1f} s" if base.finished else "failed"
        print(
            f"  {state.name:<7}{took:>10}{format_size(cached - from_origin):>14}"
            f"{format_size(from_origin):>14}{base_took:>10}"
        )
    if failures:
        for state in failures:
            print(f"  {state.name}: {state.error}")
        return 1
    p2p_max = max(p.finished - p.started for p in p2p if p.finished)
    direct_max = max(p.finished - p.started for p in direct if p.finished)
    print(
        f"  all nodes done: p2preg {p2p_max:.1f} s, straight from the origin {direct_max:.1f} s"
        f" -> {direct_max / p2p_max:.1f}x faster"
    )
    print(
        f"  origin served: p2preg {format_size(p2p_origin)} "
        f"({p2p_origin / image.size:.2f} copies of the image), "
        f"direct {format_size(direct_origin)} ({direct_origin / image.size:.2f} copies)"
    )
    return 0


@contextlib.contextmanager
def _interrupt_cleanly() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(options: DemoOptions) -> int:
    with _interrupt_cleanly():
        try:
            return trio.run(run_demo, options)
        except KeyboardInterrupt:
            print("\n  interrupted; everything the demo started was stopped")
            return 130
