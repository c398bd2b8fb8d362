"""Discovery's options (agent and tracker) and the tracker client's discovered trackers."""

from __future__ import annotations

import os

import pytest

from p2preg.config import AgentConfig, build_agent_config, build_tracker_config
from p2preg.digest import Digest
from p2preg.errors import ConfigError, TrackerUnavailable
from tracker.client import TrackerClient

SECRET = b"unit-test-cluster-secret-0123456789"
P2P = {"peer_addr": "192.168.1.10:7000", "cluster_secret_file": "/secret"}


def read(path: str) -> bytes:
    return SECRET


def test_discovery_is_off_by_default() -> None:
    assert AgentConfig().discovery == "off"
    config = build_agent_config(P2P, {}, {})
    assert (config.discovery, config.cluster_name) == ("off", "p2preg")


def test_agent_discovery_options_from_flags_environment_and_file() -> None:
    config = build_agent_config({**P2P, "discovery": "MDNS", "cluster_name": "site-a"}, {}, {})
    assert (config.discovery, config.cluster_name) == ("mdns", "site-a")
    env = {"P2PREG_DISCOVERY": "mdns", "P2PREG_CLUSTER_NAME": "site_b.1"}
    assert build_agent_config(P2P, env, {}).cluster_name == "site_b.1"
    config = build_agent_config(P2P, {}, {"discovery": "mdns", "cluster_name": "c"})
    assert config.discovery == "mdns"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({**P2P, "discovery": "dns-sd"}, "expected mdns or off"),
        ({**P2P, "cluster_name": "-x"}, "cluster-name"),
        ({**P2P, "cluster_name": "a b"}, "cluster-name"),
        ({**P2P, "cluster_name": "x" * 64}, "cluster-name"),
        ({"discovery": "mdns"}, "needs --peer-addr"),
        ({**P2P, "peer_addr": "0.0.0.0:7000", "discovery": "mdns"}, r"not 0\.0\.0\.0"),
        ({**P2P, "peer_addr": "127.0.0.1:7000", "discovery": "mdns"}, "loopback"),
        ({**P2P, "peer_addr": "node1:7000", "discovery": "mdns"}, "IPv4 address"),
        ({**P2P, "peer_addr": "[fe80::1]:7000", "discovery": "mdns"}, "IPv4 address"),
    ],
)
def test_agent_discovery_refuses_bad_values(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_agent_config(flags, {}, {})


def test_loopback_peer_address_is_fine_without_discovery() -> None:
    config = build_agent_config({**P2P, "peer_addr": "127.0.0.1:7000"}, {}, {})
    assert config.peer_host == "127.0.0.1"


def test_tracker_discovery_options() -> None:
    base = {"addr": "10.0.0.5:5081", "cluster_secret_file": "/secret"}
    config = build_tracker_config(base, {}, read)
    assert (config.discovery, config.cluster_name) == ("off", "p2preg")
    env = {"P2PREG_DISCOVERY": "mdns", "P2PREG_CLUSTER_NAME": "lab"}
    config = build_tracker_config(base, env, read)
    assert (config.discovery, config.cluster_name) == ("mdns", "lab")
    with pytest.raises(ConfigError, match=r"not 0\.0\.0\.0"):
        build_tracker_config({**base, "addr": "0.0.0.0:5081", "discovery": "mdns"}, {}, read)
    with pytest.raises(ConfigError, match="loopback"):
        build_tracker_config({**base, "addr": "127.0.0.1:5081", "discovery": "mdns"}, {}, read)


async def test_discovered_trackers_come_after_the_explicit_ones() -> None:
    async with TrackerClient(["http://t1:5081"], os.urandom(16), SECRET, discovery=True) as client:
        client.set_discovered(["http://d1:5081/", "http://t1:5081", "http://d2:5081", "bad"])
        assert client.urls == ["http://t1:5081", "http://d1:5081", "http://d2:5081"]
        for n in range(50):
            order = client.trackers_for(f"sha256:{n:064x}")
            assert order[0] == "http://t1:5081"  # an explicit tracker is never replaced
            assert sorted(order[1:]) == ["http://d1:5081", "http://d2:5081"]
        client.set_discovered(["http://d2:5081"])
        assert client.urls == ["http://t1:5081", "http://d2:5081"]
        client.set_discovered([])
        assert client.urls == ["http://t1:5081"]


async def test_tracker_client_without_any_tracker_yet() -> None:
    with pytest.raises(ConfigError):
        TrackerClient([], os.urandom(16), SECRET)
    digest = Digest.parse("sha256:" + "0" * 64)
    async with TrackerClient([], os.urandom(16), SECRET, discovery=True) as client:
        with pytest.raises(TrackerUnavailable, match="no tracker known"):
            await client.get_metainfo(digest)
        client.set_discovered(["http://d1:5081"])
        assert client.trackers_for(digest) == ["http://d1:5081"]
