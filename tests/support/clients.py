"""Run real pull clients (skopeo, podman, containerd's ctr) against an agent, fenced to loopback.

Two fences keep every byte a client sends on 127.0.0.1:

1. Each client runs in an environment built from scratch: HOME, TMPDIR, XDG_RUNTIME_DIR and every
   config file it would read (containers.conf, storage.conf, registries.conf, policy.json,
   auth.json, containerd's config.toml and hosts.toml) point into the test's own directories, so
   nothing on the machine (a user's auth file, a system registries.conf with mirrors, a proxy
   setting) can send it elsewhere.
2. HTTP_PROXY and HTTPS_PROXY point at an :class:`EgressTrap` on 127.0.0.1. All three clients use
   Go's ``http.ProxyFromEnvironment``, which never proxies loopback addresses: traffic to the
   agent goes direct, while a request to any other host (a mirror's fallback to docker.io, say)
   reaches the trap instead of the network, without even a DNS lookup. The trap refuses it with
   403, so the client fails fast, and records it, so the test can assert nothing tried to leave.

Clients are subprocesses run with ``trio.run_process`` so the in-process agent keeps serving;
every run has a deadline, and a failure reports the command with the tail of its stderr.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.tools import require_tool

__all__ = [
    "Containerd",
    "EgressTrap",
    "Podman",
    "Skopeo",
    "client_env",
    "require_root",
    "run_client",
    "run_containerd",
    "run_egress_trap",
]

CLIENT_TIMEOUT = 90.0  # one client command; a pull of a few tens of MiB takes about a second
_OUTPUT_TAIL = 6000
_TRAP_READ_TIMEOUT = 5.0
_CONTAINERD_READY_TIMEOUT = 30.0
_CONTAINERD_STOP_TIMEOUT = 10.0
# insecureAcceptAnything: the test images are unsigned, and the machine's own policy must not
# decide what a test may pull.
_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


def require_root(what: str) -> None:
    """Skip (fail under CI=true, like ``require_tool``) unless running as root."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} needs root (CI=true requires it)")
    pytest.skip(f"{what} needs root")


# --- the egress trap ---------------------------------------------------------------------------


@dataclass
class EgressTrap:
    """A refuse-everything HTTP proxy on 127.0.0.1 that records what clients tried to reach."""

    port: int
    attempts: list[str] = field(default_factory=list)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def assert_untouched(self) -> None:
        assert not self.attempts, (
            f"a client tried to reach a non-loopback address (stopped by the trap): {self.attempts}"
        )


async def run_egress_trap(*, task_status: trio.TaskStatus[EgressTrap]) -> None:
    """Serve the trap until cancelled; reports the :class:`EgressTrap` once it listens."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    trap = EgressTrap(listeners[0].socket.getsockname()[1])

    async def refuse(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            try:
                with trio.move_on_after(_TRAP_READ_TIMEOUT):
                    while b"\r\n" not in head and len(head) < 8192:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        head += chunk
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                trap.attempts.append(line or "<connection without a request line>")
                with trio.move_on_after(_TRAP_READ_TIMEOUT):
                    await stream.send_all(
                        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                trap.attempts.append(head.split(b"\r\n", 1)[0].decode("latin-1") or "<reset>")

    task_status.started(trap)
    await trio.serve_listeners(refuse, listeners)


# --- running a client --------------------------------------------------------------------------


def client_env(home: Path, trap: EgressTrap, **extra: str) -> dict[str, str]:
    """A from-scratch environment for a client whose home is ``home`` (created if missing)."""
    tmp = home / "tmp"
    runtime = home / "run-user"
    for directory in (home, tmp, runtime):
        directory.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    auth = home / "auth.json"
    auth.write_text('{"auths": {}}')
    registries = home / "registries.conf"
    if not registries.exists():
        registries.write_text("")  # no mirrors, no search registries, no aliases
    containers_conf = home / "containers.conf"
    containers_conf.write_text("")  # built-in defaults only; podman brings its own
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "TMPDIR": str(tmp),  # skopeo and podman stage big blobs here (default /var/tmp)
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "LC_ALL": "C",
        "REGISTRY_AUTH_FILE": str(auth),
        "CONTAINERS_REGISTRIES_CONF": str(registries),
        "CONTAINERS_CONF": str(containers_conf),
        "NO_PROXY": "",
        "no_proxy": "",
    }
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = trap.proxy_url
    env.update(extra)
    return env


def _tail(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return text if len(text) <= _OUTPUT_TAIL else "...\n" + text[-_OUTPUT_TAIL:]


async def run_client(
    command: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str],
    time_limit: float = CLIENT_TIMEOUT,
    expect_success: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` to completion within ``time_limit`` s; by default assert it exits with 0.

    stderr goes to a file rather than a pipe so that it can be reported even when the command is
    killed at the deadline.
    """
    argv = [os.fspath(part) for part in command]
    shown = shlex.join(argv)
    with tempfile.TemporaryFile() as stderr:
        try:
            with trio.fail_after(time_limit):
                result = await trio.run_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    capture_stdout=True,
                    stderr=stderr,
                    env=env,
                    check=False,
                )
        except trio.TooSlowError:
            stderr.seek(0)
            raise AssertionError(
                f"{argv[0]} did not finish within {time_limit}s (killed): {shown}\n"
                f"--- stderr ---\n{_tail(stderr.read())}"
            ) from None
        stderr.seek(0)
        result.stderr = stderr.read()
    if expect_success and result.returncode != 0:
        raise AssertionError(
            f"{Path(argv[0]).name} failed with exit status {result.returncode}: {shown}\n"
            f"--- stderr ---\n{_tail(result.stderr)}\n--- stdout ---\n{_tail(result.stdout)}"
        )
    return result


def _write_policy(path: Path) -> Path:
    path.write_text(json.dumps(_POLICY))
    return path


# --- skopeo ------------------------------------------------------------------------------------


class Skopeo:
    """skopeo with its own policy and an empty registries.conf, fenced by ``trap``."""

    def __init__(self, workdir: Path, trap: EgressTrap) -> None:
        self.binary = require_tool("skopeo")
        self.workdir = workdir
        self.env = client_env(workdir / "home", trap)
        self.policy = _write_policy(workdir / "policy.json")

    async def copy_to_oci(
        self, source: str, layout: Path, tag: str, *, all_platforms: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        """``skopeo copy docker://SOURCE oci:LAYOUT:TAG`` from a plain-HTTP registry."""
        command: list[str | os.PathLike[str]] = [
            self.binary,
            "--policy",
            self.policy,
            "--registries-conf",
            self.env["CONTAINERS_REGISTRIES_CONF"],
            "copy",
            # Without it skopeo gzips uncompressed layers for the oci: destination (as it does
            # for a docker:// one), which changes layer and manifest digests; with it skopeo
            # copies every blob as it came, or fails rather than rewriting anything.
            "--preserve-digests",
            "--src-tls-verify=false",  # the agent speaks plain HTTP on loopback
            "--src-no-creds",  # no credential lookup, anonymous pulls only
            "--retry-times=0",  # a failing pull fails at once and shows the first error
        ]
        if all_platforms:
            command.append("--all")
        command += [f"docker://{source}", f"oci:{layout}:{tag}"]
        return await run_client(command, env=self.env)


# --- podman ------------------------------------------------------------------------------------


class Podman:
    """podman 4 as root with every path (storage, state, network config) of its own.

    Use it as a context manager: ``__exit__`` removes the run directory (see ``runroot``); the
    image store stays in ``workdir`` (the test's tmp_path), for a look after a failure.

    The vfs storage driver needs no overlayfs or fuse. ``network_backend = "cni"`` only keeps
    podman's start-up off the machine's directories: a rootful netavark backend always creates
    /run/containers/networks, while the CNI backend keeps to ``--network-config-dir``; a pull
    uses no network backend either way.
    """

    def __init__(self, workdir: Path, trap: EgressTrap, registries_conf: str = "") -> None:
        self.binary = require_tool("podman")
        require_root("podman")
        self.workdir = workdir
        self.root = workdir / "root"
        # podman refuses a runroot longer than 50 characters, which pytest's tmp_path can be:
        # a short directory of its own in /tmp, removed by __exit__.
        self.runroot = Path(tempfile.mkdtemp(prefix="podrun", dir="/tmp"))
        home = workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "registries.conf").write_text(registries_conf)
        containers_conf = workdir / "containers.conf"
        containers_conf.write_text('[network]\nnetwork_backend = "cni"\n')
        storage_conf = workdir / "storage.conf"
        storage_conf.write_text(
            '[storage]\ndriver = "vfs"\n'
            f"graphroot = {json.dumps(str(self.root))}\n"
            f"runroot = {json.dumps(str(self.runroot))}\n"
        )
        self.env = client_env(
            home,
            trap,
            CONTAINERS_CONF=str(containers_conf),
            CONTAINERS_STORAGE_CONF=str(storage_conf),
        )
        self.policy = _write_policy(workdir / "policy.json")

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)

    def command(self, *args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
        return [
            self.binary,
            "--root",
            self.root,
            "--runroot",
            self.runroot,
            "--storage-driver",
            "vfs",
            "--tmpdir",
            self.workdir / "libpod-tmp",
            "--network-config-dir",
            self.workdir / "networks",
            "--events-backend",
            "none",  # no journald here, and no event log file to write
            "--cgroup-manager",
            "cgroupfs",  # no systemd here
            *args,
        ]

    async def pull(self, reference: str, *, tls_verify: bool | None = None) -> str:
        """Pull ``reference``; returns the image ID podman prints."""
        args: list[str | os.PathLike[str]] = ["pull", "--quiet", "--signature-policy", self.policy]
        if tls_verify is not None:
            args.append(f"--tls-verify={'true' if tls_verify else 'false'}")
        result = await run_client(self.command(*args, reference), env=self.env)
        return result.stdout.decode().strip()

    async def inspect(self, reference: str) -> dict[str, Any]:
        result = await run_client(
            self.command("image", "inspect", "--format", "json", reference), env=self.env
        )
        images = json.loads(result.stdout)
        assert isinstance(images, list) and len(images) == 1, result.stdout[:2000]
        image: dict[str, Any] = images[0]
        return image


# --- containerd --------------------------------------------------------------------------------


@dataclass
class Containerd:
    """A running private containerd and a ``ctr`` bound to its socket."""

    base: Path
    socket: Path
    hosts_dir: Path
    env: dict[str, str]
    ctr_binary: str
    log_path: Path

    def log_tail(self) -> str:
        return _tail(self.log_path.read_bytes()) if self.log_path.exists() else ""

    def mirror(self, registry: str, mirror_url: str, server: str) -> None:
        """Write ``HOSTS_DIR/<registry>/hosts.toml``: pull and resolve at ``mirror_url`` first."""
        directory = self.hosts_dir / registry
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts.toml").write_text(
            f"server = {json.dumps(server)}\n"
            f"[host.{json.dumps(mirror_url)}]\n"
            '  capabilities = ["pull", "resolve"]\n'
        )

    async def ctr(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        command = [self.ctr_binary, "--address", str(self.socket), *args]
        try:
            return await run_client(command, env=self.env)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- containerd log ---\n{self.log_tail()}") from None


def _containerd_config(base: Path) -> str:
    q = json.dumps
    return (
        "version = 2\n"
        f"root = {q(str(base / 'root'))}\n"
        f"state = {q(str(base / 'state'))}\n"
        # CRI is not needed to pull and wants a CNI setup; the other snapshotters cannot work on
        # a plain directory anyway and would only probe (modprobe aufs) at start-up.
        "disabled_plugins = [\n"
        '  "io.containerd.grpc.v1.cri",\n'
        '  "io.containerd.snapshotter.v1.aufs",\n'
        '  "io.containerd.snapshotter.v1.btrfs",\n'
        '  "io.containerd.snapshotter.v1.devmapper",\n'
        '  "io.containerd.snapshotter.v1.zfs",\n'
        "]\n"
        "[grpc]\n"
        f"  address = {q(str(base / 'c.sock'))}\n"
        "[ttrpc]\n"
        f"  address = {q(str(base / 'c.sock.ttrpc'))}\n"
        "[plugins]\n"
        # The opt plugin would otherwise create /opt/containerd on the machine.
        '  [plugins."io.containerd.internal.v1.opt"]\n'
        f"    path = {q(str(base / 'opt'))}\n"
    )


@asynccontextmanager
async def run_containerd(trap: EgressTrap) -> AsyncIterator[Containerd]:
    """Start a private containerd in a fresh short /tmp directory; stop it and remove it after.

    The directory is short on purpose: a unix socket path must fit in 108 bytes, which pytest's
    tmp_path does not promise.
    """
    binary = require_tool("containerd")
    ctr_binary = require_tool("ctr")
    require_root("containerd")
    base = Path(tempfile.mkdtemp(prefix="ctd", dir="/tmp"))
    process: trio.Process | None = None
    log = None
    try:
        config = base / "config.toml"
        config.write_text(_containerd_config(base))
        log_path = base / "containerd.log"
        log = log_path.open("wb")
        env = client_env(base / "home", trap)
        daemon = Containerd(
            base=base,
            socket=base / "c.sock",
            hosts_dir=base / "hosts",
            env=env,
            ctr_binary=ctr_binary,
            log_path=log_path,
        )
        process = await trio.lowlevel.open_process(
            [binary, "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        await _wait_containerd_ready(daemon, process)
        yield daemon
    finally:
        with trio.CancelScope(shield=True):
            if process is not None:
                await _stop_process(process)
            if log is not None:
                log.close()
            shutil.rmtree(base, ignore_errors=True)


async def _wait_containerd_ready(daemon: Containerd, process: trio.Process) -> None:
    """Wait until containerd answers ``ctr version`` on its socket (and has not died)."""
    with trio.move_on_after(_CONTAINERD_READY_TIMEOUT):
        while True:  # bounded by the deadline
            if process.poll() is not None:
                raise AssertionError(
                    f"containerd exited with {process.returncode} at start-up:\n{daemon.log_tail()}"
                )
            if daemon.socket.exists():
                result = await run_client(
                    [daemon.ctr_binary, "--address", str(daemon.socket), "version"],
                    env=daemon.env,
                    time_limit=10,
                    expect_success=False,
                )
                if result.returncode == 0:
                    return
            await trio.sleep(0.05)
    raise AssertionError(
        f"containerd not ready after {_CONTAINERD_READY_TIMEOUT}s:\n{daemon.log_tail()}"
    )


async def _stop_process(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL if it has not exited within the stop timeout; always reaped."""
    if process.poll() is None:
        process.terminate()
        with trio.move_on_after(_CONTAINERD_STOP_TIMEOUT):
            await process.wait()
    if process.poll() is None:
        process.kill()
    await process.wait()
