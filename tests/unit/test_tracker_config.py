"""`p2preg tracker` configuration: flags over P2PREG_<NAME>, validation, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2preg.config import TrackerConfig, build_tracker_config
from p2preg.errors import ConfigError

SECRET = b"0123456789abcdef0123456789abcdef"


def read(path: str) -> bytes:
    assert path == "/etc/p2preg/secret"
    return SECRET + b"\n"


BASE = {"addr": "0.0.0.0:5081", "cluster_secret_file": "/etc/p2preg/secret"}


def test_defaults_and_required_values() -> None:
    config = build_tracker_config(BASE, {}, read)
    assert config == TrackerConfig(cluster_secret=SECRET, host="0.0.0.0", port=5081)
    assert (config.peer_ttl, config.lease_ttl, config.max_peers) == (30.0, 10.0, 50)
    assert config.announce_interval == 10.0
    assert config.announce_budget == 500
    assert config.seeder_interval(100) == 10.0 and config.seeder_interval(12_500) == 100.0
    assert SECRET.decode() not in repr(config)


def test_flags_beat_environment() -> None:
    env = {
        "P2PREG_ADDR": "127.0.0.1:6000",
        "P2PREG_CLUSTER_SECRET_FILE": "/etc/p2preg/secret",
        "P2PREG_PEER_TTL": "1m",
        "P2PREG_LEASE_TTL": "5s",
        "P2PREG_MAX_PEERS": "20",
        "P2PREG_ANNOUNCE_BUDGET": "100",
    }
    config = build_tracker_config({"lease_ttl": "7s", "addr": None}, env, read)
    assert (config.host, config.port) == ("127.0.0.1", 6000)
    assert (config.peer_ttl, config.lease_ttl, config.max_peers) == (60.0, 7.0, 20)
    assert config.announce_budget == 100
    flagged = build_tracker_config({**BASE, "announce_budget": "2000"}, env, read)
    assert flagged.announce_budget == 2000


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"cluster_secret_file": "/etc/p2preg/secret"}, "--addr is required"),
        ({"addr": "0.0.0.0:1"}, "--cluster-secret-file is required"),
        ({**BASE, "addr": "nowhere"}, "HOST:PORT"),
        ({**BASE, "peer_ttl": "0s"}, "larger than zero"),
        ({**BASE, "lease_ttl": "soon"}, "cannot parse"),
        ({**BASE, "max_peers": "0"}, "whole number"),
        ({**BASE, "max_peers": "many"}, "whole number"),
        ({**BASE, "log_level": "loud"}, "log-level"),
        ({**BASE, "announce_budget": "0"}, "whole number"),
        ({**BASE, "announce_budget": "fast"}, "whole number"),
    ],
)
def test_bad_values(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_tracker_config(flags, {}, read)


def test_short_secret_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        build_tracker_config(BASE, {}, lambda path: b"tiny\n")


@pytest.mark.parametrize(
    "args",
    [
        ["tracker", "--addr", "0.0.0.0:5081"],
        ["tracker", "--addr", "0.0.0.0:5081", "--cluster-secret-file", "/nope/secret"],
        ["tracker", "--addr", "x", "--cluster-secret-file", "/nope/secret"],
        ["tracker", "--peer-ttl"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2preg", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "p2preg",
                "tracker",
                "--addr",
                f"127.0.0.1:{port}",
                "--cluster-secret-file",
                str(secret),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "P2PREG_LOG_LEVEL": "error"},
        )
    assert result.returncode == 2
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr
