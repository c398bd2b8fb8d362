"""BitTorrent baseline: the same blob, the same links, distributed by aria2c and opentracker.

    python -m simulations.bittorrent [--nodes 8] [--blob-size 200MiB] [--node-bandwidth 20MiB]
        [--origin-bandwidth SAME] [--piece-length 256KiB] [--shaping netns|limits]
        [--deadline SECONDS] [--json FILE] [--keep-work DIR]

The rollout emulator (and this module's CLI) compares p2preg with a plain BitTorrent swarm: an
aria2c seeding the blob from the origin's node, opentracker as the tracker, and one aria2c on
every node downloading. The API is one call:

    from simulations.bittorrent import BtHost, run_bittorrent

    result = run_bittorrent(
        work, blob_path,
        seeder=BtHost("origin", origin_ns, "10.204.0.1"),
        tracker=BtHost("tracker", tracker_ns, "10.204.0.2"),
        leechers=[BtHost(f"n{i}", ns, ip) for i, (ns, ip) in enumerate(nodes, 1)],
        piece_length=256 * 1024, deadline_s=300.0,
        per_node_rate=None, origin_rate=None,      # with netns: the links are the caps
        progress=print,
    )
    result.completion_s          # {"n1": 9.81, "n2": 10.02, ...}; None = not within deadline_s
    result.seeder_upload_bytes   # piece bytes the origin's aria2c uploaded
    result.peer_upload_bytes     # piece bytes the leechers uploaded to each other

``BtHost(name, netns, ip)``: ``netns`` is a ``simulations.netns.Namespace`` (or None for this
host's loopback) and ``ip`` the address the host binds and is reached at (10.204.0.x inside
namespaces, 127.0.0.1 without). In namespaces every host must reach the tracker's and every other
host's ``ip`` (one bridge, as ``build_netns_swarm`` makes); several hosts may share a namespace.
Ports: in a namespace the tracker listens on TRACKER_PORT (6969, TCP only), host k (seeder k = 0,
leecher k = 1..N) on BT_PORT_BASE + k for BitTorrent and on 127.0.0.1:RPC_PORT_BASE + k for
aria2's JSON-RPC; on loopback every port is a free one picked at run time.

What one call does, each step bounded in time:

1. Writes the .torrent with the small bencoder below (single file, ``piece_length``, announce
   ``http://TRACKER_IP:PORT/announce``, no private flag). Its info dict is byte-identical to
   mktorrent's for the same file and piece length (the test checks); doing it here gives the info
   hash without a bencode parser and allows any piece length, not only powers of two.
2. Starts opentracker on the tracker's ip (``-i IP -p PORT``, no UDP) with a whitelist holding
   the info hash: Debian builds it with WANT_ACCESSLIST_WHITE (it tracks only listed hashes) and
   IPv4 only; it chroots into its directory (``-d``) and drops to user nobody. Ready once an
   ``event=stopped`` announce for the hash is answered without a failure (whitelist loaded).
3. Copies the blob into the seeder's directory and starts its aria2c with --check-integrity:
   aria2 hashes every piece against the torrent, then seeds. Ready when aria2's RPC reports the
   whole file and the tracker's scrape counts a seed. This is setup, not rollout time.
4. Starts every leecher's aria2c paused (``--pause``, with a fixed GID), waits until every RPC
   answers, then unpauses them all back to back over already open connections (within a
   millisecond or so): that instant is t = 0.
5. A leecher's completion time is when aria2 ran its --on-bt-download-complete hook (a shell
   script writing ``date +%s.%N``): every piece has arrived and passed its SHA-1 check; the hook
   runs before seeding starts. Leechers keep seeding (--seed-ratio=0.0, no --seed-time) until all
   are complete or deadline_s has passed, since BitTorrent nodes help each other to the end.
6. Reads every aria2c's counters over RPC (``aria2.tellStatus``: ``uploadLength`` is the piece
   payload it sent to peers for this download, protocol overhead not counted), stops everything,
   then checks the sha256 of every completed leecher's file against the blob's (outside the
   timed window, so the hashing steals no CPU from the swarm). A mismatch raises
   BitTorrentError.

aria2c flags, and why (see docs/baselines.md for the fairness discussion):

- ``--enable-dht=false --enable-dht6=false --bt-enable-lpd=false``: no DHT and no Local Peer
  Discovery multicast; the tracker is the only source of peers. PEX stays on (aria2's default,
  as in any real swarm): peers only learn addresses the tracker handed out inside this swarm.
- ``--interface=IP --bt-external-ip=IP --disable-ipv6=true --listen-port=PORT``: bind and
  announce only the given address; IPv4 only, as Debian's opentracker is.
- ``--enable-rpc --rpc-listen-all=false --rpc-secret=S``: RPC on 127.0.0.1 of the node's
  namespace only, with a per-run secret. We reach it from this process with a socket created in
  that namespace (setns(2) in a short-lived thread; the socket stays in the namespace).
- ``--bt-tracker-interval=1``: announce every second, as p2preg's agents do while downloading,
  so late peer discovery is not a handicap of the baseline.
- ``--file-allocation=none``: no 200 MiB zero-filling at t = 0 (aria2's default prealloc).
- ``--seed-ratio=0.0``: seed until stopped. Seeder: ``--check-integrity=true
  --bt-hash-check-seed=true --bt-seed-unverified=false`` (verified before it serves).
- ``--stop-with-process=OUR_PID --stop=SECONDS``: an aria2c outlives neither this process nor the
  run's time budget, even if we are killed with SIGKILL; opentracker runs under ``timeout``.
- ``--max-overall-upload-limit / --max-overall-download-limit``: only when per_node_rate /
  origin_rate are given (loopback runs); with namespaces the tbf on each link is the cap.
- Everything else is aria2's default: rarest-first piece selection, 16 KiB block requests,
  endgame, choking rounds every 10 s with 3 regular + 1 optimistic unchoke slots, at most 55 peers
  per torrent (--bt-max-peers), plain (unencrypted) payload.

Safety: servers listen on 127.0.0.1 or on the addresses the caller gives inside namespaces it
created; every process is started in its own session and its process group is killed on return,
exception, KeyboardInterrupt and (under ``termination_raises``) SIGTERM/SIGHUP. The CLI's
namespaces (``p2pbt-<pid>-*``) are deleted on every exit path. Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import http.client
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simulations.netns import (
    Child,
    Namespace,
    NetnsLab,
    Tbf,
    Terminated,
    deferred_signals,
    netns_unavailable_reason,
    termination_raises,
)

__all__ = [
    "BitTorrentError",
    "BtHost",
    "BtResult",
    "bencode",
    "build_netns_swarm",
    "make_torrent",
    "run_bittorrent",
    "tool_versions",
]

MiB = 1024**2

# Ports inside namespaces (on loopback every port is a free one picked at run time).
TRACKER_PORT = 6969
BT_PORT_BASE = 20000  # host k listens for peers on BT_PORT_BASE + k (seeder k = 0)
RPC_PORT_BASE = 30000  # and serves its JSON-RPC on 127.0.0.1:RPC_PORT_BASE + k

ANNOUNCE_INTERVAL = 1  # seconds; p2preg's agents announce every second while downloading
READY_TIMEOUT = 20.0  # opentracker up, an aria2c's RPC up
HASH_CHECK_RATE = 50 * MiB  # slowest seeder hash check we wait for (plus READY_TIMEOUT)
RPC_TIMEOUT = 5.0  # one JSON-RPC call
POLL_INTERVAL = 0.02  # hook files
STATUS_INTERVAL = 1.0  # RPC progress polls during the rollout
PROGRESS_EVERY = 5.0  # seconds between progress lines
HOOK_GRACE = 2.0  # RPC says complete but no hook file yet: fall back to the RPC time after this
LIFETIME_SLACK = 120.0  # --stop / timeout bound beyond setup + deadline_s

_CLONE_NEWNET = 0x40000000
_SCRAPE_COMPLETE_RE = re.compile(rb"8:completei(\d+)e")
_STATUS_KEYS = ["status", "completedLength", "totalLength", "uploadLength"]


class BitTorrentError(RuntimeError):
    """The baseline could not run or gave a wrong result; the message says what and where."""


@dataclass(frozen=True)
class BtHost:
    name: str  # "origin", "tracker", "n1", ...
    netns: Namespace | None  # None = this host's loopback
    ip: str  # bind and announce address: 10.204.0.x in namespaces, 127.0.0.1 otherwise


@dataclass
class BtResult:
    # leecher name -> seconds from t = 0 until aria2 had every piece (SHA-1 checked); None = not
    # within deadline_s. Every completed file's sha256 was checked against the blob afterwards.
    completion_s: dict[str, float | None]
    seeder_upload_bytes: int  # aria2's uploadLength of the seeder: piece payload it sent
    peer_upload_bytes: int  # sum of the leechers' uploadLength: piece payload among leechers
    clients: dict[str, str]  # tool -> version
    notes: list[str]
    upload_bytes: dict[str, int] = field(default_factory=dict)  # every host's uploadLength
    download_bytes: dict[str, int] = field(default_factory=dict)  # leecher's verified bytes
    setup_s: float = 0.0  # tracker up + seeder verified and registered (not rollout time)
    cpu_s: dict[str, float] = field(default_factory=dict)  # every aria2c's user+system CPU
    t0_monotonic: float = 0.0  # time.monotonic() at t = 0, to align the caller's own samples


# --- torrent -------------------------------------------------------------------------------------


def bencode(value: int | bytes | str | list[Any] | dict[str, Any]) -> bytes:
    """BitTorrent's encoding (BEP 3): dict keys sorted as raw bytes, strings length-prefixed."""
    if isinstance(value, bool):
        raise TypeError("bencode has no booleans")
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(item) for item in value) + b"e"
    if isinstance(value, dict):
        items = sorted((key.encode(), item) for key, item in value.items())
        return b"d" + b"".join(bencode(key) + bencode(item) for key, item in items) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")


def make_torrent(
    blob_path: Path, piece_length: int, announce: str, name: str | None = None
) -> tuple[bytes, bytes]:
    """A single-file torrent of ``blob_path``: (the .torrent's bytes, the 20-byte info hash)."""
    if piece_length < 16 * 1024:
        raise BitTorrentError(f"piece length {piece_length} is below BitTorrent's 16 KiB block")
    pieces = bytearray()
    length = 0
    with blob_path.open("rb") as source:
        while chunk := source.read(piece_length):
            pieces += hashlib.sha1(chunk).digest()
            length += len(chunk)
    if length == 0:
        raise BitTorrentError(f"{blob_path} is empty")
    info = {
        "length": length,
        "name": name or blob_path.name,
        "piece length": piece_length,
        "pieces": bytes(pieces),
    }
    info_bytes = bencode(info)
    torrent = b"d8:announce" + bencode(announce) + b"4:info" + info_bytes + b"e"
    return torrent, hashlib.sha1(info_bytes).digest()


# --- reaching RPC and tracker inside a namespace -------------------------------------------------


def _socket_in(netns: Namespace | None) -> socket.socket:
    """A TCP socket created in ``netns`` (connect it from any thread; it stays in the namespace).

    A network namespace is per thread in Linux: a short-lived thread enters the namespace with
    setns(2), creates the socket and ends, so no other thread of this process ever changes
    namespace. Cheaper than a ``ip netns exec curl`` per request, and lets the unpause of all
    leechers go out back to back.
    """
    if netns is None:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    box: list[socket.socket | BaseException] = []

    def enter_and_create() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns.name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {netns.name}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            box.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=enter_and_create, name=f"setns-{netns.name}", daemon=True)
    thread.start()
    thread.join(RPC_TIMEOUT)
    if not box:
        raise BitTorrentError(f"could not create a socket in namespace {netns.name}")
    made = box[0]
    if isinstance(made, BaseException):
        raise made
    return made


class _NsHTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` whose socket lives in a given network namespace."""

    def __init__(self, netns: Namespace | None, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        sock = _socket_in(self._netns)
        try:
            sock.settimeout(self.timeout)
            sock.connect((self.host, self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _Rpc:
    """aria2's JSON-RPC over one keep-alive connection; ``send``/``receive`` may be split so
    that requests to many aria2s go out back to back."""

    def __init__(self, netns: Namespace | None, port: int, secret: str) -> None:
        self._conn = _NsHTTPConnection(netns, "127.0.0.1", port, RPC_TIMEOUT)
        self._token = f"token:{secret}"

    def send(self, method: str, *params: Any) -> None:
        body = json.dumps(
            {"jsonrpc": "2.0", "id": "p2preg", "method": method, "params": [self._token, *params]}
        )
        headers = {"Content-Type": "application/json"}
        try:
            self._conn.request("POST", "/jsonrpc", body, headers)
        except (OSError, http.client.HTTPException):
            self._conn.close()  # aria2 may have closed an idle connection: one fresh try
            self._conn.request("POST", "/jsonrpc", body, headers)

    def receive(self) -> Any:
        try:
            response = self._conn.getresponse()
            data = response.read()
        except BaseException:
            self._conn.close()
            raise
        try:
            answer = json.loads(data)
        except ValueError:
            detail = f"({response.status}): {data[:200]!r}"
            raise BitTorrentError(f"aria2 RPC: not JSON {detail}") from None
        if "error" in answer:
            raise BitTorrentError(f"aria2 RPC: {answer['error']}")
        return answer["result"]

    def call(self, method: str, *params: Any) -> Any:
        self.send(method, *params)
        return self.receive()

    def close(self) -> None:
        self._conn.close()


def _http_get(netns: Namespace | None, host: str, port: int, target: str) -> bytes:
    conn = _NsHTTPConnection(netns, host, port, RPC_TIMEOUT)
    try:
        conn.request("GET", target)
        return conn.getresponse().read()
    finally:
        conn.close()


# --- processes -----------------------------------------------------------------------------------


def tool_versions() -> dict[str, str]:
    """aria2c's and opentracker's versions (opentracker has no --version: the Debian package's)."""
    versions: dict[str, str] = {}
    try:
        out = subprocess.run(
            ["aria2c", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        versions["aria2c"] = out.splitlines()[0].removeprefix("aria2 version ") if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        versions["aria2c"] = "not installed"
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "opentracker"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        versions["opentracker"] = f"Debian {out.strip()}" if out.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        versions["opentracker"] = "unknown"
    return versions


def _free_port(ip: str) -> int:
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    """Our environment without proxies (aria2 honours http_proxy for tracker requests)."""
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}
    return {key: value for key, value in os.environ.items() if key.lower() not in proxies}


def _stop_all(children: Sequence[Child]) -> list[str]:
    """SIGTERM every child's process group at once, close each (SIGKILL after a grace), then
    SIGKILL what is left of the groups (hook shells an aria2c spawned share its group)."""
    problems: list[str] = []
    with deferred_signals():
        groups = [child.pid for child in children if child.pid is not None]
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        for child in children:
            try:
                child.close()
            except Exception as exc:  # cleanup reports, never raises
                problems.append(f"stopping {' '.join(child.argv[:6])}: {exc}")
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
    return problems


class _Node:
    """One aria2c: its host, ports, directory, RPC connection and process."""

    def __init__(self, host: BtHost, index: int, work: Path) -> None:
        self.host = host
        self.index = index
        self.dir = work / ("seeder" if index == 0 else f"leecher-{host.name}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.gid = f"{index + 1:016x}"
        self.secret = secrets.token_hex(16)
        if host.netns is None:
            self.bt_port, self.rpc_port = _free_port(host.ip), _free_port("127.0.0.1")
        else:
            self.bt_port, self.rpc_port = BT_PORT_BASE + index, RPC_PORT_BASE + index
        self.rpc = _Rpc(host.netns, self.rpc_port, self.secret)
        self.child: Child | None = None
        self.done_file = self.dir / "complete"

    def argv(
        self,
        torrent: Path,
        *,
        seeder: bool,
        lifetime: int,
        upload: int | None,
        download: int | None,
    ) -> list[str]:
        argv = [
            "aria2c",
            "--no-conf=true",
            f"--dir={self.dir}",
            f"--gid={self.gid}",
            f"--log={self.dir / 'aria2.log'}",
            "--log-level=notice",
            "--console-log-level=warn",
            "--summary-interval=0",
            "--show-console-readout=false",
            "--enable-color=false",
            # Peers come from the tracker only, on the given address only.
            "--enable-dht=false",
            "--enable-dht6=false",
            "--bt-enable-lpd=false",
            "--enable-peer-exchange=true",
            "--disable-ipv6=true",
            f"--interface={self.host.ip}",
            f"--bt-external-ip={self.host.ip}",
            f"--listen-port={self.bt_port}",
            f"--bt-tracker-interval={ANNOUNCE_INTERVAL}",
            # RPC on 127.0.0.1 of the node's namespace, with a secret.
            "--enable-rpc=true",
            "--rpc-listen-all=false",
            f"--rpc-listen-port={self.rpc_port}",
            f"--rpc-secret={self.secret}",
            # Seed until we stop it; never outlive this process or the run's budget.
            "--seed-ratio=0.0",
            f"--stop-with-process={os.getpid()}",
            f"--stop={lifetime}",
            "--file-allocation=none",
            "--auto-file-renaming=false",
            "--allow-overwrite=false",
            "--bt-save-metadata=false",
        ]
        if seeder:
            argv += [
                "--check-integrity=true",
                "--bt-hash-check-seed=true",
                "--bt-seed-unverified=false",
            ]
        else:
            hook = self.dir / "on-complete.sh"
            done, tmp = shlex.quote(str(self.done_file)), shlex.quote(f"{self.done_file}.tmp")
            hook.write_text(f"#!/bin/sh\ndate +%s.%N > {tmp} && mv {tmp} {done}\n")
            hook.chmod(0o755)
            argv += ["--pause=true", f"--on-bt-download-complete={hook}"]
        if upload is not None:
            argv.append(f"--max-overall-upload-limit={upload}")
        if download is not None:
            argv.append(f"--max-overall-download-limit={download}")
        return [*argv, f"--torrent-file={torrent}"]

    def start(self, argv: Sequence[str]) -> None:
        self.child = Child(argv, self.dir / "stdout.log", netns=self.host.netns, env=_env())

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.rpc.call("aria2.tellStatus", self.gid, _STATUS_KEYS)
        return result

    def in_state(self, state: str, completed: int | None = None) -> bool:
        """Whether aria2 reports ``state`` (and ``completed`` bytes, if given) for the blob."""
        status = self.status()
        if status["status"] != state:
            return False
        return completed is None or int(status["completedLength"]) == completed

    def cpu_seconds(self) -> float:
        """User + system CPU time of this aria2c so far (``ip netns exec`` execs in place, so
        the child's pid is aria2c's), from /proc; 0.0 if unreadable."""
        pid = self.child.pid if self.child is not None else None
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check_alive(self) -> None:
        if self.child is not None and self.child.exited() is not None:
            raise BitTorrentError(
                f"aria2c of {self.host.name} exited ({self.child.exited()}): "
                + _tail(self.dir / "aria2.log", self.child.log_tail())
            )


def _tail(log: Path, extra: str = "", limit: int = 1500) -> str:
    try:
        text = log.read_text(errors="replace")[-limit:]
    except OSError:
        text = ""
    return (text + "\n" + extra).strip()


def _wait(what: str, seconds: float, check: Callable[[], bool], alive: Callable[[], None]) -> None:
    """Poll ``check`` (errors count as not yet) until true; raise after ``seconds``."""
    deadline = time.monotonic() + seconds
    last_error = ""
    while True:
        alive()
        try:
            if check():
                return
        except (OSError, http.client.HTTPException, BitTorrentError, ValueError) as exc:
            last_error = f" (last: {exc})"
        if time.monotonic() >= deadline:
            raise BitTorrentError(f"{what}: not within {seconds:.0f}s{last_error}")
        time.sleep(0.05)


# --- the run -------------------------------------------------------------------------------------


def run_bittorrent(
    work: Path,
    blob_path: Path,
    seeder: BtHost,
    tracker: BtHost,
    leechers: Sequence[BtHost],
    *,
    piece_length: int,
    deadline_s: float,
    per_node_rate: int | None = None,
    origin_rate: int | None = None,
    progress: Callable[[str], None] | None = None,
    start_offsets: Sequence[float] | None = None,
) -> BtResult:
    """Distribute ``blob_path`` from ``seeder`` to every leecher with aria2c + opentracker.

    ``progress`` gets one-line messages without a prefix ("n3 complete at 14.51s").
    See the module docstring for what is measured and how. ``work`` gets one directory per
    host (logs included) and may be removed afterwards. Raises BitTorrentError if setup fails or
    a completed file's sha256 differs from the blob's; leechers not done within ``deadline_s``
    are reported as None. Every process started here is stopped before this returns or raises.
    ``start_offsets`` (seconds, one per leecher): unpause leecher i that long after t = 0
    instead of all at once; completion times still count from t = 0.
    """
    say = progress or (lambda _message: None)
    names = [host.name for host in leechers]
    if not leechers or len(set(names)) != len(names) or seeder.name in names:
        raise BitTorrentError(f"leecher names must be unique and non-empty: {names}")
    offsets = list(start_offsets) if start_offsets is not None else [0.0] * len(leechers)
    if len(offsets) != len(leechers) or not all(0 <= o < math.inf for o in offsets):
        raise BitTorrentError("start_offsets: one finite offset >= 0 per leecher")
    for tool in ("aria2c", "opentracker"):
        if shutil.which(tool) is None:
            raise BitTorrentError(f"{tool} is not installed (apt-get install -y aria2 opentracker)")
    work.mkdir(parents=True, exist_ok=True)
    blob_size = blob_path.stat().st_size
    setup_budget = 2 * READY_TIMEOUT + blob_size / HASH_CHECK_RATE
    lifetime = math.ceil(setup_budget + deadline_s + LIFETIME_SLACK)
    notes: list[str] = []
    setup_started = time.monotonic()

    tracker_port = TRACKER_PORT if tracker.netns is not None else _free_port(tracker.ip)
    announce = f"http://{tracker.ip}:{tracker_port}/announce"
    torrent_bytes, info_hash = make_torrent(blob_path, piece_length, announce)
    torrent = work / "blob.torrent"
    torrent.write_bytes(torrent_bytes)
    pieces = math.ceil(blob_size / piece_length)
    say(f"torrent {info_hash.hex()} ({pieces} pieces of {piece_length} B)")

    nodes = [_Node(seeder, 0, work)] + [
        _Node(host, index, work) for index, host in enumerate(leechers, start=1)
    ]
    children: list[Child] = []
    try:
        tracker_child = _start_tracker(work, tracker, tracker_port, info_hash, lifetime)
        children.append(tracker_child)
        _wait_tracker(tracker, tracker_port, info_hash, tracker_child)
        say(f"opentracker on {tracker.ip}:{tracker_port}")

        seed = nodes[0]
        shutil.copyfile(blob_path, seed.dir / blob_path.name)
        seed.start(
            seed.argv(torrent, seeder=True, lifetime=lifetime, upload=origin_rate, download=None)
        )
        assert seed.child is not None
        children.append(seed.child)

        def registered() -> bool:
            target = f"/scrape?info_hash={urllib.parse.quote(info_hash)}"
            body = _http_get(tracker.netns, tracker.ip, tracker_port, target)
            match = _SCRAPE_COMPLETE_RE.search(body)
            return match is not None and int(match.group(1)) >= 1

        _wait(
            "seeder hash check",
            READY_TIMEOUT + blob_size / HASH_CHECK_RATE,
            lambda: seed.in_state("active", blob_size),
            seed.check_alive,
        )
        _wait("seeder registered at the tracker", READY_TIMEOUT, registered, seed.check_alive)
        say(f"seeder verified and registered ({time.monotonic() - setup_started:.1f}s)")

        for node in nodes[1:]:
            node.start(
                node.argv(
                    torrent,
                    seeder=False,
                    lifetime=lifetime,
                    upload=per_node_rate,
                    download=per_node_rate,
                )
            )
            assert node.child is not None
            children.append(node.child)
        for node in nodes[1:]:
            _wait(
                f"aria2c of {node.host.name} ready",
                READY_TIMEOUT,
                functools.partial(node.in_state, "paused"),
                node.check_alive,
            )
        setup_s = time.monotonic() - setup_started

        # t = 0: unpause every leecher back to back over open connections (or each at its
        # offset; the completion hooks stamp the wall clock, so nothing is missed meanwhile).
        t0_wall, t0 = time.time(), time.monotonic()
        skew = 0.0
        for offset, node in sorted(zip(offsets, nodes[1:], strict=True), key=lambda x: x[0]):
            time.sleep(max(0.0, t0 + offset - time.monotonic()))
            node.rpc.send("aria2.unpause", node.gid)
            skew = max(skew, time.monotonic() - t0 - offset)
        for node in nodes[1:]:
            node.rpc.receive()
        when = f"its offset (up to {max(offsets):.2f} s)" if any(offsets) else "t = 0"
        say(f"{len(leechers)} leechers started, each within {skew * 1000:.1f} ms of {when}")
        notes.append(f"all leechers unpaused, each within {skew * 1000:.1f} ms of {when}")

        completion = _watch(nodes[1:], blob_size, t0_wall, t0, deadline_s, say, notes)

        # Counters before anything stops (aria2's counters die with it).
        upload_bytes: dict[str, int] = {}
        download_bytes: dict[str, int] = {}
        cpu_s: dict[str, float] = {}
        for node in nodes:
            cpu_s[node.host.name] = node.cpu_seconds()
            status = node.status()
            upload_bytes[node.host.name] = int(status["uploadLength"])
            if node.index:
                download_bytes[node.host.name] = int(status["completedLength"])
    finally:
        problems = _stop_all(list(reversed(children)))
        for node in nodes:
            node.rpc.close()
    notes += problems

    expected = _sha256(blob_path)
    for node in nodes[1:]:
        if completion[node.host.name] is None:
            continue
        path = node.dir / blob_path.name
        got = _sha256(path)
        if got != expected:
            raise BitTorrentError(f"{node.host.name}: {path} has sha256 {got}, the blob {expected}")
    done = sum(value is not None for value in completion.values())
    notes.append(
        f"{done}/{len(leechers)} leechers complete with the blob's sha256 ({expected[:12]}...)"
    )
    seeder_upload = upload_bytes[seeder.name]
    peer_upload = sum(upload_bytes[name] for name in names)
    needed = sum(download_bytes.values())
    sent = seeder_upload + peer_upload
    if sent != needed:
        notes.append(
            f"peers uploaded {sent} B in all for {needed} B the leechers hold: "
            f"{sent - needed:+d} B (blocks sent twice in endgame, or cancelled in flight)"
        )
    return BtResult(
        completion_s=completion,
        seeder_upload_bytes=seeder_upload,
        peer_upload_bytes=peer_upload,
        clients=tool_versions(),
        notes=notes,
        upload_bytes=upload_bytes,
        download_bytes=download_bytes,
        setup_s=setup_s,
        cpu_s=cpu_s,
        t0_monotonic=t0,
    )


def _start_tracker(
    work: Path, tracker: BtHost, port: int, info_hash: bytes, lifetime: int
) -> Child:
    """opentracker on ``tracker.ip:port`` (TCP only), whitelisting only ``info_hash``.

    It chroots into ``root`` and drops to user nobody, so the directory and the whitelist must
    be readable by nobody; the whitelist path is relative to the chroot.
    """
    root = work / "tracker"
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    whitelist = root / "whitelist.txt"
    whitelist.write_text(info_hash.hex() + "\n")
    whitelist.chmod(0o644)
    argv = ["timeout", "--kill-after=5", str(lifetime), "opentracker"]
    argv += ["-i", tracker.ip, "-p", str(port), "-d", str(root), "-w", "whitelist.txt"]
    return Child(argv, work / "opentracker.log", netns=tracker.netns, env=_env())


def _wait_tracker(tracker: BtHost, port: int, info_hash: bytes, child: Child) -> None:
    """Until an ``event=stopped`` announce for the hash is accepted (whitelist loaded). It adds
    no peer: a stopped event removes the sender."""
    query = urllib.parse.urlencode(
        {
            "info_hash": info_hash,
            "peer_id": b"-P2PREG-readyprobe00",
            "port": 1,
            "uploaded": 0,
            "downloaded": 0,
            "left": 0,
            "event": "stopped",
            "compact": 1,
        }
    )

    def accepted() -> bool:
        body = _http_get(tracker.netns, tracker.ip, port, f"/announce?{query}")
        return body.startswith(b"d") and b"failure reason" not in body

    def alive() -> None:
        if child.exited() is not None:
            raise BitTorrentError(f"opentracker exited ({child.exited()}): {child.log_tail()}")

    _wait("opentracker ready", READY_TIMEOUT, accepted, alive)


def _watch(
    leechers: Sequence[_Node],
    blob_size: int,
    t0_wall: float,
    t0: float,
    deadline_s: float,
    say: Callable[[str], None],
    notes: list[str],
) -> dict[str, float | None]:
    """Completion times from the hooks, until every leecher is done or deadline_s has passed."""
    completion: dict[str, float | None] = {node.host.name: None for node in leechers}
    rpc_done_at: dict[str, float] = {}
    next_status = t0 + STATUS_INTERVAL
    next_progress = t0 + PROGRESS_EVERY
    while True:
        now = time.monotonic()
        for node in leechers:
            name = node.host.name
            if completion[name] is None and node.done_file.exists():
                stamp = float(node.done_file.read_text().strip())
                completion[name] = max(0.0, stamp - t0_wall)
                say(f"{name} complete at {completion[name]:.2f}s")
        if all(value is not None for value in completion.values()):
            return completion
        if now - t0 >= deadline_s:
            late = [name for name, value in completion.items() if value is None]
            notes.append(f"not complete within the deadline of {deadline_s:.0f}s: {late}")
            say(f"deadline {deadline_s:.0f}s passed; incomplete: {late}")
            return completion
        if now >= next_status:
            next_status = now + STATUS_INTERVAL
            have = 0
            for node in leechers:
                node.check_alive()
                name = node.host.name
                if completion[name] is not None:
                    have += blob_size
                    continue
                try:
                    status = node.status()
                except (OSError, http.client.HTTPException) as exc:  # busy machine: next round
                    notes.append(f"{name}: a progress poll failed at {now - t0:.1f}s: {exc}")
                    continue
                have += int(status["completedLength"])
                if status["completedLength"] == str(blob_size):
                    rpc_done_at.setdefault(name, now)
                    if now - rpc_done_at[name] > HOOK_GRACE:  # the hook did not run: fall back
                        completion[name] = rpc_done_at[name] - t0
                        notes.append(f"{name}: no completion hook; time from RPC polling")
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY
                done = sum(value is not None for value in completion.values())
                share = have / (blob_size * len(leechers))
                say(f"t={now - t0:.1f}s {done}/{len(leechers)} complete, {share:.0%}")
        time.sleep(POLL_INTERVAL)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


# --- a namespace swarm and the CLI ---------------------------------------------------------------


def build_netns_swarm(
    lab: NetnsLab, nodes: int, node_rate: int | None, origin_rate: int | None
) -> tuple[BtHost, BtHost, list[BtHost]]:
    """bench_swarm's netns testbed without its processes: origin (the seeder), tracker and
    ``nodes`` leechers, each in its own namespace on one bridge (10.204.0.0/24), a tbf on each
    node's veth both ways at ``node_rate`` and on the origin's at ``origin_rate`` (None:
    unshaped); the tracker is unshaped. Returns (seeder, tracker, leechers)."""
    from simulations.bench_swarm import (
        FIRST_NODE_HOST,
        ORIGIN_IP,
        PREFIX_LEN,
        SUBNET_PREFIX,
        TRACKER_IP,
        NetnsTestbed,
    )

    bridge = lab.namespace("br")
    origin_ns = lab.namespace("origin")
    tracker_ns = lab.namespace("tracker")
    lab.veth(origin_ns, "eth0", f"{ORIGIN_IP}/{PREFIX_LEN}", bridge, "porigin", None)
    lab.veth(tracker_ns, "eth0", f"{TRACKER_IP}/{PREFIX_LEN}", bridge, "ptracker", None)
    ports = ["porigin", "ptracker"]
    leechers = []
    for index in range(1, nodes + 1):
        ns = lab.namespace(f"n{index}")
        ip = f"{SUBNET_PREFIX}{FIRST_NODE_HOST - 1 + index}"
        lab.veth(ns, "eth0", f"{ip}/{PREFIX_LEN}", bridge, f"pn{index}", None)
        ports.append(f"pn{index}")
        leechers.append(BtHost(f"n{index}", ns, ip))
    lab.bridge(bridge, "br0", ports)
    shaped: list[tuple[Namespace, str, int | None]] = [
        (origin_ns, "eth0", origin_rate),
        (bridge, "porigin", origin_rate),
    ]
    for index, host in enumerate(leechers, start=1):
        assert host.netns is not None
        shaped += [(host.netns, "eth0", node_rate), (bridge, f"pn{index}", node_rate)]
    for ns, dev, rate in shaped:
        if rate is not None:
            tbf: Tbf = NetnsTestbed.tbf(rate)
            lab.shape(ns, dev, tbf)
    return (
        BtHost("origin", origin_ns, ORIGIN_IP),
        BtHost("tracker", tracker_ns, TRACKER_IP),
        leechers,
    )


def _write_blob(path: Path, size: int) -> None:
    with path.open("wb") as out:
        remaining = size
        while remaining:
            data = os.urandom(min(8 * MiB, remaining))
            out.write(data)
            remaining -= len(data)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _bound(size: int, nodes: int, node_rate: int, origin_rate: int) -> float:
    """Kumar & Ross: max(F/u_origin, F/d, N*F/(u_origin + sum u_i))."""
    return max(
        size / origin_rate, size / node_rate, nodes * size / (origin_rate + nodes * node_rate)
    )


def main(argv: Sequence[str] | None = None) -> int:
    from p2preg.errors import ConfigError
    from p2preg.units import parse_size

    parser = argparse.ArgumentParser(
        prog="python -m simulations.bittorrent",
        description="BitTorrent baseline (aria2c + opentracker) on shaped links.",
    )
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--blob-size", default="200MiB")
    parser.add_argument("--node-bandwidth", default="20MiB", help="per node, both ways (bytes/s)")
    parser.add_argument("--origin-bandwidth", default=None, help="default: --node-bandwidth")
    parser.add_argument("--piece-length", default="256KiB")
    parser.add_argument("--shaping", choices=["netns", "limits"], default="netns")
    parser.add_argument("--deadline", type=float, default=None, help="default: 10x the bound + 60s")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep-work", type=Path, default=None, help="keep logs in this directory")
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.blob_size, "--blob-size")
        node_rate = parse_size(args.node_bandwidth, "--node-bandwidth")
        origin_rate = parse_size(args.origin_bandwidth or args.node_bandwidth, "--origin-bandwidth")
        piece_length = parse_size(args.piece_length, "--piece-length")
    except ConfigError as exc:
        parser.error(str(exc))
    if not 1 <= args.nodes <= 200 or size <= 0 or node_rate <= 0 or origin_rate <= 0:
        parser.error("--nodes 1..200 and positive sizes and rates, please")
    bound = _bound(size, args.nodes, node_rate, origin_rate)
    deadline = args.deadline if args.deadline is not None else 10 * bound + 60

    def say(message: str) -> None:
        print(f"bittorrent: {message}", file=sys.stderr, flush=True)

    if args.shaping == "netns" and (reason := netns_unavailable_reason()) is not None:
        say(f"error: --shaping netns: {reason}")
        return 2
    load_before = _loadavg()
    with contextlib.ExitStack() as stack:
        stack.enter_context(termination_raises())
        if args.keep_work is not None:
            work = args.keep_work
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="p2pbt-")))
        blob = work / "blob.bin"
        _write_blob(blob, size)
        try:
            if args.shaping == "netns":
                lab = stack.enter_context(NetnsLab(prefix=f"p2pbt-{os.getpid()}-"))
                seeder, tracker, leechers = build_netns_swarm(
                    lab, args.nodes, node_rate, origin_rate
                )
                limits: dict[str, int | None] = {"per_node_rate": None, "origin_rate": None}
            else:
                loop = "127.0.0.1"
                seeder, tracker = BtHost("origin", None, loop), BtHost("tracker", None, loop)
                leechers = [BtHost(f"n{i}", None, loop) for i in range(1, args.nodes + 1)]
                limits = {"per_node_rate": node_rate, "origin_rate": origin_rate}
            result = run_bittorrent(
                work / "bt",
                blob,
                seeder,
                tracker,
                leechers,
                piece_length=piece_length,
                deadline_s=deadline,
                progress=say,
                per_node_rate=limits["per_node_rate"],
                origin_rate=limits["origin_rate"],
            )
        except BitTorrentError as exc:
            say(f"error: {exc}")
            return 1
        except (KeyboardInterrupt, Terminated) as exc:
            say(f"interrupted ({str(exc) or 'Ctrl-C'}): every process and namespace removed")
            return 130
    times = [value for value in result.completion_s.values() if value is not None]
    summary = {
        "nodes": args.nodes,
        "blob_bytes": size,
        "node_rate": node_rate,
        "origin_rate": origin_rate,
        "piece_length": piece_length,
        "shaping": args.shaping,
        "bound_s": bound,
        "p50_s": statistics.median(times) if times else None,
        "max_s": max(times) if len(times) == args.nodes else None,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "result": asdict(result),
    }
    for name, value in result.completion_s.items():
        print(
            f"  {name:8} {'-' if value is None else f'{value:7.2f} s'}"
            f"  up {result.upload_bytes.get(name, 0) / MiB:8.1f} MiB"
        )
    p50, worst = summary["p50_s"], summary["max_s"]
    print(
        f"bittorrent: {len(times)}/{args.nodes} complete; p50 "
        + (f"{p50:.2f} s" if p50 is not None else "-")
        + "; max "
        + (f"{worst:.2f} s" if worst is not None else "-")
        + f"; bound {bound:.2f} s"
        + (f" ({worst / bound:.2f}x)" if worst is not None else "")
    )
    print(
        f"seeder uploaded {result.seeder_upload_bytes / MiB:.1f} MiB "
        f"({result.seeder_upload_bytes / size:.2f} copies); leechers to each other "
        f"{result.peer_upload_bytes / MiB:.1f} MiB; setup {result.setup_s:.1f} s; "
        f"aria2c CPU {sum(result.cpu_s.values()):.1f} s in all; "
        f"load {load_before} -> {summary['loadavg_after']}; "
        + ", ".join(f"{tool} {version}" for tool, version in result.clients.items())
    )
    for note in result.notes:
        print(f"note: {note}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
