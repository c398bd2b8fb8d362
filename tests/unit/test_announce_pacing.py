"""p2preg.announce_pacing: when the tracker asks a downloader to announce again, so that one
tracker keeps up with a large fleet (`python -m simulations.bench_tracker` measured ~1 ms of
tracker CPU per announce with 10,000 peers in a swarm) and a burst of announces does not come
back as one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2preg.announce_pacing import ANNOUNCE_INTERVAL, AnnounceCalendar


def test_a_second_while_the_budget_has_room() -> None:
    calendar = AnnounceCalendar(budget=500, ceiling=10.0)
    assert ANNOUNCE_INTERVAL == 1.0
    for now in (0.0, 0.5, 3.0, 100.0):  # 2 announces a second: the calendar never fills
        assert calendar.pace(now, downloading=2) == 1.0


def test_a_burst_is_spread_over_the_slots_up_to_the_ceiling() -> None:
    """Announces at the same moment get slots 1 / budget apart: the next announces come
    back spread out, not as the burst they were."""
    calendar = AnnounceCalendar(budget=4, ceiling=3.0)
    paces = [calendar.pace(0.0, downloading=8) for _ in range(12)]
    assert paces == [1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75] + [3.0] * 4
    # Later the calendar has room again: a second.
    assert calendar.pace(10.0, downloading=8) == 1.0


def test_more_records_than_the_ceiling_allows_at_the_budget_get_closer_slots() -> None:
    """10,000 downloaders at 500 a second would need 20 s; at most 10 s is allowed, so the
    slots are 10,000 / 10 s = 1 ms apart: 9,000 of the burst spread from the first second to
    the tenth and a tenth pile on the tenth, not 4,500 spread and 5,500 piled there."""
    calendar = AnnounceCalendar(budget=500, ceiling=10.0)
    paces = [calendar.pace(0.0, downloading=10_000) for _ in range(10_000)]
    assert paces[0] == 1.0 and paces[-1] == 10.0
    assert paces[4_500] == pytest.approx(5.5)
    assert 999 <= sum(1 for p in paces if p == 10.0) <= 1_001  # (1 ms steps in floats)


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="budget"):
        AnnounceCalendar(budget=0)


@given(
    budget=st.floats(0.1, 1e5),
    ceiling=st.floats(0.1, 1e3),
    calls=st.lists(st.tuples(st.floats(0, 5), st.integers(0, 10**6)), min_size=1, max_size=200),
)
def test_between_a_second_and_the_ceiling_and_spaced_at_the_rate_below_it(
    budget: float, ceiling: float, calls: list[tuple[float, int]]
) -> None:
    calendar = AnnounceCalendar(budget, ceiling)
    top = max(ceiling, ANNOUNCE_INTERVAL)
    now, previous = 0.0, None
    for step, downloading in calls:
        now += step
        slot = now + calendar.pace(now, downloading)
        assert now + ANNOUNCE_INTERVAL <= slot <= now + top
        if previous is not None and slot < now + top:
            previous_slot, rate = previous
            # below the ceiling a slot is at least a slot's width after the one before
            assert slot >= previous_slot + 1 / rate - 1e-9 * max(1.0, slot)
        previous = (slot, max(budget, downloading / top))
