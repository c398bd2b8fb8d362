"""MemoryPeerStore semantics with explicit times: peer TTL, bounds, metainfo merge, leases."""

from __future__ import annotations

import pytest

from p2preg.digest import Digest
from p2preg.handout import PeerRecord
from p2preg.metainfo import MetaInfo
from tracker.peer_store import (
    Lease,
    MemoryPeerStore,
    MetainfoConflict,
    PublisherQuarantined,
    StoreLimits,
)

A, B, C, D = (bytes([n]) * 16 for n in (1, 2, 3, 4))
BLOB = Digest.of_bytes(b"blob")
OTHER = Digest.of_bytes(b"other")
H1, H2, H3 = (bytes([n]) * 16 for n in (0xA1, 0xA2, 0xA3))


def peer(peer_id: bytes, at: float, complete: bool = False, pieces: int = 0) -> PeerRecord:
    return PeerRecord(peer_id, f"10.0.0.{peer_id[0]}:7000", "z", complete, pieces, at)


def store(**limits: float) -> MemoryPeerStore:
    return MemoryPeerStore(StoreLimits(**limits))  # type: ignore[arg-type]


def metainfo(*hashes: bytes | None) -> MetaInfo:
    info = MetaInfo.empty(BLOB, 3 * 64 * 1024, 64 * 1024)
    return info.with_hashes((i, h) for i, h in enumerate(hashes) if h is not None)


# -- peers -------------------------------------------------------------------------------------


async def test_announce_upserts_and_ttl_expires() -> None:
    s = store(peer_ttl=30.0)
    await s.announce(BLOB, peer(A, 0.0), 0.0)
    await s.announce(BLOB, peer(B, 10.0), 10.0)
    await s.announce(BLOB, peer(A, 20.0, complete=True, pieces=3), 20.0)
    assert {p.peer_id: p.complete for p in await s.peers(BLOB, 25.0)} == {A: True, B: False}
    assert [p.peer_id for p in await s.peers(BLOB, 45.0)] == [A]  # B last seen at 10
    assert await s.peers(BLOB, 51.0) == []
    assert await s.peers(OTHER, 0.0) == []
    assert (await s.stats())["peers"] == 0


async def test_a_record_lives_as_long_as_its_announcer_was_told() -> None:
    """The tracker paces seeders' re-announces (p2preg/announce_pacing.py) and gives their
    records 3 of those intervals; a record no longer runs out in announce order."""
    s = store(peer_ttl=30.0)
    await s.announce(BLOB, peer(A, 0.0, complete=True, pieces=3), 0.0, ttl=300.0)
    await s.announce(BLOB, peer(B, 10.0), 10.0)  # the default: peer_ttl
    assert [p.peer_id for p in await s.peers(BLOB, 100.0)] == [A]
    assert await s.peers(BLOB, 301.0) == []
    # A re-announce's lifetime replaces the earlier one, longer or shorter.
    await s.announce(BLOB, peer(C, 400.0), 400.0, ttl=300.0)
    await s.announce(BLOB, peer(C, 410.0), 410.0, ttl=30.0)
    assert await s.peers(BLOB, 441.0) == []
    assert await s.peer_counts() == (0, 0)


async def test_peer_counts_split_downloading_and_complete_records_of_all_blobs() -> None:
    s = store(peer_ttl=30.0, max_digests=2)
    await s.announce(BLOB, peer(A, 0.0), 0.0)
    await s.announce(BLOB, peer(B, 0.0, complete=True), 0.0)
    await s.announce(OTHER, peer(A, 0.0), 0.0)
    assert await s.peer_counts() == (2, 1)
    await s.announce(BLOB, peer(A, 1.0, complete=True), 1.0)  # A completed BLOB
    assert await s.peer_counts() == (1, 2)
    await s.announce(Digest.of_bytes(b"third"), peer(C, 2.0), 2.0)  # OTHER is evicted
    assert await s.peer_counts() == (1, 2)
    await s.sweep(40.0)
    assert await s.peer_counts() == (0, 0)


async def test_re_announces_do_not_grow_the_expiry_heap_without_bound() -> None:
    s = store(peer_ttl=30.0)
    for second in range(2_000):  # one downloader announcing every second for half an hour
        await s.announce(BLOB, peer(A, float(second)), float(second))
    assert len(s._blobs[BLOB].expiry) <= 4 * 1 + 64 + 1
    assert [p.peer_id for p in await s.peers(BLOB, 2_000.0)] == [A]


async def test_swarm_size_counts_the_live_peers_of_one_blob() -> None:
    s = store(peer_ttl=30.0)
    assert await s.swarm_size(BLOB, 0.0) == 0
    await s.announce(BLOB, peer(A, 0.0), 0.0)
    await s.announce(BLOB, peer(B, 10.0), 10.0)
    await s.announce(BLOB, peer(A, 20.0), 20.0)  # a re-announce is the same peer
    await s.announce(OTHER, peer(C, 20.0), 20.0)
    assert await s.swarm_size(BLOB, 25.0) == 2
    assert await s.swarm_size(BLOB, 45.0) == 1  # B last seen at 10
    assert await s.swarm_size(OTHER, 45.0) == 1


async def test_peers_per_digest_bounded_oldest_evicted() -> None:
    s = store(max_peers_per_digest=3)
    for n in range(1, 6):
        await s.announce(BLOB, peer(bytes([n]) * 16, float(n)), float(n))
    assert [p.peer_id[0] for p in await s.peers(BLOB, 5.0)] == [3, 4, 5]
    # A re-announce makes a peer the newest again.
    await s.announce(BLOB, peer(bytes([3]) * 16, 6.0), 6.0)
    await s.announce(BLOB, peer(bytes([6]) * 16, 7.0), 7.0)
    assert [p.peer_id[0] for p in await s.peers(BLOB, 7.0)] == [5, 3, 6]
    assert (await s.stats())["peers"] == 3


async def test_digests_bounded_least_recently_touched_evicted() -> None:
    s = store(max_digests=2)
    digests = [Digest.of_bytes(bytes([n])) for n in range(3)]
    await s.announce(digests[0], peer(A, 0.0), 0.0)
    await s.announce(digests[1], peer(A, 1.0), 1.0)
    await s.announce(digests[0], peer(B, 2.0), 2.0)  # touches digest 0 again
    await s.announce(digests[2], peer(A, 3.0), 3.0)  # evicts digest 1
    assert await s.peers(digests[1], 3.0) == []
    assert len(await s.peers(digests[0], 3.0)) == 2
    assert (await s.stats())["digests"] == 2 and (await s.stats())["peers"] == 3


async def test_total_peers_bounded() -> None:
    s = store(max_total_peers=4)
    digests = [Digest.of_bytes(bytes([n])) for n in range(3)]
    for n, digest in enumerate(digests):
        await s.announce(digest, peer(A, n), n)
        await s.announce(digest, peer(B, n), n)
    assert (await s.stats())["peers"] <= 4
    assert await s.peers(digests[0], 3.0) == []
    assert len(await s.peers(digests[2], 3.0)) == 2


async def test_sweep_forgets_idle_digests() -> None:
    s = store(peer_ttl=5.0, lease_ttl=5.0)
    await s.announce(BLOB, peer(A, 0.0), 0.0)
    await s.acquire_lease(OTHER, A, None, 0.0)
    await s.sweep(4.0)
    assert (await s.stats())["digests"] == 2
    await s.sweep(6.0)
    assert await s.stats() == {
        "digests": 0,
        "peers": 0,
        "metainfo": 0,
        "leases": 0,
        "tracked_load": 0,
    }


# -- metainfo ----------------------------------------------------------------------------------


async def test_metainfo_progressive_merge() -> None:
    s = store()
    assert await s.get_metainfo(BLOB) is None
    merged = await s.put_metainfo(metainfo(H1, None, None), A, 0.0)
    assert merged.piece_hashes == (H1, None, None)
    merged = await s.put_metainfo(metainfo(None, None, H3), B, 1.0)
    assert merged.piece_hashes == (H1, None, H3)
    merged = await s.put_metainfo(metainfo(H1, H2, None), A, 2.0)
    assert merged.complete and await s.get_metainfo(BLOB) == merged


async def test_metainfo_conflict_rejected_and_nothing_changes() -> None:
    s = store()
    await s.put_metainfo(metainfo(H1, None, None), A, 0.0)
    with pytest.raises(MetainfoConflict, match="conflicting hash for piece 0"):
        await s.put_metainfo(metainfo(H2, H2, None), B, 1.0)
    held = await s.get_metainfo(BLOB)
    assert held is not None and held.piece_hashes == (H1, None, None)
    other_geometry = MetaInfo.empty(BLOB, 5 * 64 * 1024, 64 * 1024)
    with pytest.raises(MetainfoConflict, match="disagrees"):
        await s.put_metainfo(other_geometry, B, 1.0)


# -- leases ------------------------------------------------------------------------------------


async def test_first_asker_gets_the_whole_blob_others_get_the_holder() -> None:
    s = store(lease_ttl=10.0)
    first = await s.acquire_lease(BLOB, A, None, 0.0)
    assert first.granted and first.lease == Lease(A, 0, None, 10.0)
    second = await s.acquire_lease(BLOB, B, None, 3.0)
    assert not second.granted and second.lease == first.lease
    # Any range overlaps a whole-blob lease.
    assert not (await s.acquire_lease(BLOB, B, (40, 50), 3.0)).granted


async def test_holder_renews() -> None:
    s = store(lease_ttl=10.0)
    await s.acquire_lease(BLOB, A, None, 0.0)
    renewed = await s.acquire_lease(BLOB, A, None, 8.0)
    assert renewed.granted and renewed.lease.expires_at == 18.0
    assert not (await s.acquire_lease(BLOB, B, None, 15.0)).granted
    assert (await s.stats())["leases"] == 1


async def test_expired_lease_goes_to_the_next_asker() -> None:
    s = store(lease_ttl=10.0)
    await s.acquire_lease(BLOB, A, None, 0.0)
    assert not (await s.acquire_lease(BLOB, B, None, 9.9)).granted
    taken = await s.acquire_lease(BLOB, B, None, 10.0)
    assert taken.granted and taken.lease.holder == B
    # The old holder now gets B's lease back.
    back = await s.acquire_lease(BLOB, A, None, 11.0)
    assert not back.granted and back.lease.holder == B


async def test_disjoint_ranges_up_to_max_fetchers() -> None:
    s = store(lease_ttl=10.0, max_origin_fetchers=2)
    assert (await s.acquire_lease(BLOB, A, (0, 8), 0.0)).granted
    overlapping = await s.acquire_lease(BLOB, B, (4, 12), 1.0)
    assert not overlapping.granted and overlapping.lease.holder == A
    disjoint = await s.acquire_lease(BLOB, B, (8, 16), 1.0)
    assert disjoint.granted and (disjoint.lease.start, disjoint.lease.end) == (8, 16)
    # A third fetcher, even for pieces nobody fetches, waits: the origin gets two at most.
    third = await s.acquire_lease(BLOB, C, (16, None), 2.0)
    assert not third.granted and third.lease.holder == A  # the one that frees up first
    assert (await s.acquire_lease(BLOB, C, (16, None), 10.0)).granted  # A's expired


async def test_release_and_changed_range() -> None:
    s = store(lease_ttl=10.0)
    await s.acquire_lease(BLOB, A, (0, 4), 0.0)
    # Asking again for an overlapping, wider range replaces the holder's lease.
    wider = await s.acquire_lease(BLOB, A, (0, 8), 1.0)
    assert wider.granted and (await s.stats())["leases"] == 1
    assert await s.release_lease(BLOB, B, None, 2.0) == 0  # not B's
    assert await s.release_lease(BLOB, A, (20, 30), 2.0) == 0  # no overlap
    assert await s.release_lease(BLOB, A, None, 2.0) == 1
    assert (await s.acquire_lease(BLOB, B, None, 2.0)).granted


async def test_bad_ranges_rejected() -> None:
    s = store()
    for bad in ((5, 5), (5, 2), (-1, 3)):
        with pytest.raises(ValueError, match="bad piece range"):
            await s.acquire_lease(BLOB, A, bad, 0.0)


# -- bad data ----------------------------------------------------------------------------------


async def test_report_bad_drops_metainfo_and_publishers_leases_and_quarantines() -> None:
    s = store(lease_ttl=10.0, bad_publisher_quarantine=60.0)
    await s.put_metainfo(metainfo(H1, None, None), A, 0.0)
    await s.acquire_lease(BLOB, A, (0, 2), 0.0)
    await s.acquire_lease(BLOB, B, (2, None), 0.0)
    assert await s.report_bad(BLOB, C, A, 1.0) is True
    assert await s.get_metainfo(BLOB) is None
    # A's lease is gone (C may take that range), B's stays.
    assert (await s.acquire_lease(BLOB, C, (0, 2), 1.0)).granted
    assert not (await s.acquire_lease(BLOB, C, (2, 3), 1.0)).granted
    # A is quarantined for this blob only.
    with pytest.raises(PublisherQuarantined):
        await s.put_metainfo(metainfo(H1, None, None), A, 2.0)
    with pytest.raises(PublisherQuarantined):
        await s.acquire_lease(BLOB, A, None, 2.0)
    await s.acquire_lease(OTHER, A, None, 2.0)
    # ...until the quarantine ends.
    assert (await s.put_metainfo(metainfo(H1, None, None), A, 61.0)).piece_hashes[0] == H1
    assert await s.report_bad(OTHER, C, D, 62.0) is False


async def test_handout_load_decays() -> None:
    s = store(load_half_life=10.0)
    await s.record_handout([A, A, B], 0.0)
    assert await s.handout_load([A, B, C], 0.0) == {A: 2.0, B: 1.0}
    decayed = await s.handout_load([A], 10.0)
    assert abs(decayed[A] - 1.0) < 1e-9


async def test_handout_candidates_are_sampled_tiers_of_live_peers() -> None:
    import random

    from p2preg.handout import PeerRef

    s = store(peer_ttl=30.0, handout_sample=60)
    for n in range(1, 201):
        seeder = n % 10 == 0
        at = n / 10
        record = PeerRecord(n.to_bytes(16, "big"), f"h{n}", "z", seeder, 5 if seeder else 1, at)
        await s.announce(BLOB, record, at)
    me = PeerRef(bytes(16), "z")
    rng = random.Random(1)
    got = await s.handout_candidates(BLOB, me, 50, rng, 20.0)
    # 20 seeders (all: fewer than the sample) cannot fill 50; 180 leechers: a sample of 60.
    assert sum(r.complete for r in got) == 20 and sum(not r.complete for r in got) == 60
    assert len({r.peer_id for r in got}) == 80
    # Peers announced more than peer_ttl ago are gone, here and from the tiers.
    got = await s.handout_candidates(BLOB, me, 50, rng, 30.0 + 15.0)
    assert all(r.announced_at >= 15.0 for r in got)
    assert len(await s.peers(BLOB, 45.0)) == 51  # announced at 15.0 .. 20.0
    assert (await s.stats())["peers"] == 51
