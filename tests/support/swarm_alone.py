"""A Swarm with nobody connected: a real BlobAssembly on a real content store, for unit tests
that drive the swarm's scheduling by hand (peers are stand-ins the test adds)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from agent.assembly import BlobAssembly
from agent.content_store import ContentStore
from agent.swarm import Swarm
from p2preg.digest import Digest
from p2preg.metainfo import MetaInfo, piece_hash


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
