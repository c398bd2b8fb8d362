"""p2preg.announce_pacing: how often the tracker asks a downloader to announce, so that one
tracker keeps up with a large fleet (`python -m simulations.bench_tracker` measured ~1 ms of
tracker CPU per announce with 10,000 peers in a swarm)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2preg.announce_pacing import ANNOUNCE_INTERVAL, downloader_interval


def test_once_a_second_while_the_budget_allows_then_slower_in_proportion() -> None:
    assert downloader_interval(0) == ANNOUNCE_INTERVAL == 1.0
    assert downloader_interval(500, budget=500) == 1.0
    assert downloader_interval(1_000, budget=500) == 2.0
    assert downloader_interval(10_000, budget=500, ceiling=10.0) == 10.0  # the ceiling binds
    assert downloader_interval(10_000, budget=2_000, ceiling=10.0) == 5.0


@given(
    peers=st.integers(0, 10**7),
    budget=st.floats(1, 1e6),
    ceiling=st.floats(0.1, 1e4),
)
def test_between_a_second_and_the_ceiling_and_within_the_budget_below_it(
    peers: int, budget: float, ceiling: float
) -> None:
    pace = downloader_interval(peers, budget, ceiling)
    assert ANNOUNCE_INTERVAL <= pace <= max(ceiling, ANNOUNCE_INTERVAL)
    if pace < ceiling:
        assert peers / pace <= budget * (1 + 1e-12)  # announces a second within the budget
