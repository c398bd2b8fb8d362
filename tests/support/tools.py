"""Small helpers the integration support code shares: finding external tools and free ports.

Integration tests drive real programs (docker-registry, skopeo, podman, containerd). A developer
without one of them should see a skip, not a failure; CI installs all of them, so there a missing
tool is a broken environment and must fail loudly instead of silently skipping half the suite.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable

import pytest

__all__ = ["free_port", "require_netns", "require_tool"]


def require_tool(name: str) -> str:
    """Return the absolute path of the executable ``name``, or skip (fail under CI) the test.

    CI is detected the usual way, ``CI=true`` in the environment (GitHub Actions, GitLab, ...).
    """
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (CI=true requires it)")
        pytest.skip(f"{name} is not installed")
    return path


def require_netns() -> None:
    """Skip (fail under CI=true) the test unless network namespaces can be made here: root, the
    ``ip`` tool and a kernel that lets us (probed by creating and deleting one)."""
    from simulations.netns import netns_unavailable_reason

    reason = netns_unavailable_reason(f"p2pt-{os.getpid()}-probe")
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"network namespaces unavailable (CI=true requires them): {reason}")
        pytest.skip(f"network namespaces unavailable: {reason}")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    For programs we cannot hand an open socket to (docker-registry takes an address in its
    config). There is a small window in which another process may take the port before the
    program binds it; callers that pick the port themselves (``OriginRegistry``) retry with a
    fresh one when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``predicate`` every 10 ms until it holds; fail the test after ``timeout`` seconds."""
    import trio

    # Polling is the point here: the predicate reads state no event announces.
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)
