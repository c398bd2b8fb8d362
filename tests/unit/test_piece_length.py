"""The default piece length, by the blob's size (p2preg.metainfo.piece_length_for)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2preg.digest import Digest
from p2preg.metainfo import (
    MAX_BLOB_SIZE,
    MAX_DEFAULT_PIECE_LENGTH,
    MIN_DEFAULT_PIECE_LENGTH,
    TARGET_PIECES,
    MetaInfo,
    piece_count,
    piece_length_for,
)

MiB, GiB = 1024**2, 1024**3


def test_the_documented_sizes() -> None:
    assert piece_length_for(0) == piece_length_for(1) == MiB // 2
    assert piece_length_for(100 * MiB) == MiB // 2  # 200 pieces
    assert piece_length_for(256 * MiB) == MiB // 2  # 512
    assert piece_length_for(256 * MiB + 1) == MiB
    assert piece_length_for(512 * MiB) == MiB  # 512
    assert piece_length_for(512 * MiB + 1) == 2 * MiB
    assert piece_length_for(GiB) == 2 * MiB
    assert piece_length_for(2 * GiB) == 4 * MiB
    assert piece_length_for(100 * GiB) == 16 * MiB  # capped: 6,400 pieces


@given(st.integers(min_value=0, max_value=MAX_BLOB_SIZE))
def test_a_power_of_two_in_bounds_cutting_at_most_the_target_unless_capped(size: int) -> None:
    length = piece_length_for(size)
    assert MIN_DEFAULT_PIECE_LENGTH <= length <= MAX_DEFAULT_PIECE_LENGTH
    assert length & (length - 1) == 0
    pieces = piece_count(size, length)
    assert pieces <= TARGET_PIECES or length == MAX_DEFAULT_PIECE_LENGTH
    # ... and the smallest such: half of it would cut more than the target
    if length > MIN_DEFAULT_PIECE_LENGTH:
        assert piece_count(size, length // 2) > TARGET_PIECES
    # a valid metainfo geometry
    MetaInfo.empty(Digest.of_bytes(b""), size, length)


@given(st.integers(min_value=0, max_value=MAX_BLOB_SIZE), st.integers(min_value=0, max_value=GiB))
def test_never_smaller_for_a_bigger_blob(size: int, more: int) -> None:
    assert piece_length_for(size + more) >= piece_length_for(size)
