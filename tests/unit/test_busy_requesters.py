"""Busy requesters wait (p2preg.upload_order, wire version 3): a downloader receiving
BUSY_INCOMING_PIECES pieces at once says so to the peers it has requests at, and they serve
requesters that are not busy first.

- the order: not busy first, then least sent, whatever the arrival order; a flag that changes
  while the request waits counts;
- a real download connection counts the pieces whose payload is arriving (agent/peer_link.py),
  also one cut off by a close;
- the agent-wide count tells every download connection with requests out when it changes,
  once, and the others along with their next requests (agent/incoming_pieces.py, swarm.py);
- a peer server records what its subscriber said (agent/peer_server.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from agent.incoming_pieces import IncomingPieces
from agent.peer_link import PeerGone, PeerLink
from agent.peer_server import PeerServer, UploadSlots, _Subscriber
from p2preg.digest import Digest
from p2preg.upload_order import BUSY_INCOMING_PIECES, upload_rank
from p2preg.wire import Busy, Have, Piece, Request
from tests.support.swarm_alone import swarm_alone
from tests.unit.test_message_costs import SwarmLink, _join, _link_pair, _server

D = Digest.parse("sha256:" + "cd" * 32)


def test_policy_a_busy_requester_waits_behind_every_other() -> None:
    assert upload_rank(9, 0, requester_busy=False) < upload_rank(0, 0, True)
    assert upload_rank(0, 9, True) < upload_rank(1, 0, True)  # then least sent
    assert upload_rank(3, 0) == upload_rank(3, 0, False)  # (the default)
    assert BUSY_INCOMING_PIECES >= 2  # (one piece at a time is not "at once")


async def test_requesters_that_are_not_busy_go_first_by_their_latest_word() -> None:
    slots = UploadSlots(1)
    slots.sent[(D, 2)] = 3  # piece 2 went out three times already; 1 and 3 never
    busy = {1: True, 2: False, 3: True}
    order: list[int] = []
    release = trio.Event()

    async def send(index: int) -> None:
        async with slots.slot((D, index), lambda: 0, lambda: busy.get(index, False)):
            order.append(index)
            if index == 0:
                await release.wait()

    async with trio.open_nursery() as nursery:
        for index in (0, 1, 2, 3):  # 0 holds the slot; 1, 2, 3 wait in this order
            nursery.start_soon(send, index)
            await trio.testing.wait_all_tasks_blocked()
        busy[3] = False  # 3's requester is no longer busy when the slot frees
        release.set()
    # 3: not busy and never sent; 2: not busy (sent three times); 1: busy, last.
    assert order == [0, 3, 2, 1]


async def _send_piece_in_two_parts(
    sender: PeerLink, receiver: PeerLink, data: bytes
) -> tuple[list[int], Piece]:
    """``sender`` sends a piece whose payload stops halfway for a moment; returns the
    receiver's arrival count while it waited for the rest, and the piece it got."""
    incoming = receiver.incoming
    assert incoming is not None
    seen: list[int] = []
    header = sender.connection.piece_header(D, 0, len(data))
    half = len(data) // 2
    got: list[Piece] = []

    async def receive() -> None:
        event = await receiver.receive()
        assert isinstance(event, Piece)
        got.append(event)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await sender.stream.send_all(header + data[:half])
        with trio.fail_after(5):
            while incoming.arriving == 0:  # noqa: ASYNC110 (set inside receive; polled)
                await trio.sleep(0.005)
        seen.append(incoming.arriving)
        await trio.sleep(0.1)  # (the payload takes at least this long to arrive)
        await sender.stream.send_all(data[half:])
    seen.append(incoming.arriving)
    return seen, got[0]


async def test_a_download_connection_counts_a_piece_while_its_payload_arrives() -> None:
    dialer, listener_side, listener = await _link_pair()
    incoming = IncomingPieces(busy_at=1)
    dialer.incoming = incoming
    data = os.urandom(600_000)
    try:
        assert dialer.last_payload_seconds == 0.0
        seen, piece = await _send_piece_in_two_parts(listener_side, dialer, data)
        assert seen == [1, 0] and piece.data == data
        assert incoming.busy is False  # (busy at 1 arriving; none now)
        # How long its payload took, first byte to last (the patience in piece times).
        assert 0.1 <= dialer.last_payload_seconds < 5

        # A piece cut off by the close no longer arrives.
        await listener_side.stream.send_all(listener_side.connection.piece_header(D, 1, 10**6))
        await listener_side.stream.send_all(b"x" * 1000)
        async with trio.open_nursery() as nursery:

            async def receive_until_closed() -> None:
                with pytest.raises(PeerGone):
                    await dialer.receive()

            nursery.start_soon(receive_until_closed)
            with trio.fail_after(5):
                while incoming.arriving == 0:  # noqa: ASYNC110 (as above)
                    await trio.sleep(0.005)
            assert incoming.busy
            measured = dialer.last_payload_seconds
            await dialer.aclose()
        assert incoming.arriving == 0 and not incoming.busy
        assert dialer.last_payload_seconds == measured  # (a cut-off piece is not timed)
    finally:
        await dialer.aclose()
        await listener_side.aclose()
        await listener.aclose()


@contextlib.asynccontextmanager
async def _two_link_pairs() -> AsyncIterator[tuple[PeerLink, PeerLink, PeerLink, PeerLink]]:
    """Two real connections over loopback: (dialer a, its server side, dialer b, its server
    side), all closed at the end."""
    dialer_a, server_a, listener_a = await _link_pair()
    dialer_b, server_b, listener_b = await _link_pair()
    try:
        yield dialer_a, server_a, dialer_b, server_b
    finally:
        for link in (dialer_a, server_a, dialer_b, server_b):
            await link.aclose()
        await listener_a.aclose()
        await listener_b.aclose()


async def test_changes_reach_the_peers_with_requests_out_once_and_the_others_later() -> None:
    async with _two_link_pairs() as (dialer_a, server_a, dialer_b, server_b):
        incoming = IncomingPieces(busy_at=2)
        requests_out = {dialer_a: True, dialer_b: False}
        incoming.watch(dialer_a, lambda: requests_out[dialer_a])
        incoming.watch(dialer_b, lambda: requests_out[dialer_b])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(incoming.run)
            incoming.piece_started()
            await trio.testing.wait_all_tasks_blocked()
            assert not incoming.busy and incoming.messages_sent == 0  # (one is not many)
            incoming.piece_started()
            incoming.piece_ended()
            incoming.piece_started()  # busy, not, busy again before the task ran: one message
            await trio.testing.wait_all_tasks_blocked()
            assert incoming.busy and incoming.messages_sent == 1
            with trio.fail_after(5):
                assert await server_a.receive() == Busy(True)
            # b has no requests out: it hears it along with its next ones (Swarm._fill).
            assert dialer_b.told_busy is False
            assert incoming.due(dialer_b) == Busy(True) and incoming.due(dialer_b) is None
            requests_out[dialer_b] = True  # (as if those requests went out with it)

            incoming.piece_ended()  # not busy any more: a hears it, b too now
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(5):
                assert await server_a.receive() == Busy(False)
                assert await server_b.receive() == Busy(False)
            assert incoming.messages_sent == 3

            incoming.unwatch(dialer_a)  # a connection that ended hears nothing more
            incoming.piece_started()
            await trio.testing.wait_all_tasks_blocked()
            assert incoming.messages_sent == 4 and dialer_a.told_busy is False
            with trio.fail_after(5):
                assert await server_b.receive() == Busy(True)
            await dialer_a.send(Have(D, 5))  # (the next thing a receives is not a busy)
            with trio.fail_after(5):
                assert await server_a.receive() == Have(D, 5)
            nursery.cancel_scope.cancel()


async def test_a_peer_that_stops_reading_holds_up_only_its_own_message() -> None:
    async with _two_link_pairs() as (dialer_a, server_a, dialer_b, server_b):
        # Small buffers at both ends of a: once a few KiB are in flight, its sends block for good.
        dialer_a.stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
        server_a.stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        incoming = IncomingPieces(busy_at=1)
        incoming.watch(dialer_a, lambda: True)
        incoming.watch(dialer_b, lambda: True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(incoming.run)

            flooded = 0

            async def flood() -> None:  # a's peer never reads: this blocks, holding a's link
                nonlocal flooded
                for i in range(10**6):
                    await dialer_a.send(Have(D, i))
                    flooded += 1

            nursery.start_soon(flood)
            with trio.fail_after(10):  # until the flood is stuck for good
                stuck_for, last = 0, -1
                while stuck_for < 5:
                    await trio.sleep(0.1)
                    stuck_for, last = (stuck_for + 1 if flooded == last else 0), flooded
            assert dialer_a._send_lock.locked()
            incoming.piece_started()
            with trio.fail_after(5):
                assert await server_b.receive() == Busy(True)
            assert dialer_a.told_busy  # (its message waits behind the flood)
            nursery.cancel_scope.cancel()


def test_busy_at_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        IncomingPieces(busy_at=0)


async def test_new_requests_carry_the_busy_flag_their_peer_has_not_heard(tmp_path: Path) -> None:
    async with swarm_alone(tmp_path, 8, 1024 * 1024) as (swarm, _):
        incoming = IncomingPieces(busy_at=1)
        swarm._incoming = incoming
        a = _join(swarm, "a", {0, 1})
        incoming.piece_started()
        await swarm._fill(a)
        sent = a.link.sent  # type: ignore[attr-defined]
        assert sent[0] == Busy(True)  # first: it ranks the requests that follow
        assert {m.index for m in sent[1:] if isinstance(m, Request)} == {0, 1}
        incoming.piece_ended()
        await swarm._fill(a)  # nothing new to ask: nothing sent (the task tells it)
        assert len(a.link.sent) == len(sent)  # type: ignore[attr-defined]


async def test_the_peer_server_records_what_a_subscriber_said(tmp_path: Path) -> None:
    server: PeerServer = _server(tmp_path)
    subscriber = _Subscriber(SwarmLink("s"))  # type: ignore[arg-type]
    assert not subscriber.is_busy()
    await server._serve_event(subscriber, Busy(True))
    assert subscriber.is_busy()
    await server._serve_event(subscriber, Busy(False))
    assert not subscriber.is_busy()
