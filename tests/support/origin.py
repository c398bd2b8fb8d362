"""A real origin registry for integration tests: CNCF distribution 2.8 (``docker-registry``).

Tests pull through the agent from this origin, so it has to behave like the registries in the
field (Range -> 206, OCI errors, Docker-Content-Digest), which a fake would only imitate. It is
configured from scratch: the Debian default config enables htpasswd auth and listens on every
address, and tests must only ever touch 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

import httpx

from tests.support.tools import free_port, require_tool

__all__ = ["OriginRegistry"]

_READY_TIMEOUT = 15.0
_STOP_TIMEOUT = 5.0
_PORT_ATTEMPTS = 3
_LOG_TAIL = 4000


class _PortTakenError(RuntimeError):
    """The registry could not bind its port (someone took it after ``free_port``)."""


class OriginRegistry:
    """One ``docker-registry serve`` process on 127.0.0.1 with filesystem storage in ``root_dir``.

    ``start()`` after ``stop()`` brings it back on the same port with the same storage, so tests
    can take the origin away mid-pull and restore it. Use as a context manager, or call ``stop()``
    in a ``finally``; the process never outlives the test that started it.
    """

    def __init__(self, root_dir: Path, port: int | None = None) -> None:
        self.root_dir = root_dir
        self._port = port if port is not None else free_port()
        # Once the registry has run on a port, clients know that address: never move it.
        self._port_pinned = port is not None
        # A fixed secret across restarts keeps upload session state valid after stop()/start().
        self._http_secret = secrets.token_hex(16)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    # --- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the form skopeo and registry references use."""
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage_dir(self) -> Path:
        return self.root_dir / "storage"

    @property
    def config_path(self) -> Path:
        return self.root_dir / "origin.yml"

    @property
    def log_path(self) -> Path:
        """stdout and stderr of every run, appended; read it when a test fails."""
        return self.root_dir / "origin.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the registry and wait (up to 15 s) until ``GET /v2/`` answers 200."""
        if self.running:
            raise RuntimeError(f"origin registry on {self.host} is already running")
        self._terminate()  # reap a process that died by itself, if any
        binary = require_tool("docker-registry")
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._spawn_and_wait(binary)
            except _PortTakenError:
                self._terminate()
                if self._port_pinned or attempt == _PORT_ATTEMPTS - 1:
                    raise
                self._port = free_port()
            except BaseException:
                self._terminate()
                raise
            else:
                self._port_pinned = True
                return

    def stop(self) -> None:
        """Terminate the registry (SIGTERM, SIGKILL after 5 s) and reap it. Idempotent."""
        self._terminate()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- internals -------------------------------------------------------------------------

    def _write_config(self) -> None:
        # JSON strings are valid YAML scalars, so json.dumps quotes paths safely.
        q = json.dumps
        self.config_path.write_text(
            "version: 0.1\n"
            "log:\n"
            "  level: warn\n"
            "storage:\n"
            "  filesystem:\n"
            f"    rootdirectory: {q(str(self.storage_dir))}\n"
            "  delete:\n"
            "    enabled: true\n"
            "http:\n"
            f"  addr: {q(self.host)}\n"
            f"  secret: {q(self._http_secret)}\n"
        )

    def _spawn_and_wait(self, binary: str) -> None:
        self._write_config()
        log = self.log_path.open("ab")
        log_start = log.tell()
        # REGISTRY_* variables override the config file; none may leak in from the caller.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        try:
            self._process = subprocess.Popen(
                [binary, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root_dir,
                env=env,
            )
        except BaseException:
            log.close()
            raise
        self._log = log
        self._wait_ready(log_start)

    def _wait_ready(self, log_start: int) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while time.monotonic() < deadline:  # bounded by the deadline
                assert self._process is not None
                if self._process.poll() is not None:
                    output = self._log_since(log_start)
                    if "address already in use" in output:
                        raise _PortTakenError(f"port {self._port} is taken:\n{output}")
                    raise RuntimeError(
                        f"docker-registry exited with {self._process.returncode}:\n{output}"
                    )
                try:
                    if client.get(f"{self.url}/v2/").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(
            f"docker-registry on {self.host} not ready after {_READY_TIMEOUT}s:\n"
            f"{self._log_since(log_start)}"
        )

    def _log_since(self, offset: int) -> str:
        if self._log is not None:
            self._log.flush()
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read()[-_LOG_TAIL:].decode(errors="replace")

    def _terminate(self) -> None:
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(_STOP_TIMEOUT)
        finally:
            if process is not None and process.returncode is None:
                process.wait(_STOP_TIMEOUT)
            if self._log is not None:
                self._log.close()
                self._log = None
