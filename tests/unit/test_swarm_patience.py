"""Withdrawing a request that waits too long at one peer for an upload slot (agent/swarm.py,
Swarm._withdraw_stalled_head; the patience is p2preg.upload_order.HEAD_PATIENCE, shared with the
simulator). A real BlobAssembly on a real content store; the peers are stand-ins that record
what the swarm sends.
"""

from __future__ import annotations

import math

import trio

from agent.swarm import REFUSAL_BACKOFF, Swarm, _Peer
from p2preg.swarm_limits import (
    PATIENCE_PIECE_TIMES,
    SMALL_SWARM_PEERS,
    patience_for,
    piece_seconds_after,
)
from p2preg.upload_order import HEAD_PATIENCE
from p2preg.wire import Piece
from tests.support.swarm_alone import RecordingLink, join

PIECE = 1024 * 1024  # (the conftest's swarm)


async def _asked(s: Swarm, held: set[int]) -> tuple[_Peer, RecordingLink, int]:
    """A peer holding ``held`` that we asked for what it has; and the first piece asked."""
    peer, link = join(s, "slow", held)
    await s._fill(peer)
    return peer, link, link.requests()[0]


async def test_a_head_that_waited_past_the_patience_goes_to_another_peer(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    slow, slow_link, head = await _asked(s, {0, 1, 2})
    sent_at = slow.in_flight[head]

    await s._withdraw_stalled_head(slow, sent_at + HEAD_PATIENCE * 0.9)
    assert slow_link.cancels() == [], "withdrawn before its time"

    await s._withdraw_stalled_head(slow, sent_at + HEAD_PATIENCE)
    assert slow_link.cancels() == [head]
    assert head not in slow.in_flight and head in slow.cancelled
    assert head not in s.picker.in_flight  # free to be asked of anyone
    assert s.stats["withdrawn"] == 1
    # Only the head: the requests behind it stay.
    assert list(slow.in_flight) == slow_link.requests()[1:]

    other, other_link = join(s, "other", {head})
    await s._fill(other)
    assert other_link.requests() == [head]


async def test_the_withdrawn_piece_is_not_asked_of_the_same_peer_again_at_once(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    slow, slow_link, head = await _asked(s, {0, 1, 2})
    now = slow.in_flight[head] + HEAD_PATIENCE
    await s._withdraw_stalled_head(slow, now)
    await s._fill(slow)
    assert slow_link.requests().count(head) == 1, "asked again of the peer that stalled it"
    assert head in slow.refused and slow.refusals_until == now + REFUSAL_BACKOFF


async def test_a_head_whose_payload_is_arriving_is_left_alone(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    slow, slow_link = join(s, "slow", {0, 1})
    await s._fill(slow)
    slow_link.arriving = True  # it is being sent: slow, not stalled
    await s._withdraw_stalled_head(slow, trio.current_time() + 10 * HEAD_PATIENCE)
    assert slow_link.cancels() == []


async def test_the_wait_counts_from_the_previous_piece(
    swarm: tuple[Swarm, bytes],
) -> None:
    """Requests behind others wait for those first: the head's wait for a slot starts when
    the piece before it arrived, not when it was sent."""
    s, data = swarm
    peer, link = join(s, "peer", {0, 1, 2})
    await s._fill(peer)
    first, second = link.requests()[:2]
    await s._piece(peer, Piece(s.digest, first, data[first * PIECE : (first + 1) * PIECE]))
    arrived = peer.last_arrival
    peer.in_flight[second] = arrived - 5 * HEAD_PATIENCE  # sent long before: waited behind
    await s._withdraw_stalled_head(peer, arrived + 0.5 * HEAD_PATIENCE)
    assert link.cancels() == [] and second in peer.in_flight
    await s._withdraw_stalled_head(peer, arrived + HEAD_PATIENCE)
    assert link.cancels() == [second]


async def test_a_withdrawn_piece_that_arrives_anyway_is_used(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, data = swarm
    slow, _, head = await _asked(s, {0, 1})
    await s._withdraw_stalled_head(slow, slow.in_flight[head] + HEAD_PATIENCE)
    # The peer had begun sending it when our Cancel arrived.
    await s._piece(slow, Piece(s.digest, head, data[head * PIECE : (head + 1) * PIECE]))
    assert head in s.assembly.pieces and s.stats["pieces"] == 1


async def test_no_withdrawing_in_a_swarm_of_up_to_16_others(
    swarm: tuple[Swarm, bytes],
) -> None:
    s, _ = swarm
    s.note_swarm_size(SMALL_SWARM_PEERS)  # (p2preg.swarm_limits.head_patience)
    slow, slow_link = join(s, "slow", {0, 1})
    await s._fill(slow)
    await s._withdraw_stalled_head(slow, trio.current_time() + 100 * HEAD_PATIENCE)
    assert slow_link.cancels() == []
    s.note_swarm_size(SMALL_SWARM_PEERS + 1)
    await s._withdraw_stalled_head(slow, trio.current_time() + 100 * HEAD_PATIENCE)
    assert len(slow_link.cancels()) == 1


async def test_where_pieces_arrive_slowly_a_request_waits_two_piece_times(
    swarm: tuple[Swarm, bytes],
) -> None:
    """p2preg.swarm_limits.patience_for: at 1 MiB/s a piece takes 1.5 s through one of a
    sender's slots, and a 1 s patience withdrew most requests (238 duplicate pieces in a
    32-node emulated rollout). The patience is at least PATIENCE_PIECE_TIMES times the mean
    time the payload of a piece took to arrive."""
    s, data = swarm
    peer, link = join(s, "peer", {0, 1, 2})
    await s._fill(peer)
    first, second = link.requests()[:2]
    link.last_payload_seconds = 2.0  # (PeerLink measures it, first byte to last)
    await s._piece(peer, Piece(s.digest, first, data[first * PIECE : (first + 1) * PIECE]))
    arrived = peer.last_arrival
    patience = PATIENCE_PIECE_TIMES * 2.0
    assert patience > HEAD_PATIENCE
    await s._withdraw_stalled_head(peer, arrived + 0.9 * patience)
    assert link.cancels() == [] and second in peer.in_flight
    await s._withdraw_stalled_head(peer, arrived + patience)
    assert link.cancels() == [second]


def test_patience_in_piece_times_rules() -> None:
    assert patience_for(HEAD_PATIENCE, 0.0) == HEAD_PATIENCE  # no piece yet
    assert patience_for(HEAD_PATIENCE, 0.06) == HEAD_PATIENCE  # 100 MiB/s: seconds rule
    assert patience_for(HEAD_PATIENCE, 1.5) == PATIENCE_PIECE_TIMES * 1.5
    assert patience_for(math.inf, 1.5) == math.inf  # never stays never
    assert piece_seconds_after(0.0, 1.5) == 1.5  # the first piece sets the mean
    mean = 1.0
    for _ in range(40):
        mean = piece_seconds_after(mean, 3.0)
    assert 2.99 < mean < 3.0  # it follows a new rate within a few dozen pieces
