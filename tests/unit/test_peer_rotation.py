"""p2preg.peer_rotation: which download peer a full agent drops at a tracker answer in a large
swarm, and which of the answer it dials instead (shared by the agent and the simulator)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2preg.peer_rotation import (
    MAX_ROTATIONS,
    MIN_STARVED,
    peer_to_dial,
    peer_to_drop,
    rotations_at_answer,
)


def _never_sole(_: str) -> bool:
    return False


def test_the_peer_where_most_requests_starved_goes() -> None:
    peers = [("a", 1, 9), ("b", 3, 20), ("c", 2, 0)]
    assert peer_to_drop(peers, _never_sole) == "b"


def test_among_equally_starved_peers_the_one_that_delivered_least_goes() -> None:
    peers = [("a", 2, 9), ("b", 2, 4), ("c", 0, 0)]
    assert peer_to_drop(peers, _never_sole) == "b"


def test_no_peer_goes_where_no_request_starved() -> None:
    # A peer that delivered nothing but never kept us waiting is not crowded: it had nothing
    # for us (its pieces come later), so it stays.
    assert MIN_STARVED == 1
    assert peer_to_drop([("a", 0, 0), ("b", 0, 7)], _never_sole) is None
    assert peer_to_drop([], _never_sole) is None


def test_our_only_source_of_a_missing_piece_stays_even_when_most_starved() -> None:
    peers = [("fetcher", 9, 3), ("b", 1, 5), ("c", 0, 0)]
    assert peer_to_drop(peers, lambda key: key == "fetcher") == "b"
    assert peer_to_drop(peers, lambda key: key in {"fetcher", "b"}) is None


def test_the_peer_dialled_in_is_drawn_from_the_options() -> None:
    rng = random.Random(7)
    options = ["x", "y", "z"]
    drawn = {peer_to_dial(options, rng) for _ in range(200)}
    assert drawn == set(options)  # not always the first: that one is the fetcher, often
    assert peer_to_dial([], rng) is None


@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 50), st.booleans()),
        max_size=40,
    )
)
def test_the_dropped_peer_is_a_most_starved_one_that_is_not_a_sole_source(
    rows: list[tuple[int, int, bool]],
) -> None:
    peers = [(key, starved, delivered) for key, (starved, delivered, _) in enumerate(rows)]
    sole = {key for key, (_, _, is_sole) in enumerate(rows) if is_sole}
    out = peer_to_drop(peers, sole.__contains__)
    eligible = [(s, d) for key, s, d in peers if s >= MIN_STARVED and key not in sole]
    if not eligible:
        assert out is None
        return
    assert out is not None and out not in sole
    _, starved, delivered = peers[out]
    assert (starved, -delivered) == max((s, -d) for s, d in eligible)


@pytest.mark.parametrize(
    ("pace", "count"),
    [
        (None, 1),  # a tracker that does not pace: an answer a second
        (1.0, 1),
        (2.0, 1),  # 1,000 downloaders at the default budget
        (7.4, 1),
        (7.5, 2),
        (10.0, 2),  # the ceiling: 10,000 downloaders
        (3600.0, MAX_ROTATIONS),
        (math.inf, MAX_ROTATIONS),
        (0.0, 1),
        (-5.0, 1),
        (math.nan, 1),
    ],
)
def test_rotations_at_an_answer_follow_the_pace(pace: float | None, count: int) -> None:
    assert rotations_at_answer(pace) == count
