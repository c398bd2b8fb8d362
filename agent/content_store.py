"""The agent's content store: verified blobs on disk, addressed by digest, with LRU eviction.

Layout under the data dir (see docs/store.md for why):

    blobs/<alg>/<first two hex>/<hex>   committed, verified content (layers, configs, manifests)
    types/<alg>/<first two hex>/<hex>   media type of a manifest stored in blobs/ (manifests only)
    meta/<alg>/<first two hex>/<hex>    piece hashes (metainfo, msgpack) of a committed blob
    partial/<alg>-<hex>.<nonce>         downloads in progress; wiped at startup

A file appears under ``blobs/`` only by ``rename`` of a fully written, fsynced and
digest-verified partial file, so a crash or SIGKILL at any moment leaves either no entry or a
complete, correct one. The LRU order survives restarts through the files' mtimes, which are
touched on every read.

All methods are synchronous and short (metadata syscalls); bulk data is written by
``PartialBlob.write_and_hash``, which the caller runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import msgpack  # type: ignore[import-untyped]

from p2preg.digest import Digest
from p2preg.errors import RemoteProtocolError
from p2preg.metainfo import MetaInfo

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    size: int
    readers: int = 0
    # The blob's metainfo file, decoded once (read_metainfo): a seeding agent looks it up for
    # every piece it serves; reading and decoding it each time (and building a full bitfield)
    # were 13% of five emulated agents' busy samples (py-spy, 16 x 100 MiB, 256 KiB pieces).
    metainfo: MetaInfo | None = None
    metainfo_read: bool = False


class OpenBlob:
    """A pinned, committed blob: an open file descriptor and its size. Call ``release`` once."""

    def __init__(self, digest: Digest, fd: int, size: int, store: ContentStore) -> None:
        self.digest, self.fd, self.size = digest, fd, size
        self._store: ContentStore | None = store

    def release(self) -> None:
        if self._store is not None:
            self._store._release(self)
            self._store = None


class PartialBlob:
    """A download in progress: written sequentially, hashed as it is written."""

    def __init__(self, digest: Digest, path: Path) -> None:
        self.digest = digest
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.hasher = digest.hasher()
        self.written = 0
        self.closed = False

    def write_and_hash(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` and feed it to the hash. Blocking."""
        self.write_at(data, self.written)
        self.hasher.update(data)
        self.written += len(data)

    def write_at(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """pwrite all of ``data`` at ``offset``. Blocking; releases the GIL."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def hash(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the hash. Blocking; hashlib releases the GIL on buffers over 2 KiB."""
        self.hasher.update(data)

    def verified(self) -> bool:
        return self.digest.matches(self.hasher)

    def actual_digest(self) -> str:
        return f"{self.digest.algorithm}:{self.hasher.hexdigest()}"

    def sync(self) -> None:
        """Make the bytes durable before the rename publishes them. Blocking."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class ContentStore:
    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        self._blobs = root / "blobs"
        self._types = root / "types"
        self._meta = root / "meta"
        self._partial = root / "partial"
        self._entries: OrderedDict[Digest, _Entry] = OrderedDict()
        self._used = 0
        # Bytes promised to downloads in progress (their partial files), so that eviction makes
        # room before the bytes land rather than after the disk is full.
        self._reserved = 0

    # -- startup -------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, capacity: int) -> ContentStore:
        """Create or reopen a store: drop partial files, index the committed blobs by mtime."""
        store = cls(root, capacity)
        for directory in (store._blobs, store._types, store._meta, store._partial):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in store._partial.iterdir():
            # A partial file is an interrupted download: it was never verified, so it goes.
            leftover.unlink(missing_ok=True)
        found: list[tuple[float, Digest, int]] = []
        for path in store._blobs.glob("*/*/*"):
            digest = store._digest_of_path(path)
            if digest is None:
                log.warning("removing unexpected file in the store: %s", path)
                path.unlink(missing_ok=True)
                continue
            stat = path.stat()
            found.append((stat.st_mtime, digest, stat.st_size))
        for _mtime, digest, size in sorted(found, key=lambda item: item[0]):
            store._entries[digest] = _Entry(size)
            store._used += size
        store.evict_to_fit(0)
        return store

    def _digest_of_path(self, path: Path) -> Digest | None:
        algorithm, prefix, name = path.parts[-3:]
        try:
            digest = Digest.parse(f"{algorithm}:{name}")
        except Exception:
            return None
        return digest if prefix == name[:2] else None

    # -- paths ---------------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def _type_path(self, digest: Digest) -> Path:
        return self._types / digest.algorithm / digest.hex[:2] / digest.hex

    def _meta_path(self, digest: Digest) -> Path:
        return self._meta / digest.algorithm / digest.hex[:2] / digest.hex

    def put_metainfo(self, metainfo: MetaInfo) -> None:
        """Keep a committed blob's piece hashes, so it can be seeded again after a restart."""
        entry = self._entries.get(metainfo.digest)
        if entry is not None and metainfo.complete:
            self._write_small_file(
                self._meta_path(metainfo.digest), msgpack.packb(metainfo.to_wire())
            )
            if metainfo.size == entry.size:
                entry.metainfo, entry.metainfo_read = metainfo, True

    def read_metainfo(self, digest: Digest) -> MetaInfo | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if not entry.metainfo_read:
            entry.metainfo, entry.metainfo_read = self._load_metainfo(digest, entry.size), True
        return entry.metainfo

    def _load_metainfo(self, digest: Digest, size: int) -> MetaInfo | None:
        try:
            data = self._meta_path(digest).read_bytes()
            metainfo = MetaInfo.from_wire(msgpack.unpackb(data))
        except (OSError, ValueError, RemoteProtocolError, msgpack.UnpackException):
            return None
        return metainfo if metainfo.digest == digest and metainfo.size == size else None

    # -- queries -------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    def has(self, digest: Digest) -> bool:
        return digest in self._entries

    def size_of(self, digest: Digest) -> int | None:
        entry = self._entries.get(digest)
        return None if entry is None else entry.size

    def digests(self) -> list[Digest]:
        return list(self._entries)

    def acquire(self, digest: Digest) -> OpenBlob | None:
        """Open and pin a committed blob; eviction skips it until ``release``. None on a miss."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        path = self.blob_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Removed behind our back (an operator cleaning up): forget it, it is a miss.
            self._forget(digest)
            return None
        entry.readers += 1
        self._touch(digest, path)
        return OpenBlob(digest, fd, entry.size, self)

    def _release(self, blob: OpenBlob) -> None:
        os.close(blob.fd)
        entry = self._entries.get(blob.digest)
        if entry is not None:
            entry.readers -= 1

    def read_manifest(self, digest: Digest, max_size: int) -> tuple[bytes, str] | None:
        """A stored manifest's bytes and media type, or None."""
        entry = self._entries.get(digest)
        if entry is None or entry.size > max_size:
            return None
        try:
            media_type = self._type_path(digest).read_text("utf-8").strip()
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None
        if len(data) != entry.size:
            return None
        self._touch(digest, self.blob_path(digest))
        return data, media_type

    def _touch(self, digest: Digest, path: Path) -> None:
        self._entries.move_to_end(digest)
        with contextlib.suppress(OSError):
            os.utime(path)

    # -- writing -------------------------------------------------------------------------------

    def new_partial(self, digest: Digest) -> PartialBlob:
        name = f"{digest.algorithm}-{digest.hex}.{secrets.token_hex(4)}"
        return PartialBlob(digest, self._partial / name)

    def reserve(self, nbytes: int) -> None:
        self._reserved += nbytes
        self.evict_to_fit(0)

    def release(self, nbytes: int) -> None:
        self._reserved = max(0, self._reserved - nbytes)

    def commit(self, partial: PartialBlob, media_type: str | None = None) -> bool:
        """Publish a verified partial file under its digest. The caller checked the digest.

        Returns False (and discards the file) when it cannot fit in the cache even after
        evicting everything evictable; the bytes were still served to whoever streamed them.
        """
        digest = partial.digest
        size = partial.written
        partial.close()
        if digest in self._entries:
            self.discard(partial)
            return True
        self.evict_to_fit(size)
        if self._used + size > self.capacity:
            log.warning("blob %s (%d bytes) does not fit in the cache; not kept", digest, size)
            self.discard(partial)
            return False
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if media_type is not None:
            self._write_small_file(self._type_path(digest), media_type.encode())
        os.rename(partial.path, target)
        self._entries[digest] = _Entry(size)
        self._used += size
        return True

    def set_media_type(self, digest: Digest, media_type: str) -> None:
        """Record the media type of a manifest that was committed as a blob."""
        if digest in self._entries:
            self._write_small_file(self._type_path(digest), media_type.encode())

    def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        """Store a small, already verified manifest."""
        partial = self.new_partial(digest)
        try:
            partial.write_and_hash(data)
            partial.sync()
            if not partial.verified():
                raise ValueError(f"manifest bytes do not match {digest}")
            self.commit(partial, media_type)
        finally:
            partial.close()
            partial.path.unlink(missing_ok=True)

    def _write_small_file(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._partial / f"type.{secrets.token_hex(6)}"
        temporary.write_bytes(data)
        os.rename(temporary, path)

    def discard(self, partial: PartialBlob) -> None:
        partial.close()
        partial.path.unlink(missing_ok=True)

    # -- eviction ------------------------------------------------------------------------------

    def evict_to_fit(self, incoming: int) -> int:
        """Evict least recently used, unpinned blobs until ``incoming`` more bytes fit.

        Returns the number of bytes freed. Pinned blobs (being read) are never removed.
        """
        freed = 0
        for digest in list(self._entries):
            if self._used + self._reserved + incoming <= self.capacity:
                break
            entry = self._entries[digest]
            if entry.readers:
                continue
            freed += entry.size
            self.remove(digest)
        return freed

    def remove(self, digest: Digest) -> None:
        self._forget(digest)
        for path in (self.blob_path(digest), self._type_path(digest), self._meta_path(digest)):
            path.unlink(missing_ok=True)

    def _forget(self, digest: Digest) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._used -= entry.size


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
