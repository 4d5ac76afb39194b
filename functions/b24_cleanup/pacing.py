"""Client-side pacing and backoff for one portal.

Bitrix24 counts requests per portal in a leaky bucket (design §10.10: drains 2/s, bursts to 50;
above that HTTP 503 QUERY_LIMIT_EXCEEDED). Keeping the same bucket on our side means the portal's
own limit is rarely hit; the backoff is for when it is anyway (another app on the same egress IP).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import B24Error, TransientError

DEFAULT_RATE = 2.0
DEFAULT_BURST = 50
# Requests reach the portal with varying delays, so two sent 1/rate apart may arrive closer
# together. Keeping a few units below the portal's burst absorbs that jitter (5 units = 2.5 s at
# 2 requests/s) at the cost of starting to pace a little earlier.
HEADROOM = 5
# Transient codes the job does not retry itself (see RetryPolicy).
_NOT_RETRIED = frozenset({"OVERLOAD_LIMIT", "ANSWER_TOO_SLOW", "ANSWER_TOO_LARGE"})


class LeakyBucket:
    """A thread-safe leaky bucket: each request adds 1, the level drains `rate` per second.

    `acquire` waits until one more request fits under `burst`. The server measures on arrival,
    after our send, so its level is never above ours when both count the same requests.
    """

    def __init__(
        self,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        level: float = 0.0,
    ) -> None:
        if rate <= 0 or burst <= 0 or level < 0:
            raise ValueError("rate and burst must be > 0, the starting level >= 0")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._level = level  # requests counted in already (0: a rested bucket)
        self._stamp = clock()
        self._lock = threading.Lock()

    def _drain(self, now: float) -> None:
        self._level = max(0.0, self._level - (now - self._stamp) * self.rate)
        self._stamp = now

    def acquire(self) -> float:
        """Wait for room for one request, then count it. Returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._drain(now)
            wait = max(0.0, (self._level + 1 - self.burst) / self.rate)
            # Count the request now so that concurrent callers queue behind it.
            self._level += 1
        if wait > 0:
            self._sleep(wait)
        return wait

    def saturate(self) -> None:
        """The portal said its bucket is full: assume ours is too, so the next calls pace."""
        with self._lock:
            self._drain(self._clock())
            self._level = max(self._level, float(self.burst))


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter (between half and all of the step), bounded in attempts and per-wait seconds."""

    attempts: int = 5  # tries in all, the first one included
    base: float = 0.5
    cap: float = 8.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before try number `attempt + 1` (attempt counts from 1)."""
        ceiling = min(self.cap, self.base * (2 ** (attempt - 1)))
        return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed request is tried again, and after how long (design §10.10, design §5 step 7).

    Modelled on urllib3's `Retry`: a decision from the error and the try count, no I/O. What is
    retried: transient errors, with backoff and jitter, up to `backoff.attempts` tries in all.
    `OPERATION_TIME_LIMIT` waits at least until the method unblocks (`operating_reset_at`), and
    fails at once when that is more than `max_time_limit_wait` away. `OVERLOAD_LIMIT` is a manual
    block: never retried, so as not to hammer a portal an admin must unblock. Nor is an answer over
    the total time or size limit (a portal that drips, stalls or floods would do it again and
    spend the invocation's time): the queue retries the job later.
    """

    backoff: Backoff = field(default_factory=Backoff)
    max_time_limit_wait: float = 30.0

    def wait(self, error: B24Error, tries: int, *, now: float, rng: random.Random | None = None) -> float | None:
        """Seconds to wait before try `tries + 1` after `error` ended try `tries`; None: give up."""
        code = error.code.upper()
        if not isinstance(error, TransientError) or code in _NOT_RETRIED or tries >= self.backoff.attempts:
            return None
        wait = self.backoff.delay(tries, rng)
        if code == "OPERATION_TIME_LIMIT" and error.operating_reset_at:
            wait = max(wait, error.operating_reset_at - now)
            if wait > self.max_time_limit_wait:
                return None
        return wait


class BucketRegistry:
    """One bucket per portal for the life of the process (a warm Lambda keeps its pacing)."""

    def __init__(self, rate: float = DEFAULT_RATE, burst: int = DEFAULT_BURST, headroom: int = HEADROOM) -> None:
        self.rate = rate
        self.burst = max(1, burst - headroom)
        self._buckets: dict[str, LeakyBucket] = {}
        self._lock = threading.Lock()

    def get(self, member_id: str) -> LeakyBucket:
        with self._lock:
            bucket = self._buckets.get(member_id)
            if bucket is None:
                bucket = self._buckets[member_id] = LeakyBucket(self.rate, self.burst)
            return bucket
