"""The agent's per-message savings keep the protocol's behaviour (docs/performance.md):

- a HAVE is not sent to a subscriber that told us (as a peer we download from) that it holds
  the piece (agent/peer_server.py, piece_available);
- a peer link reads every event one read brought in without waiting (``buffered_event``), and
  writes frames straight to the socket when it can (agent/peer_link.py): frames from several
  tasks still never interleave, a full socket buffer falls back to waiting, and a closed link
  never writes to the (reusable) descriptor number it had;
- the swarm's ticker skips a peer whose last fill found nothing until something a pick reads
  changes (a request of ours ended, hashes learned, a refusal ran out, the endgame began).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio
import trio.testing

from agent.content_store import ContentStore
from agent.peer_link import PeerGone, PeerLink
from agent.peer_server import PeerServer, _Subscriber
from agent.swarm import REFUSAL_BACKOFF, Swarm, _Peer
from p2preg.digest import Digest
from p2preg.token_bucket import RateLimiter
from p2preg.wire import Have, KeepAlive, Piece, Reject, Request
from tests.support.swarm_alone import swarm_alone

SECRET = b"k" * 32
DIGEST = Digest.of_bytes(b"blob")


class Subscribed:
    """Stands in for a subscriber's PeerLink: the server reads only its peer id here."""

    def __init__(self, peer_id: bytes) -> None:
        self.peer_id = peer_id
        self.address = peer_id.hex()


def _server(tmp_path: Path) -> PeerServer:
    store = ContentStore.open(tmp_path / "store", 1 << 20)
    return PeerServer(os.urandom(16), SECRET, store, RateLimiter(None), RateLimiter(None))


def test_no_have_for_a_piece_the_subscriber_told_us_it_holds(tmp_path: Path) -> None:
    server = _server(tmp_path)
    holds_1, lacks_1, stranger = (_Subscriber(Subscribed(bytes([n]) * 16)) for n in (1, 2, 3))  # type: ignore[arg-type]
    server._subscribers[DIGEST] = {holds_1, lacks_1, stranger}
    told = {holds_1.link.peer_id: {1, 5}, lacks_1.link.peer_id: {5}}  # (stranger: not a peer)
    lookup = told.get
    server.watch_holdings(DIGEST, lookup)

    server.piece_available(DIGEST, 1)
    assert holds_1.pending == {}
    assert lacks_1.pending == {DIGEST: [1]} and stranger.pending == {DIGEST: [1]}
    assert server.haves_skipped == 1

    server.unwatch_holdings(DIGEST, lookup)  # the download ended: everyone hears again
    server.piece_available(DIGEST, 5)
    assert holds_1.pending == {DIGEST: [5]}
    assert server.haves_skipped == 1


def test_unwatch_leaves_a_newer_download_of_the_same_blob_alone(tmp_path: Path) -> None:
    server = _server(tmp_path)
    first: dict[bytes, set[int]] = {}
    second: dict[bytes, set[int]] = {b"p" * 16: {0}}
    server.watch_holdings(DIGEST, first.get)
    server.watch_holdings(DIGEST, second.get)
    server.unwatch_holdings(DIGEST, first.get)  # (the first swarm's cleanup, late)
    subscriber = _Subscriber(Subscribed(b"p" * 16))  # type: ignore[arg-type]
    server._subscribers[DIGEST] = {subscriber}
    server.piece_available(DIGEST, 0)
    assert subscriber.pending == {} and server.haves_skipped == 1


async def _link_pair() -> tuple[PeerLink, PeerLink, trio.SocketListener]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    unlimited = RateLimiter(None)
    accepted: list[PeerLink] = []

    async def accept() -> None:
        stream = await listener.accept()
        accepted.append(await PeerLink.accept(stream, b"b" * 16, SECRET, unlimited, unlimited))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        dialer = await PeerLink.dial(("127.0.0.1", port), b"a" * 16, SECRET, unlimited, unlimited)
    return dialer, accepted[0], listener


async def test_one_read_yields_every_event_it_completed() -> None:
    dialer, listener_side, listener = await _link_pair()
    try:
        await dialer.send_many(Have(DIGEST, i) for i in range(50))
        await trio.sleep(0.05)  # (all of it in the receiver's socket buffer)
        first = await listener_side.receive()
        rest = []
        while (event := listener_side.buffered_event()) is not None:
            rest.append(event)
        assert [first, *rest] == [Have(DIGEST, i) for i in range(50)]
        assert listener_side.buffered_event() is None  # nothing more, and no waiting
    finally:
        await dialer.aclose()
        await listener_side.aclose()
        await listener.aclose()


async def test_frames_from_many_tasks_arrive_whole_through_a_full_socket_buffer() -> None:
    dialer, listener_side, listener = await _link_pair()
    # A small send buffer, and a reader that starts late: most writes find it full and wait.
    dialer.stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    senders, per_sender = 4, 3000
    received: list[object] = []
    try:
        async with trio.open_nursery() as nursery:

            async def send(sender: int) -> None:
                for i in range(per_sender):
                    await dialer.send(Request(DIGEST, sender * per_sender + i))

            for sender in range(senders):
                nursery.start_soon(send, sender)
            await trio.sleep(0.2)
            while len(received) < senders * per_sender:
                received.append(await listener_side.receive())
    finally:
        await dialer.aclose()
        await listener_side.aclose()
        await listener.aclose()
    indexes = [event.index for event in received if isinstance(event, Request)]
    assert sorted(indexes) == list(range(senders * per_sender))
    for sender in range(senders):  # each task's frames in its own order
        own = [i for i in indexes if i // per_sender == sender]
        assert own == sorted(own)


async def test_a_closed_link_never_writes_to_its_old_descriptor(tmp_path: Path) -> None:
    dialer, listener_side, listener = await _link_pair()
    old_fd = dialer.stream.socket.fileno()
    await dialer.aclose()
    # The descriptor number is free again: a file opened now may well get it.
    path = tmp_path / "innocent"
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    try:
        with pytest.raises(PeerGone):
            await dialer.send(KeepAlive())
        with pytest.raises(PeerGone):
            await dialer.receive()
        assert path.read_bytes() == b"", f"wrote to descriptor {old_fd} after the close"
    finally:
        os.close(fd)
        await listener_side.aclose()
        await listener.aclose()


# -- the ticker skips peers with nothing new (agent/swarm.py, Swarm._nothing_new_for) ----------


class SwarmLink:
    """Stands in for a PeerLink the swarm asks things of."""

    def __init__(self, name: str) -> None:
        self.address = name
        self.peer_id = name.encode()
        self.sent: list[object] = []
        self.told_busy = False  # (agent/incoming_pieces.py)
        self.last_payload_seconds = 0.0  # (PeerLink: how long the last piece's payload took)

    async def send(self, message: object) -> None:
        self.sent.append(message)

    async def send_many(self, messages: Iterable[object]) -> None:
        self.sent.extend(messages)


def _join(swarm: Swarm, name: str, held: set[int]) -> _Peer:
    peer = _Peer(SwarmLink(name), held=set(held), counted=True)  # type: ignore[arg-type]
    swarm.peers[peer.link.peer_id] = peer
    swarm.picker.add_peer(peer.held)
    return peer


async def test_a_peer_with_nothing_new_is_skipped_until_something_a_pick_reads_changes(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with swarm_alone(tmp_path, 8, 1024 * 1024) as (swarm, _):
        a = _join(swarm, "a", {0, 1})
        b = _join(swarm, "b", {2, 3})
        await swarm._fill(a)
        await swarm._fill(b)
        assert set(a.in_flight) == {0, 1} and set(b.in_flight) == {2, 3}
        await swarm._fill(a)  # nothing more to ask a: it is dry now
        assert swarm._nothing_new_for(a, trio.current_time())

        # b refuses piece 2: it is free again, and a may hold it (a pick at a would see it).
        await swarm._handle(b, Reject(swarm.digest, 2, "fetch it from a peer"))
        assert not swarm._nothing_new_for(a, trio.current_time())
        await swarm._fill(a)  # (a does not hold 2: still nothing)
        assert swarm._nothing_new_for(a, trio.current_time())

        # A refusal of a's own runs out: a is filled again then, not before.
        await swarm._handle(a, Reject(swarm.digest, 1, "fetch it from a peer"))
        await swarm._fill(a)
        assert swarm._nothing_new_for(a, trio.current_time())
        mock_clock.jump(REFUSAL_BACKOFF)
        assert not swarm._nothing_new_for(a, trio.current_time())
        await swarm._fill(a)
        assert 1 in a.in_flight  # asked again once the refusal ran out


async def test_the_endgame_wakes_dry_peers(tmp_path: Path) -> None:
    async with swarm_alone(tmp_path, 8, 1024 * 1024) as (swarm, data):
        a = _join(swarm, "a", set(range(7)))
        b = _join(swarm, "b", {6, 7})
        await swarm._fill(a)  # 0-6 requested at a ...
        await swarm._fill(b)  # ... 7 at b
        await swarm._fill(b)
        assert set(b.in_flight) == {7}
        assert swarm._nothing_new_for(b, trio.current_time())  # (6 is out at a already)
        piece = 1024 * 1024
        for index in range(8 - swarm.picker.endgame_pieces):
            await swarm._piece(
                a, Piece(swarm.digest, index, data[index * piece : (index + 1) * piece])
            )
        # Few pieces left, all requested: b may now be asked for a second copy of 6.
        assert not swarm._nothing_new_for(b, trio.current_time())
        await swarm._fill(b)
        assert 6 in b.in_flight


async def test_the_last_request_starting_the_endgame_wakes_dry_peers(tmp_path: Path) -> None:
    """Pieces 7, 8 and 9 missing: once the last of them is requested, a dry peer holding one
    requested elsewhere may be asked for a second copy at the next tick, not only when its own
    piece arrives."""
    async with swarm_alone(tmp_path, 10, 1024 * 1024) as (swarm, _):
        for index in range(7):
            swarm.local_piece(index)
        a = _join(swarm, "a", {7})
        c = _join(swarm, "c", {7, 9})
        b = _join(swarm, "b", {8})
        await swarm._fill(a)  # 7 at a
        await swarm._fill(c)  # 9 at c
        await swarm._fill(c)  # nothing more for c: 8 is not there, and not the endgame yet
        assert set(c.in_flight) == {9}
        assert swarm._nothing_new_for(c, trio.current_time())
        await swarm._fill(b)  # 8 at b: every missing piece is requested now
        assert not swarm._nothing_new_for(c, trio.current_time())
        await swarm._fill(c)
        assert 7 in c.in_flight  # the endgame copy
