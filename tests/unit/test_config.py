"""Configuration precedence (flag > environment > file > default) and validation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p2preg.config import AgentConfig, Upstream, build_agent_config, parse_config_file
from p2preg.errors import ConfigError


def test_defaults() -> None:
    config = build_agent_config({}, {}, {})
    assert config == AgentConfig()
    assert config.default_upstream == Upstream("https://registry-1.docker.io")


def test_precedence_flag_env_file() -> None:
    file_values = parse_config_file(
        'registry_addr = "127.0.0.1:7000"\ncache_size = "1GiB"\ntag_ttl = "9s"\n', "f.toml"
    )
    env = {"P2PREG_CACHE_SIZE": "2GiB", "P2PREG_TAG_TTL": "8s"}
    flags = {"tag_ttl": "7s"}
    config = build_agent_config(flags, env, file_values)
    assert (config.registry_host, config.registry_port) == ("127.0.0.1", 7000)  # file
    assert config.cache_size == 2 * 1024**3  # environment beats file
    assert config.tag_ttl == 7.0  # flag beats environment


def test_upstreams_repeatable_and_comma_separated() -> None:
    env = {"P2PREG_UPSTREAM": "http://127.0.0.1:5000, docker.io=https://mirror.example"}
    config = build_agent_config({}, env, {})
    assert config.default_upstream == Upstream("http://127.0.0.1:5000")
    assert config.namespace_upstreams == {"docker.io": Upstream("https://mirror.example")}
    flags = {"upstream": ["ghcr.io=https://ghcr.io/"]}
    config = build_agent_config(flags, env, {})
    assert config.default_upstream is None
    assert config.namespace_upstreams == {"ghcr.io": Upstream("https://ghcr.io")}


def test_credentials_from_file() -> None:
    values = parse_config_file(
        '[credentials."ghcr.io"]\nusername = "u"\npassword = "p"\n', "f.toml"
    )
    config = build_agent_config({}, {}, values)
    assert config.credentials["ghcr.io"].username == "u"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"upstream": ["ftp://x"]}, r"http\(s\) URL"),
        ({"upstream": ["http://a", "http://b"]}, "more than one default"),
        ({"upstream": ["bad ns=http://a"]}, "invalid registry namespace"),
        ({"upstream": ["http://a/v2/"]}, "must not have a path"),
        ({"registry_addr": "localhost"}, "HOST:PORT"),
        ({"registry_addr": "localhost:\u00b2"}, "HOST:PORT"),  # isdigit(), but not a number
        ({"registry_addr": "localhost:" + "5" * 5000}, "HOST:PORT"),
        ({"cache_size": "0"}, "larger than zero"),
        ({"log_level": "loud"}, "log-level"),
    ],
)
def test_bad_values(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_agent_config(flags, {}, {})


def test_bad_file() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config_file("colour = 'blue'\n", "f.toml")
    with pytest.raises(ConfigError, match=r"f\.toml"):
        parse_config_file("registry_addr = \n", "f.toml")


@pytest.mark.parametrize(
    "args",
    [
        ["agent", "--cache-size", "lots"],
        ["agent", "--no-such-flag"],
        ["agent", "--config", "/nope"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2preg", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_port_in_use_is_one_line(tmp_path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "p2preg",
                "agent",
                "--registry-addr",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(tmp_path),
                "--log-level",
                "error",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr
