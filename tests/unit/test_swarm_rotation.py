"""Rotating a download peer at each tracker answer in a swarm of more than 16 others
(agent/swarm.py, Swarm.rotate; the choices are p2preg.peer_rotation's, shared with the
simulator). A real BlobAssembly on a real content store; the peers are stand-ins that record
what the swarm sends.
"""

from __future__ import annotations

from typing import Any

import trio

from agent.swarm import REDIAL_BACKOFF, Swarm, _Peer
from p2preg.swarm_limits import FEW_PEERS_DOWNLOAD_PEERS, SMALL_SWARM_PEERS
from p2preg.upload_order import HEAD_PATIENCE
from tests.support.swarm_alone import RecordingLink, join

ALL = set(range(6))  # (the conftest's swarm: 6 pieces)


class _Nursery:
    """Records the tasks Swarm._dial_more starts (one per address it dials)."""

    def __init__(self) -> None:
        self.dialled: list[str] = []

    def start_soon(self, _task: Any, address: str) -> None:
        self.dialled.append(address)


def _full(s: Swarm, swarm_size: int = 1000) -> list[tuple[_Peer, RecordingLink]]:
    """Connected to as many peers as the limit for a swarm of ``swarm_size`` others, each
    holding every piece, their addresses p0, p1, ..."""
    s.note_swarm_size(swarm_size)
    peers = [join(s, f"p{i}", ALL) for i in range(s._max_peers)]
    s.add_addresses([link.address for _, link in peers])
    return peers


async def _starve(s: Swarm, peer: _Peer) -> set[int]:
    """Ask ``peer`` for pieces and let the first wait past the patience (withdrawn); the
    pieces asked of it."""
    await s._fill(peer)
    asked = set(peer.in_flight)
    head, sent_at = next(iter(peer.in_flight.items()))
    await s._withdraw_stalled_head(peer, sent_at + HEAD_PATIENCE)
    assert peer.withdrawn == 1 and head not in peer.in_flight
    return asked


async def test_a_full_agent_swaps_the_peer_where_requests_starved_for_one_of_the_answer(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    peers = _full(s)
    crowded, crowded_link = peers[3]
    asked = await _starve(s, crowded)

    await s.rotate(["p0", "p3", "fresh"])

    assert b"p3" not in s.peers and crowded_link.closed
    assert s.stats["rotated"] == 1
    assert not asked & set(s.picker.in_flight), "its requests did not go back to the picker"
    # The answer's new peer is dialled in its place, and the dropped one is not redialled.
    nursery = _Nursery()
    s._dial_more(nursery)  # type: ignore[arg-type]
    assert nursery.dialled == ["fresh"]
    assert s._failed["p3"] > trio.current_time() - REDIAL_BACKOFF


async def test_no_swap_where_no_request_starved(swarm: tuple[Swarm, bytes]) -> None:
    s, _ = swarm
    peers = _full(s)
    for peer, _ in peers:
        peer.delivered = 0  # (some delivered nothing at all: they stay all the same)
    peers[0][0].delivered = 5
    await s.rotate(["fresh"])
    assert len(s.peers) == len(peers) and s.stats["rotated"] == 0
    assert "fresh" not in s._addresses[:1]


async def test_no_swap_below_the_limit_or_in_a_swarm_of_up_to_16_others(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    s.note_swarm_size(SMALL_SWARM_PEERS)
    peers = _full(s, swarm_size=SMALL_SWARM_PEERS)  # 12 download peers (a second small count)
    assert len(peers) == FEW_PEERS_DOWNLOAD_PEERS
    peers[2][0].withdrawn = 4  # (counted as if withdrawn: head_patience is off at this size)
    await s.rotate(["fresh"])
    assert len(s.peers) == FEW_PEERS_DOWNLOAD_PEERS and s.stats["rotated"] == 0

    s.note_swarm_size(SMALL_SWARM_PEERS + 1)  # room for 16 now: no swap while there is room
    peers[2][0].withdrawn = 4
    await s.rotate(["fresh"])
    assert len(s.peers) == FEW_PEERS_DOWNLOAD_PEERS and s.stats["rotated"] == 0


async def test_our_only_source_of_a_missing_piece_is_kept(swarm: tuple[Swarm, bytes]) -> None:
    s, _ = swarm
    s.note_swarm_size(1000)
    others = [join(s, f"p{i}", {0, 1, 2, 3, 4}) for i in range(s._max_peers - 1)]
    sole, sole_link = join(s, "sole", {5})  # (the fetcher: the newest pieces are only there)
    sole.withdrawn = 3
    others[1][0].withdrawn = 1
    await s.rotate(["fresh"])
    assert b"sole" in s.peers and not sole_link.closed
    assert b"p1" not in s.peers


async def test_the_counts_restart_at_every_answer(swarm: tuple[Swarm, bytes]) -> None:
    s, _ = swarm
    peers = _full(s)
    await _starve(s, peers[3][0])
    await s.rotate(["p0", "p1"])  # nobody new in the answer: nothing to swap to
    assert len(s.peers) == len(peers) and peers[3][0].withdrawn == 0
    await s.rotate(["fresh"])  # nothing starved since the last answer
    assert len(s.peers) == len(peers) and s.stats["rotated"] == 0


async def test_the_peer_dialled_in_is_new_not_dialling_and_not_dropped_lately(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    peers = _full(s)
    s._failed["x"] = trio.current_time()  # dropped or failed a moment ago
    s._dialing.add("y")
    await _starve(s, peers[0][0])
    await s.rotate(["p1", "x", "y", "z"])
    assert s._addresses[0] == "z"


async def test_at_a_slow_pace_two_starved_peers_are_swapped_for_two_of_the_answer(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    peers = _full(s)
    (first, first_link), (second, second_link) = peers[2], peers[5]
    asked = await _starve(s, first) | await _starve(s, second)
    second.withdrawn = 2  # the more starved: it goes first
    peers[0][0].delivered = 9  # (not starved: it stays whatever it delivered)

    await s.rotate(["p0", "new1", "new2", "new3"], count=2)

    assert b"p2" not in s.peers and b"p5" not in s.peers
    assert first_link.closed and second_link.closed
    assert s.stats["rotated"] == 2 and len(s.peers) == len(peers) - 2
    assert not asked & set(s.picker.in_flight), "their requests did not go back to the picker"
    # Two distinct peers of the answer are dialled in their places, neither dropped one again.
    nursery = _Nursery()
    s._dial_more(nursery)  # type: ignore[arg-type]
    assert len(set(nursery.dialled[:2])) == 2 and set(nursery.dialled[:2]) <= {
        "new1",
        "new2",
        "new3",
    }
    assert "p2" not in nursery.dialled and "p5" not in nursery.dialled


async def test_no_more_swaps_than_starved_peers_or_new_peers_of_the_answer(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    peers = _full(s)
    await _starve(s, peers[1][0])
    await s.rotate(["new1", "new2"], count=2)  # one starved peer: one swap
    assert s.stats["rotated"] == 1 and b"p1" not in s.peers

    join(s, "new1", ALL)  # (full again: the dialled peer connected)
    await _starve(s, peers[3][0])
    await _starve(s, peers[4][0])
    await s.rotate(["p0", "new3"], count=2)  # one new peer in the answer: one swap
    assert s.stats["rotated"] == 2
    assert (b"p3" in s.peers) != (b"p4" in s.peers)
