"""Moving a request that waits at a busy peer to a peer we ask nothing of (agent/swarm.py).

The policy is ``p2preg.piece_picker.queued_to_take_over`` (shared with the simulator); here the
agent's side of it: what goes on the wire, the picker's bookkeeping, and a moved piece that the
first peer had already started (the Cancel crossed it on the wire) arriving anyway.
A real BlobAssembly on a real content store; only the peer connections are stand-ins that
record what the swarm sends.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from agent.swarm import Swarm
from p2preg.errors import RemoteProtocolError
from p2preg.piece_picker import queued_to_take_over
from p2preg.wire import Piece
from tests.support.swarm_alone import join

PIECE = 1024 * 1024  # 1 MiB pieces: 8 requests in flight per peer (8 MiB)


async def test_an_idle_peer_takes_over_requests_queued_behind_another(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    busy, busy_link = join(s, "busy", {0, 1, 2, 3, 4, 5})
    await s._fill(busy)
    assert len(busy_link.requests()) == 6  # everything, in the order the picker chose
    head = busy_link.requests()[0]

    idle, idle_link = join(s, "idle", {0, 1, 2, 3, 4, 5})
    await s._fill(idle)  # nothing fresh to pick: it takes over what waits at "busy"
    moved = idle_link.requests()
    assert moved and head not in moved  # the first may be under way: left alone
    assert busy_link.cancels() == moved  # each moved request is cancelled where it waited
    assert set(moved).isdisjoint(busy.in_flight) and set(moved) <= set(idle.in_flight)
    # One request per piece, as before: the picker's bookkeeping did not change.
    assert all(count == 1 for count in s.picker.in_flight.values())
    assert len(s.picker.in_flight) == 6
    assert s.stats["taken_over"] == len(moved)


async def test_no_take_over_from_a_peer_that_refused_us_lately(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    busy, busy_link = join(s, "busy", {0, 1, 2, 3, 4, 5})
    await s._fill(busy)
    fetcher, fetcher_link = join(s, "fetcher", {0, 1, 2, 3, 4, 5})
    fetcher.refused[0] = trio.current_time()  # super-seeding: "get it from a peer"
    await s._fill(fetcher)
    assert fetcher_link.requests() == [] and busy_link.cancels() == []


async def test_a_moved_piece_that_arrives_anyway_is_used_and_its_new_request_cancelled(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, data = swarm
    busy, _ = join(s, "busy", {0, 1, 2, 3, 4, 5})
    await s._fill(busy)
    idle, idle_link = join(s, "idle", {0, 1, 2, 3, 4, 5})
    await s._fill(idle)
    index = idle_link.requests()[0]
    # "busy" had started it before our Cancel arrived: the piece comes from there after all.
    await s._piece(busy, Piece(s.digest, index, data[index * PIECE : (index + 1) * PIECE]))
    assert index in s.assembly.pieces
    assert idle_link.cancels() == [index] and index not in idle.in_flight
    assert s.stats["pieces"] == 1


async def test_a_piece_nobody_asked_for_is_still_a_protocol_error(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, data = swarm
    peer, _ = join(s, "peer", {0, 1})
    with pytest.raises(RemoteProtocolError, match="unrequested piece 1"):
        await s._piece(peer, Piece(s.digest, 1, data[PIECE : 2 * PIECE]))


# -- the shared policy ---------------------------------------------------------------------------


def test_policy_leaves_heads_and_respects_room_and_skip() -> None:
    queues = [("a", [5, 6, 7]), ("b", [1, 2]), ("c", [9])]
    assert queued_to_take_over({5, 6, 7, 1, 2, 9}, queues, 10) == [("a", 6), ("a", 7), ("b", 2)]
    assert queued_to_take_over({6, 7, 2}, queues, 2) == [("a", 6), ("a", 7)]
    assert queued_to_take_over({6, 7, 2}, queues, 5, skip={6}) == [("a", 7), ("b", 2)]
    assert queued_to_take_over({6}, queues, 0) == []


@given(
    held=st.sets(st.integers(0, 30)),
    queues=st.lists(st.lists(st.integers(0, 30), unique=True, max_size=6), max_size=5),
    room=st.integers(0, 8),
    skip=st.sets(st.integers(0, 30)),
)
def test_policy_moves_only_queued_held_unskipped_pieces(
    held: set[int], queues: list[list[int]], room: int, skip: set[int]
) -> None:
    keyed = list(enumerate(queues))
    moves = queued_to_take_over(held, keyed, room, skip)
    assert len(moves) <= room
    for key, index in moves:
        assert index in held and index not in skip
        assert index in queues[key][1:]  # never the first: it may be under way
    assert len(set(moves)) == len(moves)
