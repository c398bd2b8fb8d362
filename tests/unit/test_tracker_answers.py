"""The tracker's announce answers, packed from records packed once (tracker.server.PackedPeers)."""

from __future__ import annotations

import dataclasses

import msgpack  # type: ignore[import-untyped]

from p2preg.handout import PeerRecord
from tracker.server import PackedPeers, _peer_wire, pack


def _record(index: int, pieces: int = 0) -> PeerRecord:
    return PeerRecord(index.to_bytes(16, "big"), f"10.0.0.{index}:7000", "z", False, pieces, 1.0)


def _expected(peers: list[PeerRecord], rest: dict[str, object]) -> object:
    return msgpack.unpackb(pack({"peers": [_peer_wire(p) for p in peers], **rest}))


def test_an_answer_unpacks_as_the_map_packed_whole() -> None:
    packed = PackedPeers()
    peers = [_record(i, i * 7) for i in range(20)]
    rest = {"interval": 10.0, "swarm": 10_000, "pace": 3.25}
    for _ in range(2):  # packed afresh, then from the table
        assert msgpack.unpackb(packed.answer(peers, rest)) == _expected(peers, rest)
    # no peers, and more than a fixarray's 15
    assert msgpack.unpackb(packed.answer([], rest)) == _expected([], rest)
    many = [_record(i) for i in range(300)]
    assert msgpack.unpackb(packed.answer(many, {})) == _expected(many, {})


def test_a_peers_new_record_is_listed_not_its_old_one() -> None:
    packed = PackedPeers()
    old = _record(1, pieces=3)
    packed.answer([old], {})
    new = dataclasses.replace(old, pieces=400, complete=True)
    (listed,) = msgpack.unpackb(packed.answer([new], {}))["peers"]
    assert listed["pieces"] == 400 and listed["complete"] is True


def test_the_table_is_bounded() -> None:
    packed = PackedPeers(max_entries=10)
    peers = [_record(i) for i in range(25)]
    for peer in peers:
        assert msgpack.unpackb(packed.answer([peer], {})) == _expected([peer], {})
    assert len(packed._packed) <= 10
