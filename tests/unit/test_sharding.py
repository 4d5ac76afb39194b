"""B24_SWEEP_EVERY_NIGHTS: exactly design §4's rule, every portal once in N nights, evenly."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from b24_cleanup.sharding import days_since_epoch, due_tonight, shard_of, tonight

IDS = [hashlib.md5(str(i).encode()).hexdigest() for i in range(3000)]  # noqa: S324 - ids, not security


def test_days_since_epoch_is_utc_whole_days() -> None:
    assert days_since_epoch("1970-01-01T00:00:00Z") == 0
    assert days_since_epoch("1970-01-01T23:59:59Z") == 0
    assert days_since_epoch("1970-01-02T00:00:00Z") == 1
    assert days_since_epoch("2026-12-01T02:00:00Z") == 20788
    assert days_since_epoch("2026-12-01T02:00:00+03:00") == 20787  # 2026-11-30T23:00Z
    assert days_since_epoch("2026-12-01T02:00:00") == 20788  # naive = UTC


def test_the_rule_is_spec_section_4_verbatim() -> None:
    member_id = "a223c6b3710f85df22e9377d6c4f7553"
    for every in (2, 7, 30):
        for day in range(60):
            scheduled = f"2026-{1 + day // 28:02d}-{1 + day % 28:02d}T02:00:00Z"
            expected = int(hashlib.sha256(member_id.encode()).hexdigest()[:8], 16) % every == (
                days_since_epoch(scheduled) % every
            )
            assert due_tonight(member_id, scheduled, every) is expected


@pytest.mark.parametrize("every", [1, 2, 7, 30])
def test_every_portal_is_swept_exactly_once_in_n_consecutive_nights(every: int) -> None:
    seen: Counter[str] = Counter()
    for night in range(every):
        scheduled = f"2026-12-{1 + night:02d}T02:00:00Z"
        seen.update(tonight(IDS, scheduled, every))
    assert set(seen) == set(IDS) and set(seen.values()) == {1}


def test_nights_are_even_and_a_night_is_stable() -> None:
    sizes = Counter(shard_of(m, 7) for m in IDS)
    assert len(sizes) == 7 and max(sizes.values()) < 1.25 * len(IDS) / 7
    first = list(tonight(IDS, "2026-12-01T02:00:00Z", 7))
    assert first == list(tonight(IDS, "2026-12-08T02:00:00Z", 7))  # seven nights later: the same portals
    assert first == [m for m in IDS if due_tonight(m, "2026-12-01T02:00:00Z", 7)]


def test_one_night_in_one_is_every_night() -> None:
    assert list(tonight(iter(IDS[:5]), "2026-12-01T02:00:00Z", 1)) == IDS[:5]
