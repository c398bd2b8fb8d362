"""The piece picker: streaming window first, rarest-first after, endgame at the tail."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from p2preg.bitfield import Bitfield
from p2preg.piece_picker import PiecePicker


def _picker(n: int, window: int = 2) -> PiecePicker:
    picker = PiecePicker(n, window=window, rng=random.Random(1))
    for i in range(n):
        picker.mark_known(i)
    return picker


def test_window_ahead_of_reader_comes_first() -> None:
    picker = _picker(10, window=3)
    peer = Bitfield.full(10)
    picker.add_peer(range(10))
    assert picker.pick(peer, 3, read_position=4) == [4, 5, 6]


def test_rarest_first_outside_the_window() -> None:
    picker = _picker(6, window=1)
    peer = Bitfield.full(6)
    picker.add_peer(range(6))
    picker.add_peer([1, 2, 3, 4])  # piece 5 (and 0, in the window) are rarest
    assert picker.pick(peer, 2, read_position=0) == [0, 5]


def test_unknown_hashes_and_held_pieces_are_not_picked() -> None:
    picker = PiecePicker(4, rng=random.Random(1))
    picker.mark_known(2)
    picker.mark_known(3)
    picker.mark_have(3)
    assert picker.pick(Bitfield.full(4), 4) == [2]


def test_endgame_duplicates_only_when_everything_is_in_flight() -> None:
    picker = _picker(3)
    peer = Bitfield.full(3)
    picker.request_started(0)
    picker.request_started(1)
    assert picker.pick(peer, 3) == [2]
    picker.request_started(2)
    assert sorted(picker.pick(peer, 3, exclude=[1])) == [0, 2]
    picker.mark_have(0)
    picker.mark_have(2)
    assert picker.pick(peer, 3, exclude=[1]) == []


@given(
    st.integers(min_value=1, max_value=64),
    st.data(),
)
def test_picks_are_valid(n: int, data: st.DataObject) -> None:
    picker = PiecePicker(n, window=data.draw(st.integers(0, 8)), rng=random.Random(0))
    subset = st.sets(st.integers(0, n - 1))
    for i in data.draw(subset):
        picker.mark_known(i)
    for i in data.draw(subset):
        picker.mark_have(i)
    for i in data.draw(subset):
        picker.request_started(i)
    peer = Bitfield(n)
    for i in data.draw(subset):
        peer.add(i)
    exclude = data.draw(subset)
    count = data.draw(st.integers(0, n + 2))
    chosen = picker.pick(peer, count, data.draw(st.integers(0, n)), exclude=exclude)
    assert len(chosen) <= count and len(set(chosen)) == len(chosen)
    for i in chosen:
        assert i in peer and i in picker.known and i not in picker.have and i not in exclude


@given(st.integers(min_value=1, max_value=48), st.data())
def test_incremental_state_matches_a_full_scan(n: int, data: st.DataObject) -> None:
    """The picker keeps its unrequested set, first missing piece and endgame test incrementally;
    after any sequence of events they equal what a pass over every piece computes, and with
    distinct rarities the pick is exactly the window, then the rarest (the order of the
    docstring)."""
    picker = PiecePicker(n, window=data.draw(st.integers(0, 3)), rng=random.Random(0))
    for _ in range(data.draw(st.integers(0, 60))):
        index = data.draw(st.integers(0, n - 1))
        event = data.draw(st.sampled_from(["have", "known", "start", "end"]))
        if event == "have":
            picker.mark_have(index)
        elif event == "known":
            picker.mark_known(index)
        elif event == "start" and index not in picker.have:
            picker.request_started(index)
        elif event == "end":
            picker.request_ended(index)
    missing = [i for i in range(n) if i not in picker.have]
    assert picker.unrequested == {i for i in missing if i not in picker.in_flight}
    assert picker.first_missing() == (missing[0] if missing else n)
    assert picker._endgame() == (
        0 < len(missing) <= picker.endgame_pieces and all(i in picker.in_flight for i in missing)
    )
    # Distinct availabilities: the pick is deterministic.
    order = data.draw(st.permutations(range(n)))
    picker.availability = list(order)
    peer = Bitfield(n)
    for i in data.draw(st.sets(st.integers(0, n - 1))):
        peer.add(i)
    read, count = data.draw(st.integers(0, n)), data.draw(st.integers(1, n))
    fresh = [
        i
        for i in range(n)
        if i in peer and i in picker.known and i not in picker.have and i not in picker.in_flight
    ]
    window = [i for i in fresh if read <= i < read + picker.window]
    rest = sorted((i for i in fresh if i not in window), key=lambda i: order[i])
    expected = (window + rest)[:count]
    picked = picker.pick(peer, count, read)
    if len(expected) == count or not picker._endgame():
        assert picked == expected
    else:
        assert picked[: len(expected)] == expected  # then endgame duplicates
