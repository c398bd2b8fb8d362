"""Blob metainfo: digest, size, piece length, and the xxh3-128 hash of every piece.

Piece hashes are published progressively, as the pieces arrive from the origin, so a rollout
never waits for one node to finish a blob before others can start: a hash that is not known yet
is ``None``. Merging two views of the same blob unions their known hashes; two different hashes
for one piece mean someone is lying (or corrupt), and that is a protocol error.

The per-piece xxh3 check catches a bad piece from a peer immediately (xxh3 runs at memory speed);
the blob's sha256 still gates the commit to the store, on every node.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import xxhash

from p2preg.digest import Digest
from p2preg.errors import RegistryError, RemoteProtocolError

PIECE_HASH_BYTES = 16
MIN_PIECE_LENGTH = 64 * 1024
MAX_PIECE_LENGTH = 64 * 1024 * 1024
# A blob is cut into at most this many pieces, each a power of two within these bounds
# (piece_length_for; the reasons and the measurements are in docs/performance.md, piece size).
TARGET_PIECES = 512
MIN_DEFAULT_PIECE_LENGTH = 512 * 1024
MAX_DEFAULT_PIECE_LENGTH = 16 * 1024 * 1024
MAX_BLOB_SIZE = 1 << 40  # 1 TiB: far beyond any layer, small enough to bound the metainfo


def piece_hash(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def piece_length_for(size: int) -> int:
    """The default piece length of a blob of ``size`` bytes: the smallest power of two, from
    512 KiB to 16 MiB, that cuts it into at most TARGET_PIECES pieces (up to 256 MiB: 512 KiB,
    512 MiB: 1 MiB, 1 GiB: 2 MiB, 2 GiB: 4 MiB). A piece crosses each hop of the swarm whole
    before it is passed on (it is checked first), so a rollout's pipeline fills in about hops x
    piece time: smaller pieces fill it sooner (16 nodes x 100 MiB, simulated: 1 MiB 1.34x the
    bound, 512 KiB 1.20x, 256 KiB 1.16x). Each piece costs the agent CPU (a request, HAVEs, a
    hash, a write): 256 KiB took a quarter more agent CPU than 512 KiB for the same rollout
    (docs/performance.md, piece size). Every agent derives the same length from the size, so
    metainfo computed independently for the same blob agrees (which is why changing this is
    a rolling-upgrade concern: docs/operations.md)."""
    length = MIN_DEFAULT_PIECE_LENGTH
    while length < MAX_DEFAULT_PIECE_LENGTH and size > length * TARGET_PIECES:
        length *= 2
    return length


def piece_count(size: int, piece_length: int) -> int:
    return max(1, -(-size // piece_length)) if size else 0


@dataclass(frozen=True, slots=True)
class MetaInfo:
    digest: Digest
    size: int
    piece_length: int
    piece_hashes: tuple[bytes | None, ...]

    @classmethod
    def empty(cls, digest: Digest, size: int, piece_length: int) -> MetaInfo:
        _check_geometry(size, piece_length)
        return cls(digest, size, piece_length, (None,) * piece_count(size, piece_length))

    @property
    def num_pieces(self) -> int:
        return len(self.piece_hashes)

    @property
    def complete(self) -> bool:
        return all(h is not None for h in self.piece_hashes)

    def known(self, index: int) -> bool:
        return self.piece_hashes[index] is not None

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of piece ``index``."""
        if not 0 <= index < self.num_pieces:
            raise IndexError(index)
        offset = index * self.piece_length
        return offset, min(self.piece_length, self.size - offset)

    def verify(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        expected = self.piece_hashes[index]
        return (
            expected is not None
            and len(data) == self.span(index)[1]
            and (piece_hash(data) == expected)
        )

    def with_hashes(self, hashes: Iterable[tuple[int, bytes]]) -> MetaInfo:
        updated = list(self.piece_hashes)
        for index, value in hashes:
            if not 0 <= index < len(updated) or len(value) != PIECE_HASH_BYTES:
                raise RemoteProtocolError(f"bad piece hash for piece {index}")
            if updated[index] is not None and updated[index] != value:
                raise RemoteProtocolError(f"conflicting hash for piece {index} of {self.digest}")
            updated[index] = bytes(value)
        return MetaInfo(self.digest, self.size, self.piece_length, tuple(updated))

    def merge(self, other: MetaInfo) -> MetaInfo:
        if (other.digest, other.size, other.piece_length) != (
            self.digest,
            self.size,
            self.piece_length,
        ):
            raise RemoteProtocolError(f"metainfo for {self.digest} disagrees on size or pieces")
        return self.with_hashes((i, h) for i, h in enumerate(other.piece_hashes) if h is not None)

    # -- wire form (msgpack-ready) -------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        return {
            "d": str(self.digest),
            "s": self.size,
            "p": self.piece_length,
            "h": [h if h is not None else b"" for h in self.piece_hashes],
        }

    @classmethod
    def from_wire(cls, obj: object) -> MetaInfo:
        """Validate an untrusted decoded object; raise RemoteProtocolError on anything off."""
        if not isinstance(obj, dict):
            raise RemoteProtocolError("metainfo must be a map")
        digest_text, size, piece_length, hashes = (obj.get(k) for k in ("d", "s", "p", "h"))
        if not isinstance(digest_text, str):
            raise RemoteProtocolError("metainfo digest must be a string")
        try:
            digest = Digest.parse(digest_text)
        except RegistryError as exc:
            raise RemoteProtocolError(f"metainfo digest: {exc.message}") from None
        if not isinstance(size, int) or isinstance(size, bool):
            raise RemoteProtocolError("metainfo size must be an integer")
        if not isinstance(piece_length, int) or isinstance(piece_length, bool):
            raise RemoteProtocolError("metainfo piece length must be an integer")
        try:
            _check_geometry(size, piece_length)
        except ValueError as exc:
            raise RemoteProtocolError(str(exc)) from None
        if not isinstance(hashes, list) or len(hashes) != piece_count(size, piece_length):
            raise RemoteProtocolError("metainfo must list one hash per piece")
        parsed: list[bytes | None] = []
        for value in hashes:
            if not isinstance(value, bytes) or len(value) not in (0, PIECE_HASH_BYTES):
                raise RemoteProtocolError("a piece hash must be 16 bytes (or empty: unknown)")
            parsed.append(value or None)
        return cls(digest, size, piece_length, tuple(parsed))


def _check_geometry(size: int, piece_length: int) -> None:
    if not 0 <= size <= MAX_BLOB_SIZE:
        raise ValueError(f"blob size {size} out of range")
    if not MIN_PIECE_LENGTH <= piece_length <= MAX_PIECE_LENGTH or (
        piece_length & (piece_length - 1)
    ):
        raise ValueError(f"piece length {piece_length} must be a power of two, 64 KiB..64 MiB")
