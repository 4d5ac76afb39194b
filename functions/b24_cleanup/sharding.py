"""Which portals tonight's sweep queues when it runs one night in N (design §4 `B24_SWEEP_EVERY_NIGHTS`).

A night refreshes nearly every portal it sweeps (access tokens live an hour), one SSM write each:
sharding spreads the fleet over N nights so that a night's writes fit the quota. The rule is
fixed by design §4 so that operators (and the CLI) can tell which night a portal is due:

    int(sha256(member_id)[:8], 16) % N == days_since_epoch(scheduled time) % N

Stable per portal (the same night every N), even across the fleet (sha256), and N ≤ 30 keeps
every refresh token used well within its 180 days.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

SECONDS_PER_DAY = 86_400


def days_since_epoch(scheduled_time: str) -> int:
    """Whole UTC days from 1970-01-01 to `scheduled_time` (ISO 8601, e.g. 2026-12-01T02:00:00Z)."""
    moment = datetime.fromisoformat(scheduled_time.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # the scheduler's times are UTC
    return int(moment.timestamp() // SECONDS_PER_DAY)


def shard_of(member_id: str, every: int) -> int:
    return int(hashlib.sha256(member_id.encode()).hexdigest()[:8], 16) % every


def due_tonight(member_id: str, scheduled_time: str, every: int) -> bool:
    """True when the run at `scheduled_time` sweeps `member_id` (always, for every = 1)."""
    if every <= 1:
        return True
    return shard_of(member_id, every) == days_since_epoch(scheduled_time) % every


def tonight(member_ids: Iterable[str], scheduled_time: str, every: int) -> Iterator[str]:
    """The member ids tonight's run queues, lazily (the scheduler's memory stays constant)."""
    if every <= 1:
        yield from member_ids
        return
    night = days_since_epoch(scheduled_time) % every
    for member_id in member_ids:
        if shard_of(member_id, every) == night:
            yield member_id
