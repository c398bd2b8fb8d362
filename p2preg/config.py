"""Configuration: frozen objects built from flags, environment and (for the agent) a TOML file.

Precedence is flag, then environment (``P2PREG_<NAME>``; repeatable options comma-separated),
then the config file, then the built-in default. This module is pure: the caller passes the
parsed flags, the environment mapping and the file's text in, so it can be tested without IO.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from p2preg.announce_pacing import seeder_interval
from p2preg.cluster_auth import parse_cluster_secret
from p2preg.errors import ConfigError
from p2preg.metainfo import MAX_PIECE_LENGTH, MIN_PIECE_LENGTH
from p2preg.reference import DOCKER_HUB_NAMESPACE
from p2preg.units import parse_decimal, parse_duration, parse_size

DEFAULT_REGISTRY_ADDR = "127.0.0.1:5080"
DOCKER_HUB_URL = "https://registry-1.docker.io"
ENV_PREFIX = "P2PREG_"
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:\d{1,5})?")


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class Upstream:
    """An origin registry. ``url`` has no trailing slash, e.g. ``https://registry-1.docker.io``."""

    url: str

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


@dataclass(frozen=True, slots=True)
class AgentConfig:
    registry_host: str = "127.0.0.1"
    registry_port: int = 5080
    default_upstream: Upstream | None = Upstream(DOCKER_HUB_URL)
    # containerd's ``ns`` query parameter (a registry host name) -> origin.
    namespace_upstreams: Mapping[str, Upstream] = field(
        default_factory=lambda: {DOCKER_HUB_NAMESPACE: Upstream(DOCKER_HUB_URL)}
    )
    mirror_all: bool = False
    data_dir: str = "p2preg-data"
    cache_size: int = 10 * 1024**3
    # Registry host (``host[:port]`` of an upstream URL) -> credentials.
    credentials: Mapping[str, Credentials] = field(default_factory=dict)
    docker_config: str | None = None
    tag_ttl: float = 5.0
    connect_timeout: float = 10.0
    # A download that makes no progress for this long is retried (then failed).
    idle_timeout: float = 30.0
    # Total time a manifest request or a blob's first byte may take, retries included.
    request_timeout: float = 60.0
    log_level: str = "info"
    # -- peer to peer (off until a peer address is given) --------------------------------------
    peer_host: str | None = None
    peer_port: int = 0
    # host:port other agents dial; defaults to the peer address (must not be 0.0.0.0 then).
    peer_advertise_addr: str | None = None
    trackers: tuple[str, ...] = ()
    cluster_secret_file: str | None = None
    zone: str = ""
    upload_limit: int | None = None  # bytes per second; None = unlimited
    download_limit: int | None = None
    piece_length: int | None = None  # None: by the blob's size (metainfo.piece_length_for)
    # A swarm download that gains nothing for this long takes (or waits for) the origin lease.
    swarm_stall_timeout: float = 3.0
    piece_timeout: float = 10.0
    # Run a tracker inside the agent (one process per node is enough for small sites).
    embedded_tracker: bool = False
    embedded_tracker_port: int = 0
    # "mdns": advertise and find trackers and peers of ``cluster_name`` on the LAN (multicast,
    # on the peer address's interface only; docs/discovery.md). "off": no multicast at all.
    discovery: str = "off"
    cluster_name: str = "p2preg"

    @property
    def p2p_enabled(self) -> bool:
        return self.peer_host is not None


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    port = parse_decimal(port_text)
    if not sep or not host or port is None or not 0 <= port <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), port


def parse_upstream_url(text: str, what: str = "upstream") -> Upstream:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{what}: expected an http(s) URL such as https://ghcr.io, got {text!r}")
    if parts.path not in ("", "/"):
        raise ConfigError(f"{what}: the URL must not have a path (got {parts.path!r} in {text!r})")
    return Upstream(f"{parts.scheme}://{parts.netloc}")


def parse_upstreams(values: list[str]) -> tuple[Upstream | None, dict[str, Upstream]]:
    """``["https://a", "docker.io=https://b"]`` -> (default, {namespace: upstream})."""
    default: Upstream | None = None
    by_namespace: dict[str, Upstream] = {}
    for value in values:
        namespace, sep, url = value.partition("=")
        if sep:
            namespace = namespace.strip().lower()
            if not _NAMESPACE_RE.fullmatch(namespace):
                raise ConfigError(f"upstream: invalid registry namespace {namespace!r}")
            by_namespace[namespace] = parse_upstream_url(url, f"upstream {namespace}")
        else:
            if default is not None:
                raise ConfigError("upstream: more than one default upstream (URL without NS=)")
            default = parse_upstream_url(value)
    return default, by_namespace


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{what}: expected true or false, got {value!r}")


def _as_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigError(f"{what}: expected a list of strings, got {value!r}")


def _as_port(value: Any, what: str) -> int:
    port = parse_decimal(str(value))
    if port is None or not 0 <= port <= 65535:
        raise ConfigError(f"{what}: expected a port number, got {value!r}")
    return port


def _as_str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what}: expected a non-empty string, got {value!r}")
    return value


DISCOVERY_MODES = ("mdns", "off")
_CLUSTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _as_discovery(value: Any, what: str) -> str:
    if not isinstance(value, str) or value.lower() not in DISCOVERY_MODES:
        raise ConfigError(f"{what}: expected mdns or off, got {value!r}")
    return value.lower()


def _as_cluster_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _CLUSTER_NAME_RE.fullmatch(value):
        raise ConfigError(
            f"{what}: expected 1-63 letters, digits, '.', '_' or '-' starting with a letter "
            f"or digit, got {value!r}"
        )
    return value


def check_discovery_address(host: str, flag: str) -> None:
    """mDNS binds to the interface of ``host`` only: it must be that interface's IPv4 address.

    Loopback is refused: multicast on ``lo`` reaches no other machine, and agents on one machine
    can simply name their tracker with ``--tracker``.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or address.version != 4 or address.is_multicast:
        raise ConfigError(
            f"--discovery mdns needs {flag} to be the IPv4 address of a LAN interface "
            f"(mDNS binds to that interface only), got {host!r}"
        )
    if address.is_unspecified:
        raise ConfigError(
            f"--discovery mdns needs {flag} with the address of one interface, not {host}: "
            "mDNS binds to that interface only"
        )
    if address.is_loopback:
        raise ConfigError(
            f"--discovery mdns cannot use the loopback address {host} ({flag}): no other "
            "machine can reach it; use the LAN interface's address (or --tracker on one machine)"
        )


# Option name (flag ``--registry-addr`` / env ``P2PREG_REGISTRY_ADDR`` / file key
# ``registry_addr``) -> converter. Repeatable options are lists.
_OPTIONS: dict[str, Callable[[Any, str], Any]] = {
    "registry_addr": _as_str,
    "upstream": _as_list,
    "mirror_all": _as_bool,
    "data_dir": _as_str,
    "cache_size": lambda v, w: parse_size(v, w),
    "docker_config": _as_str,
    "tag_ttl": lambda v, w: parse_duration(v, w),
    "connect_timeout": lambda v, w: parse_duration(v, w),
    "idle_timeout": lambda v, w: parse_duration(v, w),
    "request_timeout": lambda v, w: parse_duration(v, w),
    "log_level": _as_str,
    "peer_addr": _as_str,
    "peer_advertise_addr": _as_str,
    "tracker": _as_list,
    "cluster_secret_file": _as_str,
    "zone": _as_str,
    "upload_limit": lambda v, w: parse_size(v, w),
    "download_limit": lambda v, w: parse_size(v, w),
    "piece_length": lambda v, w: parse_size(v, w),
    "swarm_stall_timeout": lambda v, w: parse_duration(v, w),
    "piece_timeout": lambda v, w: parse_duration(v, w),
    "embedded_tracker": _as_bool,
    "embedded_tracker_port": lambda v, w: _as_port(v, w),
    "discovery": _as_discovery,
    "cluster_name": _as_cluster_name,
}
_FILE_ONLY_KEYS = {"credentials"}
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_config_file(text: str, path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    unknown = set(data) - set(_OPTIONS) - _FILE_ONLY_KEYS
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(sorted(unknown))}")
    return data


def parse_credentials(value: Any) -> dict[str, Credentials]:
    """``[credentials."ghcr.io"] username = "u" password = "p"`` in the config file."""
    if not isinstance(value, dict):
        raise ConfigError("credentials: expected a table of registry host -> {username, password}")
    result: dict[str, Credentials] = {}
    for host, entry in value.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("username"), str)
            or not isinstance(entry.get("password"), str)
        ):
            raise ConfigError(f"credentials.{host}: expected username and password strings")
        result[host.lower()] = Credentials(entry["username"], entry["password"])
    return result


def build_agent_config(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    file_values: Mapping[str, Any],
) -> AgentConfig:
    """Merge the three sources, validate every value, and freeze the result."""
    chosen: dict[str, Any] = {}
    for name, convert in _OPTIONS.items():
        env_name = ENV_PREFIX + name.upper()
        flag_value = flags.get(name)
        if flag_value is not None and flag_value != []:
            chosen[name] = convert(flag_value, f"--{name.replace('_', '-')}")
        elif env_name in env:
            chosen[name] = convert(env[env_name], env_name)
        elif name in file_values:
            chosen[name] = convert(file_values[name], f"config key {name}")

    kwargs: dict[str, Any] = {}
    if "registry_addr" in chosen:
        kwargs["registry_host"], kwargs["registry_port"] = parse_host_port(
            chosen.pop("registry_addr"), "registry-addr"
        )
    if "upstream" in chosen:
        default, by_namespace = parse_upstreams(chosen.pop("upstream"))
        kwargs["default_upstream"] = default
        kwargs["namespace_upstreams"] = by_namespace
    if "log_level" in chosen and chosen["log_level"].lower() not in LOG_LEVELS:
        raise ConfigError(f"log-level: expected one of {', '.join(LOG_LEVELS)}")
    if "credentials" in file_values:
        kwargs["credentials"] = parse_credentials(file_values["credentials"])
    if "data_dir" in chosen:
        chosen["data_dir"] = os.path.abspath(os.path.expanduser(chosen["data_dir"]))
    if "peer_addr" in chosen:
        kwargs["peer_host"], kwargs["peer_port"] = parse_host_port(
            chosen.pop("peer_addr"), "peer-addr"
        )
    if "peer_advertise_addr" in chosen:
        host, port = parse_host_port(chosen["peer_advertise_addr"], "peer-advertise-addr")
        if port == 0 or host in ("0.0.0.0", "::"):
            raise ConfigError("peer-advertise-addr must be an address other agents can dial")
    if "tracker" in chosen:
        kwargs["trackers"] = tuple(
            parse_upstream_url(url, "tracker").url for url in chosen.pop("tracker")
        )
    for name in ("upload_limit", "download_limit"):
        if name in chosen and chosen[name] <= 0:
            raise ConfigError(f"{name.replace('_', '-')} must be larger than zero")
    if "piece_length" in chosen:
        length = chosen["piece_length"]
        if not MIN_PIECE_LENGTH <= length <= MAX_PIECE_LENGTH or length & (length - 1):
            raise ConfigError("piece-length must be a power of two between 64KiB and 64MiB")
    kwargs.update(chosen)
    if kwargs.get("cache_size", 1) <= 0:
        raise ConfigError("cache-size must be larger than zero")
    if (kwargs.get("trackers") or kwargs.get("peer_host")) and not kwargs.get(
        "cluster_secret_file"
    ):
        raise ConfigError("peer-to-peer needs --cluster-secret-file (a secret all agents share)")
    if (kwargs.get("trackers") or kwargs.get("embedded_tracker")) and not kwargs.get("peer_host"):
        raise ConfigError("--tracker and --embedded-tracker need --peer-addr")
    if kwargs.get("discovery") == "mdns":
        if not kwargs.get("peer_host"):
            raise ConfigError("--discovery mdns needs --peer-addr (the LAN address to serve on)")
        check_discovery_address(kwargs["peer_host"], "--peer-addr")
    return AgentConfig(**kwargs)


# -- tracker ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    """The tracker's settings. ``cluster_secret`` is the shared HMAC key (never printed)."""

    cluster_secret: bytes = field(repr=False)
    host: str = "0.0.0.0"
    port: int = 5081
    # A peer that has not announced for this long is no longer handed out.
    peer_ttl: float = 30.0
    # How long an origin-fetch lease lasts without renewal.
    lease_ttl: float = 10.0
    # Peers handed out per announce.
    max_peers: int = 50
    # Announces a second the tracker paces its downloaders to (p2preg/announce_pacing.py).
    announce_budget: int = 500
    # Disjoint piece ranges of one blob that may be fetched from the origin at once.
    max_origin_fetchers: int = 2
    max_peers_per_digest: int = 10_000
    max_digests: int = 100_000
    # Handout load decays with this half-life (the policy's "recent window").
    load_half_life: float = 10.0
    # A publisher reported for bad data may not publish or lease that blob for this long.
    bad_publisher_quarantine: float = 60.0
    session_ttl: float = 600.0
    max_body: int = 4 * 1024 * 1024
    log_level: str = "info"
    # "mdns": advertise this tracker on the LAN for agents of ``cluster_name`` (docs/discovery.md).
    discovery: str = "off"
    cluster_name: str = "p2preg"

    @property
    def announce_interval(self) -> float:
        """What the tracker tells peers: announce again well before the TTL runs out."""
        return max(1.0, self.peer_ttl / 3)

    def seeder_interval(self, complete: int) -> float:
        """What the tracker tells a seeder: announce this blob again in this many seconds
        (``interval``), so that the ``complete`` records it tracks stay within their share of
        ``announce_budget``."""
        return seeder_interval(complete, self.announce_budget, self.announce_interval)


def _as_int(low: int, high: int) -> Callable[[Any, str], int]:
    def convert(value: Any, what: str) -> int:
        if isinstance(value, str) and (number := parse_decimal(value.strip())) is not None:
            value = number
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{what}: expected a whole number {low}..{high}, got {value!r}")
        return value

    return convert


def _positive_duration(value: Any, what: str) -> float:
    seconds = parse_duration(value, what)
    if seconds <= 0:
        raise ConfigError(f"{what} must be larger than zero")
    return seconds


# Tracker options: flag ``--peer-ttl`` / env ``P2PREG_PEER_TTL``.
_TRACKER_OPTIONS: dict[str, Callable[[Any, str], Any]] = {
    "addr": _as_str,
    "cluster_secret_file": _as_str,
    "peer_ttl": _positive_duration,
    "lease_ttl": _positive_duration,
    "max_peers": _as_int(1, 1000),
    "announce_budget": _as_int(1, 1_000_000),
    "log_level": _as_str,
    "discovery": _as_discovery,
    "cluster_name": _as_cluster_name,
}


def build_tracker_config(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    read_file: Callable[[str], bytes],
) -> TrackerConfig:
    """Flags over ``P2PREG_<NAME>`` environment variables; ``--addr`` and
    ``--cluster-secret-file`` are required. ``read_file(path)`` returns the secret file's bytes
    (or raises ConfigError); the CLI passes a real reader, tests a fake."""
    chosen: dict[str, Any] = {}
    for name, convert in _TRACKER_OPTIONS.items():
        env_name = ENV_PREFIX + name.upper()
        flag_value = flags.get(name)
        if flag_value is not None:
            chosen[name] = convert(flag_value, f"--{name.replace('_', '-')}")
        elif env_name in env:
            chosen[name] = convert(env[env_name], env_name)
    for required in ("addr", "cluster_secret_file"):
        if required not in chosen:
            flag = "--" + required.replace("_", "-")
            raise ConfigError(f"{flag} is required (or {ENV_PREFIX}{required.upper()})")
    host, port = parse_host_port(chosen.pop("addr"), "addr")
    if chosen.get("discovery") == "mdns":
        check_discovery_address(host, "--addr")
    path = chosen.pop("cluster_secret_file")
    secret = parse_cluster_secret(read_file(path), f"cluster secret file {path}")
    if "log_level" in chosen and chosen["log_level"].lower() not in LOG_LEVELS:
        raise ConfigError(f"log-level: expected one of {', '.join(LOG_LEVELS)}")
    return TrackerConfig(cluster_secret=secret, host=host, port=port, **chosen)
