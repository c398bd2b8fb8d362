"""The content store on its own: commit only verified bytes, LRU eviction, pins, reopening."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agent.content_store import ContentStore
from p2preg.digest import Digest


def _digest(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


def _put(store: ContentStore, data: bytes) -> Digest:
    digest = _digest(data)
    partial = store.new_partial(digest)
    partial.write_and_hash(data)
    assert partial.verified()
    assert store.commit(partial)
    return digest


def test_commit_publishes_under_digest(tmp_path: Path) -> None:
    store = ContentStore.open(tmp_path, 1000)
    digest = _put(store, b"hello")
    assert store.has(digest) and store.size_of(digest) == 5
    assert store.blob_path(digest).read_bytes() == b"hello"
    assert list((tmp_path / "partial").iterdir()) == []


def test_unverified_partial_is_not_an_entry(tmp_path: Path) -> None:
    store = ContentStore.open(tmp_path, 1000)
    digest = _digest(b"expected")
    partial = store.new_partial(digest)
    partial.write_and_hash(b"something else")
    assert not partial.verified()
    store.discard(partial)
    assert not store.has(digest)
    assert list((tmp_path / "partial").iterdir()) == []


def test_lru_eviction_skips_pinned_blobs(tmp_path: Path) -> None:
    store = ContentStore.open(tmp_path, 300)
    a = _put(store, b"a" * 100)
    b = _put(store, b"b" * 100)
    c = _put(store, b"c" * 100)
    pinned = store.acquire(a)  # a is the oldest, but being read
    assert pinned is not None
    d = _put(store, b"d" * 100)
    assert store.has(a), "a pinned blob must never be evicted"
    assert not store.has(b), "the least recently used unpinned blob goes first"
    assert store.has(c) and store.has(d)
    assert store.used_bytes == 300
    pinned.release()
    store.acquire(c).release()  # touch c: now a is least recently used
    _put(store, b"e" * 100)
    assert not store.has(a) and store.has(c)
    assert not store.blob_path(a).exists()


def test_blob_larger_than_cache_is_not_kept(tmp_path: Path) -> None:
    store = ContentStore.open(tmp_path, 10)
    data = b"x" * 11
    partial = store.new_partial(_digest(data))
    partial.write_and_hash(data)
    assert not store.commit(partial)
    assert not store.has(_digest(data))
    assert list((tmp_path / "partial").iterdir()) == []


def test_reopen_keeps_entries_drops_partials_and_strays(tmp_path: Path) -> None:
    store = ContentStore.open(tmp_path, 1000)
    kept = _put(store, b"keep me")
    store.new_partial(_digest(b"interrupted")).write_and_hash(b"interr")  # never committed
    stray = tmp_path / "blobs" / "sha256" / "zz" / "not-a-digest"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"junk")
    reopened = ContentStore.open(tmp_path, 1000)
    assert reopened.digests() == [kept]
    assert reopened.used_bytes == len(b"keep me")
    assert list((tmp_path / "partial").iterdir()) == []
    assert not stray.exists()


def test_reopen_restores_lru_order_from_mtimes(tmp_path: Path) -> None:
    store = ContentStore.open(tmp_path, 1000)
    old = _put(store, b"o" * 10)
    new = _put(store, b"n" * 10)
    os.utime(store.blob_path(old), (1_000_000, 1_000_000))
    os.utime(store.blob_path(new), (2_000_000, 2_000_000))
    reopened = ContentStore.open(tmp_path, 15)  # room for one: the older one goes
    assert reopened.digests() == [new]


def test_manifest_with_media_type(tmp_path: Path) -> None:
    store = ContentStore.open(tmp_path, 1000)
    data = b'{"schemaVersion": 2}'
    digest = _digest(data)
    store.put_manifest(digest, data, "application/vnd.oci.image.manifest.v1+json")
    assert store.read_manifest(digest, 1000) == (
        data,
        "application/vnd.oci.image.manifest.v1+json",
    )
    with pytest.raises(ValueError):
        store.put_manifest(_digest(b"other"), data, "x")


def test_metainfo_sidecar_survives_reopen_and_goes_with_the_blob(tmp_path: Path) -> None:
    from p2preg.metainfo import MetaInfo, piece_hash

    store = ContentStore.open(tmp_path, 10_000_000)
    data = os.urandom(300_000)
    digest = _put(store, data)
    length = 128 * 1024
    metainfo = MetaInfo.empty(digest, len(data), length).with_hashes(
        (i, piece_hash(data[i * length : (i + 1) * length])) for i in range(3)
    )
    store.put_metainfo(metainfo)
    reopened = ContentStore.open(tmp_path, 10_000_000)
    assert reopened.read_metainfo(digest) == metainfo
    reopened.remove(digest)
    assert reopened.read_metainfo(digest) is None
    assert list((tmp_path / "meta").rglob("*" + digest.hex)) == []


def test_metainfo_is_read_once_and_follows_the_blob(tmp_path: Path) -> None:
    """read_metainfo decodes the sidecar once (a seeder asks for every piece it serves); a
    metainfo put later, a removal and a new commit are all seen."""
    from p2preg.metainfo import MetaInfo, piece_hash

    store = ContentStore.open(tmp_path, 10_000_000)
    data = os.urandom(300_000)
    digest = _put(store, data)
    assert store.read_metainfo(digest) is None  # none recorded yet (cached as such)
    length = 128 * 1024
    metainfo = MetaInfo.empty(digest, len(data), length).with_hashes(
        (i, piece_hash(data[i * length : (i + 1) * length])) for i in range(3)
    )
    store.put_metainfo(metainfo)
    assert store.read_metainfo(digest) == metainfo
    sidecar = next((tmp_path / "meta").rglob("*" + digest.hex))
    sidecar.write_bytes(b"garbage")  # (not read again: the decoded copy answers)
    assert store.read_metainfo(digest) == metainfo
    store.remove(digest)
    assert store.read_metainfo(digest) is None
    _put(store, data)  # committed again, without a sidecar now
    assert store.read_metainfo(digest) is None
