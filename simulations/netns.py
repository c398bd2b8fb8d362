"""Network namespaces, veth links, tbf shaping and child processes for benchmarks and emulators.

Real-process experiments (the registry benchmark now, the fleet emulator next) need links with a
known capacity between processes on one machine. netem is not available here, but namespaces,
veth pairs and ``tc qdisc ... tbf`` are (see /work/shared/REAL-CLIENTS.md), so a "node" is a
namespace, a "link" is a veth pair (optionally through a bridge namespace), and a link's capacity
is a tbf on each end: the qdisc on one end shapes what that end sends.

Everything here is built to be torn down on every exit path, because a leaked namespace or agent
outlives the run and skews the next one:

- ``NetnsLab`` owns the namespaces it creates. Their names share a per-run prefix
  (``p2pb-<pid>-`` by default) so parallel runs never collide, and ``close()`` kills whatever still
  runs inside them (by pid, from ``ip netns pids``: only we put processes there) and deletes them.
- ``Child`` owns one process started by us; ``close()`` sends SIGTERM, then SIGKILL, each bounded.
- ``termination_raises()`` turns SIGTERM and SIGHUP into an exception, as Ctrl-C already is, so
  ``finally`` blocks run; ``deferred_signals()`` holds signals back while cleanup runs, so a
  second Ctrl-C cannot leave a namespace behind.

Every external command has a timeout. Addresses are whatever the caller gives; callers keep them
inside the namespaces they created (nothing here touches the root namespace's routes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, BinaryIO, Self

__all__ = [
    "Child",
    "Namespace",
    "NetnsError",
    "NetnsLab",
    "Tbf",
    "Terminated",
    "deferred_signals",
    "netns_unavailable_reason",
    "run_command",
    "termination_raises",
]

COMMAND_TIMEOUT = 10.0  # ip/tc finish in milliseconds; this only bounds a wedged call
STOP_TIMEOUT = 5.0  # SIGTERM -> SIGKILL grace period for a child
_CLEANUP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message carries the command and its stderr."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException so ``except Exception`` cannot swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def termination_raises() -> Iterator[None]:
    """Raise ``Terminated`` on SIGTERM/SIGHUP inside the block, so cleanup in ``finally`` runs.

    Python already turns SIGINT (Ctrl-C) into KeyboardInterrupt; the default action of SIGTERM
    and SIGHUP would kill us without running any ``finally``.
    """

    def _raise(signum: int, _frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Block SIGINT/SIGTERM/SIGHUP for the duration; they are delivered when the block ends.

    Wrap cleanup in this: an interrupt in the middle of ``ip netns del`` would otherwise leave
    the remaining namespaces behind. Cleanup is bounded by timeouts, so the delay is bounded too.
    Commands started inside inherit the blocked mask, which suits cleanup commands.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _CLEANUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run_command(
    argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a short command, capture its output, and raise NetnsError (with stderr) on failure."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(argv)}: no answer after {timeout:.0f}s") from None
    except OSError as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc.strerror}") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise NetnsError(f"{' '.join(argv)}: exit {result.returncode}: {detail}")
    return result


def netns_unavailable_reason(probe_name: str | None = None) -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip``/``tc``, kernel says no), or None.

    Actually creates and deletes a probe namespace: being root is not enough in a container
    without CAP_SYS_ADMIN, and the error ``ip`` prints is the most useful explanation.
    """
    if os.geteuid() != 0:
        return "not running as root (network namespaces and tc need root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install -y iproute2)"
    name = probe_name or f"p2pb-{os.getpid()}-probe"
    try:
        run_command(["ip", "netns", "add", name])
    except NetnsError as exc:
        return f"`ip netns add` failed: {exc}"
    try:
        run_command(["ip", "netns", "del", name])
    except NetnsError as exc:
        return f"`ip netns del` failed (probe namespace {name} may be left over): {exc}"
    return None


NEIGH_SYSCTL = Path("/proc/sys/net/ipv4/neigh/default")
# Who holds the raised limits, and what they were before the first raised them (below).
NEIGH_HOLDERS = Path("/run/p2preg-neighbour-table.json")


@contextlib.contextmanager
def neighbour_table_room(
    hosts: int, sysctl_dir: Path = NEIGH_SYSCTL, holders_file: Path = NEIGH_HOLDERS
) -> Iterator[str | None]:
    """Make room in the kernel's ARP table for ``hosts`` hosts on one LAN that may all talk to
    each other, for as long as the block runs, then put the limits back.

    The table and its limits (``gc_thresh1..3``) are shared by every network namespace of the
    machine, not one per namespace as on real hosts. At the default hard limit of 1,024
    entries, 48 nodes that each dial 16-32 peers overflow it ("neighbor table overflow!" in
    the kernel log): a new entry cannot be made, so the SYN to a peer not yet resolved is
    dropped before it reaches the link, and a node that resolved nobody yet cannot connect to
    anyone. In the emulator, 14 of 48 nodes waited up to 45 s on a 173-byte config blob that
    way, and stalled swarms fetched the layer from the origin 2-5 times over.

    Runs at once (two emulations, an emulation beside the test suite) share the limits, so
    ``holders_file`` records, under an exclusive lock, the limits as they were before the
    first run raised them and the runs (each by its pid and a token) that need them raised.
    The last run out puts the first run's values back; one that ends earlier leaves them for
    the others (restoring its own "before" would pull the limits from under a larger run
    still going). A holder that died without cleaning up (SIGKILL) is dropped the next time
    the file is read, and the values it saved are still the ones put back.

    Yields a one-line note of what was raised, or None when the limits were enough already or
    could not be changed (not root: the namespaces need root anyway).
    """
    pairs = hosts * hosts
    need = {"gc_thresh1": pairs // 2, "gc_thresh2": pairs, "gc_thresh3": 2 * pairs}
    raised: dict[str, tuple[int, int]] = {}
    holder = f"{os.getpid()}:{secrets.token_hex(4)}"  # this process's pid: dropped once it dies
    holding = False
    try:
        with _locked_holders(holders_file) as state:
            original: dict[str, int] = state.setdefault("original", {})
            for name, value in need.items():
                current = int((sysctl_dir / name).read_text())
                original.setdefault(name, current)
                if current < value:
                    (sysctl_dir / name).write_text(f"{value}\n")
                    raised[name] = (current, value)
            state.setdefault("holders", {})[holder] = need
            holding = True
    except (OSError, ValueError):
        pass  # not root or no such sysctl: the namespaces themselves will say what is wrong
    try:
        yield (
            "ARP table limits raised for the run ("
            + ", ".join(f"{name} {old} -> {new}" for name, (old, new) in raised.items())
            + ")"
            if raised
            else None
        )
    finally:
        if holding:
            with contextlib.suppress(OSError, ValueError), _locked_holders(holders_file) as state:
                state.get("holders", {}).pop(holder, None)
                if not state.get("holders"):
                    for name, old in state.get("original", {}).items():
                        (sysctl_dir / name).write_text(f"{old}\n")
                    state.clear()  # nobody holds the limits now


@contextlib.contextmanager
def _locked_holders(path: Path) -> Iterator[dict[str, Any]]:
    """The holders file's content, under an exclusive lock, written back when the block ends
    without an exception. Holders whose process is gone are dropped on reading."""
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        handle.seek(0)
        text = handle.read()
        state: dict[str, Any] = json.loads(text) if text.strip() else {}
        if not isinstance(state, dict):
            raise ValueError(f"{path}: not a JSON object")
        holders = state.get("holders", {})
        for holder in list(holders):
            if not _alive(int(holder.partition(":")[0])):
                del holders[holder]
        yield state
        # Emptied, it stays as an empty file: removing it could strand a run that opened it
        # and now waits for the lock on the removed file.
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(state) if state else "")
        handle.flush()


@dataclass(frozen=True, slots=True)
class Tbf:
    """A token bucket filter: ``tc qdisc add dev DEV root tbf rate R burst B latency L``.

    ``burst`` must cover what the kernel may send between two timer ticks at ``rate``, or tbf
    stays below the rate; at 1 gbit the 32kbit of the 100 mbit example is far too small.
    ``latency`` bounds the queue (rate x latency bytes) before tbf drops.
    """

    rate: str
    burst: str
    latency: str = "50ms"

    def tc_args(self) -> list[str]:
        return ["tbf", "rate", self.rate, "burst", self.burst, "latency", self.latency]

    def describe(self) -> str:
        return " ".join(self.tc_args())


@dataclass(frozen=True, slots=True)
class Namespace:
    """A named network namespace. Commands run inside it via ``ip netns exec NAME ...``."""

    name: str

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as a command line that runs inside this namespace.

        ``ip netns exec`` execs the command in place (no fork), so the pid of the wrapped
        command line is the pid of the command itself: signals reach it directly.
        """
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run_command(self.wrap(argv), timeout=timeout, check=check)

    def pids(self) -> list[int]:
        """Pids of the processes running in this namespace (empty if it is already gone)."""
        result = run_command(["ip", "netns", "pids", self.name], check=False)
        return [int(word) for word in result.stdout.split() if word.isdigit()]


def wrap(argv: Sequence[str], netns: Namespace | None) -> list[str]:
    """``argv`` to run in ``netns``, or unchanged for the root namespace."""
    return netns.wrap(argv) if netns is not None else list(argv)


class NetnsLab:
    """Creates namespaces and links for one run, and removes all of them in ``close()``.

    Use as a context manager (or call ``close()`` in ``finally``). A namespace is recorded
    before it is created, so an interrupt in between still gets it deleted.
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else f"p2pb-{os.getpid()}-"
        self._namespaces: list[Namespace] = []

    @property
    def namespaces(self) -> tuple[Namespace, ...]:
        return tuple(self._namespaces)

    def namespace(self, short_name: str) -> Namespace:
        """Create ``<prefix><short_name>`` with its loopback up (servers in it bind 127.0.0.1)."""
        ns = Namespace(self.prefix + short_name)
        self._namespaces.append(ns)
        run_command(["ip", "netns", "add", ns.name])
        run_command(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        return ns

    def veth(
        self,
        a: Namespace,
        a_dev: str,
        a_cidr: str | None,
        b: Namespace,
        b_dev: str,
        b_cidr: str | None,
    ) -> None:
        """Connect ``a`` and ``b`` with a veth pair, address each end (if a CIDR is given), up.

        Device names are per namespace, so every node may call its end ``eth0``; they must fit
        in 15 characters. For many nodes, connect each to a bridge namespace (``bridge()``).
        """
        run_command(
            [
                *("ip", "link", "add", a_dev, "netns", a.name),
                *("type", "veth", "peer", "name", b_dev, "netns", b.name),
            ]
        )
        for ns, dev, cidr in ((a, a_dev, a_cidr), (b, b_dev, b_cidr)):
            if cidr is not None:
                run_command(["ip", "-n", ns.name, "addr", "add", cidr, "dev", dev])
            run_command(["ip", "-n", ns.name, "link", "set", dev, "up"])

    def bridge(self, ns: Namespace, bridge_dev: str, ports: Sequence[str]) -> None:
        """Make ``bridge_dev`` in ``ns`` and enslave the veth ends ``ports`` already in ``ns``."""
        run_command(["ip", "-n", ns.name, "link", "add", bridge_dev, "type", "bridge"])
        run_command(["ip", "-n", ns.name, "link", "set", bridge_dev, "up"])
        for port in ports:
            run_command(["ip", "-n", ns.name, "link", "set", port, "master", bridge_dev, "up"])

    @staticmethod
    def shape(ns: Namespace, dev: str, tbf: Tbf) -> None:
        """Cap what ``dev`` in ``ns`` sends. Shape both ends of a link to cap both directions."""
        ns.run(["tc", "qdisc", "replace", "dev", dev, "root", *tbf.tc_args()])

    @staticmethod
    def qdisc_stats(ns: Namespace, dev: str) -> str:
        """``tc -s qdisc show`` for ``dev``: sent bytes, drops, overlimits (for diagnosis)."""
        return ns.run(["tc", "-s", "qdisc", "show", "dev", dev], check=False).stdout.strip()

    def close(self) -> list[str]:
        """Kill what runs in our namespaces, delete them; return the problems (never raises).

        Idempotent. Processes are killed by pid: only this run puts processes in these
        namespaces, and a namespace with a process in it would outlive ``ip netns del``.
        """
        problems: list[str] = []
        with deferred_signals():
            for ns in reversed(self._namespaces):
                try:
                    _kill_pids(ns.pids())
                    result = run_command(["ip", "netns", "del", ns.name], check=False)
                    if result.returncode != 0 and "No such file" not in result.stderr:
                        problems.append(f"ip netns del {ns.name}: {result.stderr.strip()}")
                except NetnsError as exc:
                    problems.append(str(exc))
            self._namespaces.clear()
        return problems

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _kill_pids(pids: Sequence[int]) -> None:
    """SIGTERM these pids, wait up to STOP_TIMEOUT for them to go, then SIGKILL the rest."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.05)
        if not any(_alive(pid) for pid in pids):
            return


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs. Reaps it if it is our own exited child (else: a zombie)."""
    with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps it
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Child:
    """One long-running process we started (a registry, an agent), with its output in a log.

    ``close()`` stops it (SIGTERM, then SIGKILL after STOP_TIMEOUT) and reaps it; idempotent.
    The child gets its own session, so Ctrl-C at the terminal reaches only us and the child
    is stopped in order by our cleanup rather than racing it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        netns: Namespace | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = wrap(argv, netns)
        self.log_path = log_path
        self.netns = netns
        self._log: BinaryIO | None = log_path.open("ab")
        try:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return self.process.poll() if self.process is not None else None

    def log_tail(self, limit: int = 3000) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        process, self.process = self.process, None
        with deferred_signals():
            try:
                if process is not None and process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(STOP_TIMEOUT)
            finally:
                if self._log is not None:
                    self._log.close()
                    self._log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
