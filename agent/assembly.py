"""A blob being put together in its partial file, from the origin (in order) and from peers
(any order, piece by piece).

State, owned by the trio thread (worker threads only report back through callbacks):
- ``metainfo``: size, piece length and the piece hashes known so far (from the tracker, or
  computed here from origin bytes as the prefix hasher passes them);
- ``pieces``: pieces on disk and hash-checked, which may be served to peers;
- ``available``: the contiguous prefix on disk, which the local clients stream and the prefix
  hasher follows (sha256 of the blob, xxh3 of each piece).

Bytes from a peer are written only after their xxh3 matched the published hash; bytes from the
origin cannot be checked piece by piece (the origin is where the hashes come from), so the
blob's sha256 at the end is the gate for everything.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import trio

from agent.content_store import PartialBlob, is_disk_full
from agent.disk_pipeline import PrefixHasher, SequentialWriter
from p2preg.bitfield import Bitfield
from p2preg.errors import RegistryError
from p2preg.metainfo import MetaInfo

MAX_PENDING_BYTES = 32 * 1024 * 1024


# Pieces up to this size are verified and written on the event loop (see write_piece).
INLINE_WRITE_MAX = 512 * 1024


class BlobAssembly:
    def __init__(
        self,
        partial: PartialBlob,
        metainfo: MetaInfo,
        on_progress: Callable[[], None],
        on_piece: Callable[[int], None] = lambda index: None,
    ) -> None:
        self.partial = partial
        self.metainfo = metainfo
        self.size = metainfo.size
        self.piece_length = metainfo.piece_length
        self.pieces = Bitfield(metainfo.num_pieces)
        self.available = 0
        self.rejected_pieces: list[int] = []  # bad pieces peers sent (never written)
        self.mismatched_pieces: list[int] = []  # on disk, but not what the swarm agreed on
        # Piece hashes this node computed from origin bytes and has not published yet.
        self.unpublished: list[tuple[int, bytes]] = []
        self._on_progress = on_progress
        self._on_piece = on_piece
        self._origin_start = 0
        self._origin_end = 0
        _allocate(partial.fd, self.size)
        self.hasher = PrefixHasher(
            partial.fd,
            self.size,
            self.piece_length,
            partial.digest.algorithm,
            self._piece_hashed,
        )

    # -- origin bytes (sequential) -------------------------------------------------------------

    def origin_writer(self, start: int) -> SequentialWriter:
        """A writer for an origin stream that starts at byte ``start`` (a piece boundary)."""
        self._origin_start = self._origin_end = start

        def written(end: int) -> None:
            self._origin_end = end
            self._advance()

        return SequentialWriter(self._pwrite, start, written, MAX_PENDING_BYTES)

    def _pwrite(self, data: bytes, offset: int) -> None:
        try:
            self.partial.write_at(data, offset)
        except OSError as exc:
            if is_disk_full(exc):
                raise RegistryError("UNAVAILABLE", "the agent's disk is full") from exc
            raise

    # -- peer pieces (any order) ---------------------------------------------------------------

    async def write_piece(self, index: int, data: bytes) -> bool:
        """Verify a piece from a peer against its published hash, then write it.

        False (and nothing written) when it does not match: the peer sent a bad piece.
        """
        if index in self.pieces:
            return True
        offset, _ = self.metainfo.span(index)
        metainfo = self.metainfo

        def verify_and_write() -> bool:
            if not metainfo.verify(index, data):
                return False
            self._pwrite(data, offset)
            return True

        if len(data) <= INLINE_WRITE_MAX:
            # Small pieces: checking and writing here (~0.1 ms for 256 KiB) costs less than
            # the hop to a worker thread and back, which dominated at 80 pieces/s.
            good = verify_and_write()
        else:
            good = await trio.to_thread.run_sync(verify_and_write)
        if not good:
            self.rejected_pieces.append(index)
            return False
        if self.pieces.add(index):
            self._on_piece(index)
        self._advance()
        return True

    def learn_hashes(self, metainfo: MetaInfo) -> None:
        """Merge piece hashes published by others (the tracker's view of this blob)."""
        self.metainfo = self.metainfo.merge(metainfo)

    # -- the prefix ----------------------------------------------------------------------------

    def _advance(self) -> None:
        position = self.available
        while position < self.size:
            index = position // self.piece_length
            if index in self.pieces:
                position = min(self.size, (index + 1) * self.piece_length)
            elif self._origin_start <= position < self._origin_end:
                position = self._origin_end
            else:
                break
        if position != self.available:
            self.available = position
            self.hasher.advance(position)
            self._on_progress()

    def _piece_hashed(self, index: int, value: bytes) -> None:
        known = self.metainfo.piece_hashes[index]
        if known is None:
            self.metainfo = self.metainfo.with_hashes([(index, value)])
            self.unpublished.append((index, value))
        elif known != value:
            # What is on disk does not match what the swarm agreed on: the sha256 will fail.
            self.mismatched_pieces.append(index)
            return
        if self.pieces.add(index):
            self._on_piece(index)

    def take_unpublished(self) -> list[tuple[int, bytes]]:
        hashes, self.unpublished = self.unpublished, []
        return hashes

    async def verify(self) -> bool:
        """Wait until the whole blob is hashed; True when it matches its digest."""
        await self.hasher.wait_hashed(self.size)
        await self.hasher.join()
        return self.partial.digest.matches(self.hasher.sha) and not self.mismatched_pieces

    def actual_digest(self) -> str:
        return f"{self.partial.digest.algorithm}:{self.hasher.sha.hexdigest()}"

    async def abort(self) -> None:
        await self.hasher.abort()


def _allocate(fd: int, size: int) -> None:
    """Reserve the blob's blocks up front, so a full disk fails the download at its start."""
    if not size:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if is_disk_full(exc):
            raise RegistryError("UNAVAILABLE", "the agent's disk is full") from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # a filesystem without fallocate: sparse is fine
