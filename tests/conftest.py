"""Shared fixtures: a real origin registry with pushed test images, and in-process agents.

Test rules (after trio-websocket's): loopback only; every test has a deadline (pytest-timeout in
pyproject, ``trio.fail_after`` inside where a wait could hang); every process and server a test
starts is stopped when it ends, also on failure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.service import RunningAgent, run_agent
from p2preg.config import AgentConfig, Upstream
from tests.support.oci_image import TestImage, build_image, push_image
from tests.support.origin import OriginRegistry

KiB = 1024
MiB = 1024 * KiB
# At least three layers, one of them many pieces long (21 of 1 MiB: piece_length_for).
IMAGE_LAYER_SIZES = (3 * MiB + 123, 40 * KiB, 21 * MiB + 7)


@pytest.fixture(scope="session")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginRegistry]:
    """One docker-registry for the whole session; tests that stop it must start it again."""
    registry = OriginRegistry(tmp_path_factory.mktemp("origin"))
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def image_factory(
    origin: OriginRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., TestImage]:
    """Build and push a fresh image with its own content (seeded), so byte counts are exact."""
    counter = iter(range(1, 10_000))

    def make(
        repo: str,
        tag: str = "v1",
        layer_sizes: tuple[int, ...] = IMAGE_LAYER_SIZES,
        *,
        multiarch: bool = False,
    ) -> TestImage:
        seed = next(counter) * 1000 + hash(repo) % 1000
        layout = tmp_path_factory.mktemp("layout")
        image = build_image(layout, tag, layer_sizes, seed=seed, multiarch=multiarch)
        push_image(image, origin.host, repo, all_platforms=multiarch)
        return image

    return make


@pytest.fixture(scope="session")
def shared_image(image_factory: Callable[..., TestImage]) -> TestImage:
    """A three-layer image at team/app:v1 that read-only tests share."""
    return image_factory("team/app")


AgentStarter = Callable[..., Awaitable[RunningAgent]]


@pytest.fixture
async def start_agent(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[AgentStarter]:
    """``await start_agent(upstream_url, **config_overrides)`` runs an agent in this test."""
    count = 0

    async def start(upstream_url: str | None = None, **overrides: Any) -> RunningAgent:
        nonlocal count
        count += 1
        fields: dict[str, Any] = {
            "registry_port": 0,
            "data_dir": str(overrides.pop("data_dir", tmp_path / f"agent{count}")),
            "default_upstream": Upstream(upstream_url) if upstream_url else None,
            "namespace_upstreams": {},
            "request_timeout": 20.0,
            "idle_timeout": 10.0,
            "connect_timeout": 5.0,
        }
        fields.update(overrides)
        config = dataclasses.replace(AgentConfig(), **fields)
        running: RunningAgent = await nursery.start(run_agent, config)
        return running

    yield start
