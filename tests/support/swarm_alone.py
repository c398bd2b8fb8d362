"""A Swarm with nobody connected: a real BlobAssembly on a real content store, for unit tests
that drive the swarm's scheduling by hand (peers are stand-ins the test adds)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.assembly import BlobAssembly
from agent.content_store import ContentStore
from agent.swarm import Swarm, _Peer
from p2preg.digest import Digest
from p2preg.metainfo import MetaInfo, piece_hash
from p2preg.wire import Cancel, Request


@contextlib.asynccontextmanager
async def swarm_alone(
    tmp_path: Path, pieces: int, piece_length: int
) -> AsyncIterator[tuple[Swarm, bytes]]:
    """A swarm for a random blob of ``pieces`` whole pieces (its hashes known), and the blob."""
    data = os.urandom(pieces * piece_length)
    digest = Digest.of_bytes(data)
    metainfo = MetaInfo.empty(digest, len(data), piece_length).with_hashes(
        (i, piece_hash(data[i * piece_length : (i + 1) * piece_length])) for i in range(pieces)
    )
    store = ContentStore.open(tmp_path / "store", 64 * piece_length)
    assembly = BlobAssembly(store.new_partial(digest), metainfo, lambda: None)
    try:
        yield Swarm(digest, assembly, identity=None, banned=set()), data  # type: ignore[arg-type]
    finally:
        await assembly.abort()


@dataclass(eq=False)
class RecordingLink:
    """Stands in for a PeerLink: what the swarm sends, in order."""

    address: str
    peer_id: bytes
    sent: list[object] = field(default_factory=list)
    arriving: bool = False  # a piece's payload is arriving on it
    last_payload_seconds: float = 0.0  # how long the last piece's payload took (0: none)
    closed: bool = False

    async def send(self, message: object) -> None:
        self.sent.append(message)

    async def send_many(self, messages: Iterable[object]) -> None:
        self.sent.extend(messages)

    async def aclose(self) -> None:
        self.closed = True

    def requests(self) -> list[int]:
        return [m.index for m in self.sent if isinstance(m, Request)]

    def cancels(self) -> list[int]:
        return [m.index for m in self.sent if isinstance(m, Cancel)]


def join(swarm: Swarm, name: str, held: set[int]) -> tuple[_Peer, RecordingLink]:
    """A stand-in peer called ``name`` that holds ``held``, connected to ``swarm``."""
    link = RecordingLink(name, name.encode())
    peer = _Peer(link, held=set(held), counted=True)  # type: ignore[arg-type]
    swarm.peers[link.peer_id] = peer
    swarm.picker.add_peer(peer.held)
    return peer, link
