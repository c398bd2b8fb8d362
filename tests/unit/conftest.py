"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.swarm import Swarm
from tests.support.swarm_alone import swarm_alone

PIECE = 1024 * 1024  # 1 MiB pieces: 8 requests in flight per peer (8 MiB)


@pytest.fixture
async def swarm(tmp_path: Path) -> AsyncIterator[tuple[Swarm, bytes]]:
    """A swarm for a blob of 6 pieces of ``PIECE``, nobody connected, and the blob."""
    async with swarm_alone(tmp_path, 6, PIECE) as made:
        yield made
