"""Helpers for swarm tests: a tracker that can be stopped, in-process and subprocess agents, and
an image pull that reports its progress blob by blob.

Subprocess agents run the real CLI (``python -m p2preg agent``) so a test can SIGKILL one in the
middle of a transfer; each binds port 0 and the helper reads the bound ports from its log.
``agent_processes`` stops every process it started (SIGTERM, then SIGKILL), also on failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from agent.peer_server import PeerServer
from agent.service import RunningAgent
from agent.swarm_coordinator import SwarmCoordinator
from p2preg.config import TrackerConfig
from p2preg.mediatypes import DEFAULT_MANIFEST_ACCEPT
from tests.support.oci_image import TestImage
from tracker.server import RunningTracker, run_tracker

__all__ = [
    "SECRET",
    "AgentProcess",
    "AgentStarter",
    "ImageFactory",
    "StoppableTracker",
    "agent_processes",
    "coordinator_of",
    "expected_digests",
    "peer_server_of",
    "pull_image",
    "start_swarm",
    "start_tracker",
]

MiB = 1024 * 1024
SECRET = b"test-cluster-secret-0123456789"
REPO_ROOT = Path(__file__).resolve().parents[2]
_READY_TIMEOUT = 30.0
AgentStarter = Callable[..., Awaitable[RunningAgent]]  # the start_agent fixture
ImageFactory = Callable[..., TestImage]  # the image_factory fixture
_STOP_TIMEOUT = 5.0


# -- tracker -------------------------------------------------------------------------------------


@dataclasses.dataclass
class StoppableTracker:
    """An in-process tracker in its own cancel scope: ``stop()`` takes it away mid-test."""

    running: RunningTracker
    scope: trio.CancelScope
    stopped: trio.Event

    @property
    def url(self) -> str:
        return self.running.url

    async def stop(self) -> None:
        self.scope.cancel()
        with trio.fail_after(5):
            await self.stopped.wait()


async def start_tracker(nursery: trio.Nursery, **overrides: Any) -> StoppableTracker:
    fields: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "lease_ttl": 3.0}
    fields.update(overrides)
    config = TrackerConfig(cluster_secret=SECRET, **fields)
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(*, task_status: trio.TaskStatus[RunningTracker]) -> None:
        try:
            with scope:
                await run_tracker(config, task_status=task_status)
        finally:
            stopped.set()

    running: RunningTracker = await nursery.start(run)
    return StoppableTracker(running, scope, stopped)


def write_secret(tmp_path: Path) -> Path:
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_bytes(SECRET)
    return secret_file


# -- in-process agents ---------------------------------------------------------------------------


async def start_swarm(
    nursery: trio.Nursery,
    start_agent: AgentStarter,
    tmp_path: Path,
    upstream: str,
    count: int,
    *,
    tracker: StoppableTracker | None = None,
    lease_ttl: float = 3.0,
    **extra: Any,
) -> tuple[StoppableTracker, list[RunningAgent]]:
    """A tracker (unless given) and ``count`` in-process agents (RunningAgent) using it."""
    secret_file = write_secret(tmp_path)
    if tracker is None:
        tracker = await start_tracker(nursery, lease_ttl=lease_ttl)
    agents: list[RunningAgent] = []
    for _ in range(count):
        agents.append(
            await start_agent(
                upstream,
                peer_host="127.0.0.1",
                peer_port=0,
                trackers=(tracker.url,),
                cluster_secret_file=str(secret_file),
                piece_length=1 * MiB,
                swarm_stall_timeout=2.0,
                piece_timeout=5.0,
                **extra,
            )
        )
    return tracker, agents


def peer_server_of(agent: RunningAgent) -> PeerServer:
    assert agent.peer_server is not None, "peer-to-peer is off for this agent"
    return agent.peer_server


def coordinator_of(agent: RunningAgent) -> SwarmCoordinator:
    assert agent.coordinator is not None, "this agent has no tracker"
    return agent.coordinator


# -- pulling -------------------------------------------------------------------------------------


def expected_digests(image: TestImage) -> dict[str, str]:
    """sha256 of every body a pull of ``image`` returns, by digest (what pull_image returns)."""
    return {
        blob.digest: hashlib.sha256(blob.path.read_bytes()).hexdigest()
        for blob in (image.manifest, image.config, *image.layers)
    }


async def pull_image(
    registry_url: str,
    repo: str,
    image: TestImage,
    progress: dict[str, int] | None = None,
) -> dict[str, str]:
    """Pull manifest, config and layers through one agent, streaming each body; sha256 of each
    body by digest. ``progress[digest]`` is updated with the bytes received so far."""
    got: dict[str, str] = {}
    progress = progress if progress is not None else {}
    async with httpx.AsyncClient(base_url=registry_url, timeout=60, trust_env=False) as client:
        response = await client.get(
            f"/v2/{repo}/manifests/{image.tag}", headers={"Accept": DEFAULT_MANIFEST_ACCEPT}
        )
        assert response.status_code == 200, response.text
        got[image.manifest.digest] = hashlib.sha256(response.content).hexdigest()
        for blob in (image.config, *image.layers):
            sha = hashlib.sha256()
            progress[blob.digest] = 0
            async with client.stream("GET", f"/v2/{repo}/blobs/{blob.digest}") as response:
                assert response.status_code == 200, (await response.aread())[:500]
                async for chunk in response.aiter_bytes():
                    sha.update(chunk)
                    progress[blob.digest] += len(chunk)
            got[blob.digest] = sha.hexdigest()
    return got


# -- agents as processes -------------------------------------------------------------------------


@dataclasses.dataclass
class AgentProcess:
    """One ``python -m p2preg agent`` process; ports are read from its log once it is up."""

    name: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    registry_url: str = ""
    peer_port: int = 0

    @property
    def peer_id(self) -> bytes:
        return (self.data_dir / "peer-id").read_bytes()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def sigkill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    async def wait_ready(self) -> None:
        with trio.fail_after(_READY_TIMEOUT):
            while True:
                text = self.log_text()
                registry = re.search(r"registry endpoint listening on (http://\S+)", text)
                peer = re.search(r"peer server on \S+:(\d+)", text)
                if registry and peer:
                    self.registry_url, self.peer_port = registry.group(1), int(peer.group(1))
                    return
                if not self.alive:
                    raise RuntimeError(
                        f"agent {self.name} exited ({self.process.returncode}): {text[-2000:]}"
                    )
                await trio.sleep(0.05)

    async def wait_exit(self, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            while self.alive:  # noqa: ASYNC110 - a child process has no trio event to wait on
                await trio.sleep(0.02)
        return not self.alive


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a process with stdout and stderr to ``log_path`` (Popen returns at once)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=_clean_env(),
        )


@asynccontextmanager
async def agent_processes(
    tmp_path: Path,
    count: int,
    *,
    tracker_url: str,
    upstream: str,
    extra_args: Sequence[str] = (),
) -> AsyncIterator[list[AgentProcess]]:
    """Start ``count`` agent processes on loopback; stop every one of them on the way out."""
    secret_file = write_secret(tmp_path)
    agents: list[AgentProcess] = []
    try:
        for index in range(count):
            data_dir = tmp_path / f"proc-agent{index}"
            log_path = tmp_path / f"proc-agent{index}.log"
            args = [
                sys.executable,
                "-m",
                "p2preg",
                "agent",
                "--registry-addr=127.0.0.1:0",
                "--peer-addr=127.0.0.1:0",
                f"--tracker={tracker_url}",
                f"--cluster-secret-file={secret_file}",
                f"--upstream={upstream}",
                f"--data-dir={data_dir}",
                "--piece-length=1MiB",
                "--swarm-stall-timeout=2s",
                "--piece-timeout=5s",
                "--log-level=info",
                *extra_args,
            ]
            process = _spawn(args, log_path)
            agents.append(AgentProcess(f"agent{index}", process, data_dir, log_path))
        for agent in agents:
            await agent.wait_ready()
        yield agents
    except BaseException:
        for agent in agents:  # pytest shows this with the failure
            print(f"--- {agent.name} ({agent.registry_url}, peer port {agent.peer_port}) log tail")
            print(agent.log_text()[-4000:])
        raise
    finally:
        with trio.CancelScope(shield=True):
            for agent in agents:
                if agent.alive:
                    agent.process.terminate()
            for agent in agents:
                if not await agent.wait_exit(_STOP_TIMEOUT):
                    agent.process.kill()
                    await agent.wait_exit(_STOP_TIMEOUT)
            for agent in agents:
                agent.process.wait(timeout=1)  # reaped by now; this only collects the status
