"""A token bucket for --upload-limit and --download-limit. Pure: time comes in as an argument.

``rate`` bytes per second refill a bucket of ``burst`` bytes. ``take(n, now)`` spends n tokens
(going into debt if needed, so a large piece is never starved forever) and returns how long the
caller must wait before sending them; the trio adapter sleeps that long.
"""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 10, 256 * 1024)
        self._tokens = self.burst
        self._updated = now

    def take(self, amount: int, now: float) -> float:
        """Spend ``amount`` tokens; return the seconds to wait before using them (0 if none)."""
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class RateLimiter:
    """The trio side of a TokenBucket (None rate = unlimited)."""

    def __init__(self, rate: float | None) -> None:
        self._bucket = TokenBucket(rate) if rate else None

    async def acquire(self, amount: int) -> None:
        """Take ``amount``; sleeps only when the bucket is short. Not a checkpoint otherwise:
        the callers do socket IO around it, and a trip through trio's scheduler per chunk
        was a visible share of an agent's CPU."""
        import trio

        if self._bucket is None:
            return
        wait = self._bucket.take(amount, trio.current_time())
        if wait > 0:
            await trio.sleep(wait)
