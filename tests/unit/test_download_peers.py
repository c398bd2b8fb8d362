"""How many peers a blob is downloaded from at once, by the swarm's size (p2preg.swarm_limits,
agent/swarm.py). Shared with the simulator (tests/unit/test_simulator.py checks it imports it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.swarm import Swarm
from p2preg.swarm_limits import (
    DOWNLOAD_PEERS,
    LARGE_SWARM_PEERS,
    SMALL_SWARM_DOWNLOAD_PEERS,
    download_peers,
)
from tests.support.swarm_alone import swarm_alone

PIECE = 256 * 1024


def test_policy_large_swarms_download_from_more_peers() -> None:
    assert download_peers(None) == DOWNLOAD_PEERS
    assert download_peers(0) == download_peers(LARGE_SWARM_PEERS) == SMALL_SWARM_DOWNLOAD_PEERS
    assert download_peers(LARGE_SWARM_PEERS + 1) == download_peers(10_000) == DOWNLOAD_PEERS
    assert SMALL_SWARM_DOWNLOAD_PEERS < DOWNLOAD_PEERS


class CountingNursery:
    """Stands in for a trio nursery: records the peer tasks the swarm would start."""

    def __init__(self) -> None:
        self.addresses: list[str] = []

    def start_soon(self, fn: Any, address: str) -> None:
        self.addresses.append(address)


@pytest.fixture
async def swarm(tmp_path: Path) -> AsyncIterator[Swarm]:
    async with swarm_alone(tmp_path, 4, PIECE) as (made, _):
        yield made


async def test_the_swarm_dials_as_many_peers_as_the_tracker_s_answer_allows(swarm: Swarm) -> None:
    addresses = [f"10.0.0.{i}:7000" for i in range(1, 51)]
    # A swarm of 16 others, all listed: 8 dialled.
    swarm.note_swarm_size(16)
    swarm.add_addresses(addresses[:16])
    nursery = CountingNursery()
    swarm._dial_more(nursery)  # type: ignore[arg-type]
    assert nursery.addresses == addresses[:SMALL_SWARM_DOWNLOAD_PEERS]
    # The swarm grew past the threshold: the next answer lists 50 of them, so up to 32 at once
    # (the 8 still dialling count).
    swarm.note_swarm_size(LARGE_SWARM_PEERS + 1)
    swarm.add_addresses(addresses)
    swarm._dial_more(nursery)  # type: ignore[arg-type]
    assert nursery.addresses == addresses[:DOWNLOAD_PEERS]
    # Shrinking again dials nobody new and drops nobody.
    swarm.note_swarm_size(3)
    swarm._dial_more(nursery)  # type: ignore[arg-type]
    assert len(nursery.addresses) == DOWNLOAD_PEERS
