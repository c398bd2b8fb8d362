"""How many peers a blob is downloaded from at once, by the swarm's size (p2preg.swarm_limits,
agent/swarm.py). Shared with the simulator (tests/unit/test_simulator.py checks it imports it)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.swarm import Swarm, _Peer
from p2preg.swarm_limits import (
    DOWNLOAD_PEERS,
    FEW_PEERS_DOWNLOAD_PEERS,
    LARGE_SWARM_PEERS,
    MID_SWARM_DOWNLOAD_PEERS,
    SMALL_SWARM_DOWNLOAD_PEERS,
    SMALL_SWARM_PEERS,
    download_peers,
    head_patience,
    rotates_peers,
)
from p2preg.upload_order import HEAD_PATIENCE
from tests.support.swarm_alone import swarm_alone

PIECE = 256 * 1024


def test_policy_large_swarms_download_from_more_peers() -> None:
    assert download_peers(None) == DOWNLOAD_PEERS
    assert download_peers(0) == download_peers(SMALL_SWARM_PEERS) == SMALL_SWARM_DOWNLOAD_PEERS
    assert download_peers(SMALL_SWARM_PEERS + 1, 3) == MID_SWARM_DOWNLOAD_PEERS
    assert download_peers(LARGE_SWARM_PEERS, 500) == MID_SWARM_DOWNLOAD_PEERS
    assert download_peers(LARGE_SWARM_PEERS + 1) == download_peers(10_000) == DOWNLOAD_PEERS
    assert (
        SMALL_SWARM_DOWNLOAD_PEERS
        < FEW_PEERS_DOWNLOAD_PEERS
        < MID_SWARM_DOWNLOAD_PEERS
        < DOWNLOAD_PEERS
    )


def test_policy_a_swarm_small_at_two_announces_in_a_row_downloads_from_more_peers() -> None:
    small = SMALL_SWARM_PEERS
    assert download_peers(small, small) == download_peers(3, 0) == FEW_PEERS_DOWNLOAD_PEERS
    # The first count of a rollout is small for everyone: not enough on its own, for a small
    # swarm or a mid-size one.
    assert download_peers(3, None) == SMALL_SWARM_DOWNLOAD_PEERS
    assert download_peers(LARGE_SWARM_PEERS, None) == SMALL_SWARM_DOWNLOAD_PEERS
    # Come down to it from a larger count: a small swarm too.
    assert download_peers(small, small + 1) == FEW_PEERS_DOWNLOAD_PEERS
    # Grown past it: the mid-size limit, then the large one.
    assert download_peers(small + 1, small) == MID_SWARM_DOWNLOAD_PEERS
    assert download_peers(LARGE_SWARM_PEERS + 1, small) == DOWNLOAD_PEERS
    assert FEW_PEERS_DOWNLOAD_PEERS <= SMALL_SWARM_PEERS


def test_policy_withdrawal_and_rotation_from_17_others_and_a_second_count() -> None:
    """p2preg.swarm_limits: a node of a mid-size swarm withdraws requests that waited
    HEAD_PATIENCE and rotates a peer per answer, as in a large one; not in a small swarm, and
    not at a first count, which at a rollout's start sees a fraction of the swarm (with those
    rules at the first count, 1,000 nodes in 3 zones went from p99 1.23 to 1.27 x the bound)."""
    mid, small, large = SMALL_SWARM_PEERS + 1, SMALL_SWARM_PEERS, LARGE_SWARM_PEERS
    for rule in (head_patience, rotates_peers):
        on = [rule(None), rule(large + 1), rule(large + 1, None), rule(mid, 3), rule(large, 500)]
        off = [rule(small), rule(small, small), rule(3, 500), rule(mid), rule(large, None)]
        assert [x == rule(None) for x in on] == [True] * 5
        assert [x == rule(small) for x in off] == [True] * 5
    assert head_patience(None) == HEAD_PATIENCE and head_patience(small) == math.inf
    assert rotates_peers(None) and not rotates_peers(small)


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


async def test_a_swarm_that_shrinks_drops_the_extra_peers_but_the_busy_ones(
    swarm: Swarm,
) -> None:
    addresses = [f"10.0.0.{i}:7000" for i in range(1, 21)]
    swarm.add_addresses(addresses)
    swarm.note_swarm_size(SMALL_SWARM_PEERS + 4)
    swarm.note_swarm_size(SMALL_SWARM_PEERS + 4)  # a mid-size swarm at a second count: 16 peers
    nursery = CountingNursery()
    swarm._dial_more(nursery)  # type: ignore[arg-type]
    assert nursery.addresses == addresses[:MID_SWARM_DOWNLOAD_PEERS]
    # Say they all connected, three with requests out.
    links = [ClosableLink(address, bytes([n]) * 16) for n, address in enumerate(nursery.addresses)]
    swarm._dialing.clear()
    for n, link in enumerate(links):
        peer = _Peer(link)  # type: ignore[arg-type]
        if n < 3:
            peer.in_flight[n] = 0.0
            swarm.picker.request_started(n)
        swarm.peers[link.peer_id] = peer
    swarm.note_swarm_size(SMALL_SWARM_PEERS - 1)  # peers left: a small swarm, 12
    await swarm._drop_extra()
    assert len(swarm.peers) == FEW_PEERS_DOWNLOAD_PEERS
    closed = [link for link in links if link.closed]
    assert len(closed) == MID_SWARM_DOWNLOAD_PEERS - FEW_PEERS_DOWNLOAD_PEERS
    assert not {link.address for link in closed} & set(addresses[:3])  # busy ones stay
    assert swarm.stats["dropped_extra"] == len(closed)


class ClosableLink:
    """Stands in for a PeerLink the swarm may close."""

    def __init__(self, address: str, peer_id: bytes) -> None:
        self.address = address
        self.peer_id = peer_id
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True
