from __future__ import annotations

import pytest
import trio
import trio.testing

from p2preg.token_bucket import RateLimiter, TokenBucket


def test_bucket_allows_burst_then_paces() -> None:
    bucket = TokenBucket(rate=1000, burst=500, now=0.0)
    assert bucket.take(500, 0.0) == 0.0
    assert bucket.take(1000, 0.0) == pytest.approx(1.0)
    # After waiting the debt off, the next take waits for its own tokens only.
    assert bucket.take(100, 1.0) == pytest.approx(0.1)


def test_bucket_long_run_rate() -> None:
    bucket = TokenBucket(rate=10_000, burst=1000, now=0.0)
    now = 0.0
    for _ in range(100):
        now += bucket.take(1000, now)
    assert now == pytest.approx(100 * 1000 / 10_000 - 0.1, rel=0.05)


async def test_rate_limiter_paces_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(1024 * 1024)
    start = trio.current_time()
    for _ in range(20):
        await limiter.acquire(256 * 1024)
    elapsed = trio.current_time() - start
    assert elapsed == pytest.approx(20 * 0.25 - 0.25, rel=0.05)
