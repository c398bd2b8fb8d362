"""Super-seeding at the origin fetcher (agent/peer_server.py): an agent that fetched a blob from
the origin sends each piece to one peer; a second asker is refused while the first receiver is
still connected, for at most SUPER_SEED_HOLD per asker. During the fetch and after it
(p2preg.swarm_limits explains why)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agent.content_store import ContentStore
from agent.peer_server import PeerServer, PieceSource
from p2preg.bitfield import Bitfield
from p2preg.digest import Digest
from p2preg.metainfo import MetaInfo, piece_hash
from p2preg.swarm_limits import LARGE_SWARM_PEERS, SUPER_SEED_HOLD
from p2preg.token_bucket import RateLimiter
from p2preg.wire import Message, Reject, Request

PIECE = 64 * 1024
PIECES = 4


class RecordingLink:
    """Stands in for a PeerLink: keeps what the server sends on it."""

    def __init__(self, name: str) -> None:
        self.address = name
        self.sent: list[object] = []

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def send_piece(self, digest: Digest, index: int, fd: int, offset: int, n: int) -> None:
        self.sent.append(("piece", index, len(os.pread(fd, n, offset))))


@pytest.fixture
def blob(tmp_path: Path) -> Iterator[tuple[Digest, MetaInfo, Path]]:
    data = os.urandom(PIECES * PIECE)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = Digest.of_bytes(data)
    metainfo = MetaInfo.empty(digest, len(data), PIECE).with_hashes(
        (i, piece_hash(data[i * PIECE : (i + 1) * PIECE])) for i in range(PIECES)
    )
    yield digest, metainfo, path


class Source:
    """The blob as the agent's downloads offer it to the peer server: whole, and still
    ``fetching`` from the origin until the test says otherwise."""

    def __init__(self, blob: tuple[Digest, MetaInfo, Path], fetching: bool) -> None:
        self.digest, self.metainfo, self.path = blob
        self.fetching = fetching

    def __call__(self, digest: Digest) -> PieceSource | None:
        if digest != self.digest:
            return None
        return PieceSource(
            self.metainfo,
            Bitfield.full(PIECES),
            self.fetching,
            lambda: os.open(self.path, os.O_RDONLY),
        )


def _server(tmp_path: Path) -> PeerServer:
    store = ContentStore.open(tmp_path / "store", 1 << 20)
    return PeerServer(os.urandom(16), b"s" * 32, store, RateLimiter(None), RateLimiter(None))


def _fetcher(
    tmp_path: Path, blob: tuple[Digest, MetaInfo, Path], swarm_peers: int
) -> tuple[PeerServer, Source, RecordingLink, RecordingLink]:
    """A peer server fetching ``blob`` from the origin in a swarm of ``swarm_peers`` others,
    with two connected askers."""
    server = _server(tmp_path)
    source = Source(blob, fetching=True)
    server.set_active_sources(source)
    server.note_swarm_size(swarm_peers, blob[0])
    first, second = RecordingLink("first"), RecordingLink("second")
    server._live_links.update({first, second})  # type: ignore[arg-type]
    return server, source, first, second


async def test_the_fetcher_refuses_repeats_during_and_after_its_fetch(
    tmp_path: Path, blob: tuple[Digest, MetaInfo, Path]
) -> None:
    digest = blob[0]
    server, source, first, second = _fetcher(tmp_path, blob, 15)  # a small swarm
    late = RecordingLink("late")
    await server._request(first, Request(digest, 1))  # type: ignore[arg-type]
    assert first.sent == [("piece", 1, PIECE)]
    await server._request(second, Request(digest, 1))  # type: ignore[arg-type]
    assert isinstance(second.sent[-1], Reject)  # during the fetch: get it from the first
    source.fetching = False  # the fetch is done; the blob is complete here
    await server._request(second, Request(digest, 1))  # type: ignore[arg-type]
    assert isinstance(second.sent[-1], Reject)  # still: the first receiver is connected
    await server._request(second, Request(digest, 2))  # type: ignore[arg-type]
    assert second.sent[-1] == ("piece", 2, PIECE)  # a piece nobody has from us is sent
    server._live_links.discard(first)  # type: ignore[arg-type]
    server._live_links.add(late)  # type: ignore[arg-type]
    await server._request(late, Request(digest, 1))  # type: ignore[arg-type]
    assert late.sent == [("piece", 1, PIECE)]  # the first receiver left: served again
    assert server.refusals == 2


async def test_an_asker_refused_a_piece_gets_it_once_the_hold_is_over(
    tmp_path: Path, blob: tuple[Digest, MetaInfo, Path], autojump_clock: trio.abc.Clock
) -> None:
    """The first receiver may pass the piece on to nobody (no peer downloads from it): an
    asker that still wants it from the fetcher SUPER_SEED_HOLD after its first refusal gets
    it. The hold is per asker and per piece, counted from the first refusal."""
    digest = blob[0]
    server, _, first, second = _fetcher(tmp_path, blob, 15)
    third = RecordingLink("third")
    server._live_links.add(third)  # type: ignore[arg-type]
    await server._request(first, Request(digest, 0))  # type: ignore[arg-type]
    await server._request(first, Request(digest, 1))  # type: ignore[arg-type]
    await server._request(second, Request(digest, 0))  # type: ignore[arg-type]
    assert isinstance(second.sent[-1], Reject)
    await trio.sleep(SUPER_SEED_HOLD * 0.75)
    await server._request(second, Request(digest, 0))  # type: ignore[arg-type]
    assert isinstance(second.sent[-1], Reject)  # within the hold (from the first refusal)
    await server._request(second, Request(digest, 1))  # type: ignore[arg-type]
    assert isinstance(second.sent[-1], Reject)  # another piece: its own hold starts now
    await server._request(third, Request(digest, 0))  # type: ignore[arg-type]
    assert isinstance(third.sent[-1], Reject)  # another asker: its own hold starts now
    await trio.sleep(SUPER_SEED_HOLD * 0.5)
    await server._request(second, Request(digest, 0))  # type: ignore[arg-type]
    assert second.sent[-1] == ("piece", 0, PIECE)  # the hold is over: served
    await server._request(second, Request(digest, 1))  # type: ignore[arg-type]
    assert isinstance(second.sent[-1], Reject)
    await server._request(third, Request(digest, 0))  # type: ignore[arg-type]
    assert isinstance(third.sent[-1], Reject)
    assert server.refusals == 6


async def test_in_a_large_swarm_the_fetcher_stops_refusing_once_its_fetch_is_done(
    tmp_path: Path, blob: tuple[Digest, MetaInfo, Path]
) -> None:
    digest = blob[0]
    server, source, first, second = _fetcher(tmp_path, blob, LARGE_SWARM_PEERS + 1)
    await server._request(first, Request(digest, 3))  # type: ignore[arg-type]
    await server._request(second, Request(digest, 3))  # type: ignore[arg-type]
    assert isinstance(second.sent[-1], Reject)  # during the fetch: refused, as everywhere
    source.fetching = False
    await server._request(second, Request(digest, 3))  # type: ignore[arg-type]
    assert second.sent[-1] == ("piece", 3, PIECE)


async def test_an_agent_that_did_not_fetch_from_the_origin_serves_everyone(
    tmp_path: Path, blob: tuple[Digest, MetaInfo, Path]
) -> None:
    digest = blob[0]
    server = _server(tmp_path)
    server.set_active_sources(Source(blob, fetching=False))
    links = [RecordingLink(str(n)) for n in range(3)]
    server._live_links.update(links)  # type: ignore[arg-type]
    for link in links:
        await server._request(link, Request(digest, 0))  # type: ignore[arg-type]
        assert link.sent == [("piece", 0, PIECE)]
    assert server.refusals == 0


async def test_a_piece_the_fetcher_could_not_send_is_not_refused_to_others(
    tmp_path: Path, blob: tuple[Digest, MetaInfo, Path]
) -> None:
    """The fetcher's download file closes when the blob is committed; a request that came in
    that moment is answered "not held". It must not count as sent: the emulator's 3-node run
    stalled on its last piece when it did (the first asker had dropped it, everyone else was
    refused while that asker stayed connected)."""
    digest = blob[0]
    server, source, first, second = _fetcher(tmp_path, blob, 2)

    def closed_file(d: Digest) -> PieceSource | None:
        found = source(d)  # (its file closed: nothing can be read from it)
        return (
            None if found is None else PieceSource(found.metainfo, found.pieces, True, lambda: None)
        )

    server.set_active_sources(closed_file)
    await server._request(first, Request(digest, 3))  # type: ignore[arg-type]
    assert isinstance(first.sent[-1], Reject) and first.sent[-1].reason == "piece not held"
    server.set_active_sources(source)
    await server._request(second, Request(digest, 3))  # type: ignore[arg-type]
    assert second.sent == [("piece", 3, PIECE)]
    assert server.refusals == 0
