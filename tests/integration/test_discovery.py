"""mDNS discovery between real processes, on a LAN of network namespaces this test builds.

Multicast must never leave the machine from a test, so zeroconf runs only inside namespaces:
one bridge namespace and a few node namespaces, each with a veth into the bridge on
10.205.0.0/24. The origin (docker-registry), the tracker and the agents are processes inside
them (``ip netns exec``); so are the small clients that push and pull blobs
(tests/support/netns_client.py), because a namespace cannot reach the root namespace's
127.0.0.1. Every namespace and process is removed in the fixture's ``finally``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from simulations.netns import Child, Namespace, NetnsLab
from tests.support.tools import require_netns, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT = str(REPO_ROOT / "tests" / "support" / "netns_client.py")
SECRET = b"discovery-test-cluster-secret-0123"
SUBNET = "10.205.0"
PEER_PORT = 7000
REGISTRY = "http://127.0.0.1:5080"  # each agent's endpoint, inside its own namespace
WAIT = 20.0  # bound on every wait for a process to say something
MiB = 1024 * 1024


@dataclasses.dataclass
class Lan:
    """A bridge and node namespaces; ``ip[name]`` is the node's address on the LAN."""

    lab: NetnsLab
    tmp: Path
    nodes: dict[str, Namespace]
    ip: dict[str, str]
    children: list[Child] = dataclasses.field(default_factory=list)

    def start(self, node: str, name: str, argv: list[str]) -> Child:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        child = Child(argv, self.tmp / f"{name}.log", self.nodes[node], env=env, cwd=REPO_ROOT)
        self.children.append(child)
        return child

    def client(self, node: str, *args: str, timeout: float = 30.0) -> str:
        result = self.nodes[node].run([sys.executable, CLIENT, *args], timeout=timeout, check=False)
        assert result.returncode == 0, f"netns_client {args}: {result.stderr or result.stdout}"
        return result.stdout.strip()

    # -- the processes ---------------------------------------------------------------------------

    def start_origin(self, node: str) -> Child:
        registry = require_tool("docker-registry")
        root = self.tmp / "origin"
        (root / "storage").mkdir(parents=True)
        config = root / "origin.yml"
        q = json.dumps
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {q(str(root / 'storage'))}\n"
            f"http:\n  addr: {q(self.ip[node] + ':5000')}\n  secret: {q('discovery-test')}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        argv = [registry, "serve", str(config)]
        child = Child(argv, self.tmp / "origin.log", self.nodes[node], env)
        self.children.append(child)
        self.client(node, "wait-http", f"{self.origin_url(node)}/v2/", "15")
        return child

    def origin_url(self, node: str) -> str:
        return f"http://{self.ip[node]}:5000"

    def start_tracker(self, node: str, cluster: str) -> Child:
        return self.start(
            node,
            f"tracker-{node}",
            [
                *(sys.executable, "-m", "p2preg", "tracker"),
                f"--addr={self.ip[node]}:5081",
                f"--cluster-secret-file={self.secret_file}",
                "--discovery=mdns",
                f"--cluster-name={cluster}",
            ],
        )

    def start_agent(self, node: str, origin: str, *extra: str) -> Child:
        child = self.start(
            node,
            f"agent-{node}",
            [
                *(sys.executable, "-m", "p2preg", "agent"),
                "--registry-addr=127.0.0.1:5080",
                f"--peer-addr={self.ip[node]}:{PEER_PORT}",
                f"--cluster-secret-file={self.secret_file}",
                f"--upstream={self.origin_url(origin)}",
                f"--data-dir={self.tmp / ('data-' + node)}",
                "--piece-length=1MiB",
                "--log-level=info",
                *extra,
            ],
        )
        wait_for_log(child, r"registry endpoint listening on")
        return child

    @property
    def secret_file(self) -> Path:
        path = self.tmp / "cluster-secret"
        if not path.exists():
            path.write_bytes(SECRET)
        return path


@pytest.fixture
def make_lan(tmp_path: Path) -> Iterator[Callable[..., Lan]]:
    """``make_lan("origin", "a", "b")``: a bridge and one namespace per name, addresses .1, .2..."""
    require_netns()
    labs: list[Lan] = []

    def make(*names: str) -> Lan:
        lab = NetnsLab(prefix=f"p2pd-{os.getpid()}-")
        lan = Lan(lab, tmp_path, {}, {})
        labs.append(lan)
        bridge = lab.namespace("br")
        for index, name in enumerate(names, start=1):
            node = lab.namespace(name)
            lan.nodes[name], lan.ip[name] = node, f"{SUBNET}.{index}"
            lab.veth(node, "eth0", f"{SUBNET}.{index}/24", bridge, f"v{index}", None)
        lab.bridge(bridge, "br0", [f"v{index}" for index in range(1, len(names) + 1)])
        return lan

    try:
        yield make
    finally:
        for lan in labs:
            for child in reversed(lan.children):
                child.close()
            problems = lan.lab.close()
            assert not problems, problems


def wait_for_log(child: Child, pattern: str, seconds: float = WAIT) -> re.Match[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        match = re.search(pattern, child.log_tail(1_000_000))
        if match:
            return match
        if child.exited() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(
        f"{child.argv[4:7]} never logged {pattern!r} (exit {child.exited()}):\n{child.log_tail()}"
    )


def push_test_blob(lan: Lan, origin: str, size: int, seed: int) -> tuple[str, str]:
    """Random content (seeded) pushed to the origin as a blob of team/discovery; (digest, sha)."""
    data = hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)
    path = lan.tmp / f"blob-{seed}"
    path.write_bytes(data)
    digest = lan.client(origin, "push-blob", lan.origin_url(origin), "team/discovery", str(path))
    return digest, hashlib.sha256(data).hexdigest()


def pull(lan: Lan, node: str, digest: str) -> str:
    """Pull the blob through the agent in ``node``; its sha256 (hex)."""
    out = lan.client(node, "get-blob", f"{REGISTRY}/v2/team/discovery/blobs/{digest}")
    return out.split()[0]


def test_agents_find_an_advertised_tracker_and_swarm_through_it(make_lan) -> None:
    lan = make_lan("origin", "tracker", "a", "b")
    lan.start_origin("origin")
    digest, sha = push_test_blob(lan, "origin", 3 * MiB + 17, seed=1)
    tracker = lan.start_tracker("tracker", "team-one")
    wait_for_log(tracker, r"advertising .* over mDNS")
    url = f"http://{lan.ip['tracker']}:5081"
    mdns = ("--discovery=mdns", "--cluster-name=team-one")
    a = lan.start_agent("a", "origin", *mdns)
    b = lan.start_agent("b", "origin", *mdns)
    for agent in (a, b):
        wait_for_log(agent, rf"discovered tracker {re.escape(url)} ")

    assert pull(lan, "a", digest) == sha
    wait_for_log(a, rf"fetching {digest} from the origin for the swarm")  # lease from the tracker
    wait_for_log(a, rf"cached {digest}")
    assert pull(lan, "b", digest) == sha
    # The tracker told b where the pieces are: all of them came from a.
    wait_for_log(b, rf"cached {digest} \({3 * MiB + 17} bytes; 0 from the origin\)")

    # A tracker that leaves says goodbye (SIGINT stops it cleanly); the agents drop it.
    assert tracker.process is not None
    tracker.process.send_signal(signal.SIGINT)
    for agent in (a, b):
        wait_for_log(agent, rf"mDNS: tracker {re.escape(url)} went away")


def test_agents_without_a_tracker_share_a_blob(make_lan) -> None:
    lan = make_lan("origin", "a", "b")
    origin = lan.start_origin("origin")
    digest, sha = push_test_blob(lan, "origin", 2 * MiB + 5, seed=2)
    mdns = ("--discovery=mdns", "--cluster-name=team-two")
    a = lan.start_agent("a", "origin", *mdns)
    b = lan.start_agent("b", "origin", *mdns)
    wait_for_log(a, rf"discovered peer {lan.ip['b']}:{PEER_PORT} ")
    wait_for_log(b, rf"discovered peer {lan.ip['a']}:{PEER_PORT} ")

    assert pull(lan, "a", digest) == sha
    wait_for_log(a, rf"none of 1 discovered peers holds {digest}")
    origin.close()  # from now on only a has the blob
    assert pull(lan, "b", digest) == sha
    wait_for_log(b, rf"fetching {digest} from 1 discovered peer")
    wait_for_log(b, rf"cached {digest} \({2 * MiB + 5} bytes; 0 from the origin\)")


def test_an_embedded_tracker_is_advertised(make_lan) -> None:
    lan = make_lan("a", "b")
    mdns = ("--discovery=mdns", "--cluster-name=team-three")
    a = lan.start_agent("a", "a", *mdns, "--embedded-tracker", "--embedded-tracker-port=5081")
    b = lan.start_agent("b", "b", *mdns)
    wait_for_log(b, rf"discovered tracker http://{lan.ip['a']}:5081 ")
    wait_for_log(a, rf"discovered peer {lan.ip['b']}:{PEER_PORT} ")
    assert "discovered tracker" not in a.log_tail(1_000_000)  # its own is not "discovered"


def test_agents_of_another_cluster_are_ignored(make_lan) -> None:
    lan = make_lan("a", "b")
    a = lan.start_agent("a", "a", "--discovery=mdns", "--cluster-name=red")
    b = lan.start_agent("b", "b", "--discovery=mdns", "--cluster-name=blue")
    wait_for_log(a, r"advertising .* over mDNS")
    wait_for_log(b, r"advertising .* over mDNS")
    time.sleep(1.0)  # both have announced by now; neither may have taken the other
    for agent in (a, b):
        assert "discovered peer" not in agent.log_tail(1_000_000)


def test_discovery_off_sends_no_multicast(make_lan) -> None:
    lan = make_lan("agent", "watcher")
    watch = [sys.executable, CLIENT, "watch-mdns", lan.ip["watcher"]]
    # Off (the default): nothing reaches the LAN's mDNS group, from startup on.
    quiet = lan.start("watcher", "watch-off", [*watch, "5"])
    off = lan.start_agent("agent", "agent")
    assert quiet.process is not None
    quiet.process.wait(timeout=10)
    assert "packets 0" in quiet.log_tail(), quiet.log_tail()
    off.close()
    # The same agent with --discovery mdns: its announcements arrive.
    loud = lan.start("watcher", "watch-on", [*watch, "10"])
    lan.start_agent("agent", "agent", "--discovery=mdns")
    assert loud.process is not None
    loud.process.wait(timeout=15)
    assert f"packets 1 from {lan.ip['agent']}" in loud.log_tail(), loud.log_tail()
