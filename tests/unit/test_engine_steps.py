"""The engine's unbind tally and its conclusion (design §5 steps 5 and 7), answer by answer.

The functional tests drive the same steps through the emulator; these pin each kind of answer.
"""

from __future__ import annotations

from types import MappingProxyType

import pytest

from b24_cleanup.commands import Command, CommandResult
from b24_cleanup.engine import Tally, _conclude, _unreadable
from b24_cleanup.errors import ExpiredTokenError, PermanentError, RateLimitedError, RevokedError, TransientError
from b24_cleanup.jobs import Action, JobResult, Outcome

URL = "https://old.example.com/h"


def online(key: str, event: str = "ONX") -> Command:
    return Command(key, "event.unbind", MappingProxyType({"event": event, "handler": URL}))


def offline(key: str, event: str = "ONY") -> Command:
    return Command(key, "event.unbind", MappingProxyType({"event": event, "event_type": "offline"}))


def tally(*pairs: tuple[Command, CommandResult]) -> Tally:
    return Tally.of([c for c, _ in pairs], {c.key: answer for c, answer in pairs})


def test_counts_what_each_command_removed() -> None:
    result = tally(
        (online("u0"), CommandResult({"count": 3})),
        (offline("u1"), CommandResult({"count": 1.0})),
        (online("u2"), CommandResult({"count": "2"})),  # not a number: counted as none
        (online("u3"), CommandResult(True)),  # no count at all
    )
    assert result == Tally(unbound=4)
    assert not result.unfinished and result.revoked is None


@pytest.mark.parametrize(
    ("error", "kind", "unfinished"),
    [
        (PermanentError("ACCESS_DENIED", method="event.unbind"), "permanent", False),
        (PermanentError("ERROR_ARGUMENT"), "permanent", False),
        (ExpiredTokenError("expired_token"), "permanent", False),  # inside a batch a retry cannot mend it
        (TransientError("INTERNAL_SERVER_ERROR"), "transient", True),
        (TransientError("MISSING_FROM_BATCH"), "transient", True),
        (RateLimitedError("QUERY_LIMIT_EXCEEDED"), "transient", True),
    ],
)
def test_a_failed_command_is_reported_with_its_kind(error: Exception, kind: str, unfinished: bool) -> None:
    result = tally((online("u0", "ONCRMLEADADD"), CommandResult(error=error)), (offline("u1"), CommandResult({})))
    assert result.failures == [{"event": "ONCRMLEADADD", "handler": URL, "error": error.code, "kind": kind}]
    assert result.unfinished is unfinished and result.revoked is None


def test_an_offline_failure_names_no_handler() -> None:
    result = tally((offline("u0"), CommandResult(error=PermanentError("ACCESS_DENIED"))))
    assert result.failures == [{"event": "ONY", "handler": None, "error": "ACCESS_DENIED", "kind": "permanent"}]


def test_a_command_not_attempted_is_left_for_the_retry_not_reported() -> None:
    result = tally(
        (online("u0"), CommandResult(error=TransientError("TIMEOUT"))),
        (online("u1"), CommandResult(attempted=False)),
    )
    assert len(result.failures) == 1
    assert result.unfinished

    only_skipped = tally((online("u0"), CommandResult({"count": 1})), (online("u1"), CommandResult(attempted=False)))
    assert only_skipped == Tally(unbound=1, unfinished=True)


def test_revoked_keeps_the_first_evidence_and_is_no_failure() -> None:
    first = RevokedError("APPLICATION_NOT_FOUND", "gone", method="event.unbind")
    result = tally(
        (online("u0"), CommandResult(error=first)),
        (online("u1"), CommandResult(error=RevokedError("PAYMENT_REQUIRED"))),
        (online("u2"), CommandResult({"count": 2})),
        (online("u3"), CommandResult(error=PermanentError("ACCESS_DENIED"))),
    )
    assert result.revoked is first
    assert result.unbound == 2 and len(result.failures) == 1 and not result.unfinished


def test_unreadable_rows_are_permanent_failures() -> None:
    assert _unreadable({"event": "ONX", "handler": 3}) == {
        "event": "ONX",
        "error": "UNREADABLE_ROW",
        "kind": "permanent",
    }
    assert _unreadable(["not", "a", "row"]) == {"event": None, "error": "UNREADABLE_ROW", "kind": "permanent"}


@pytest.mark.parametrize(
    ("failed", "had_orphans", "outcome"),
    [
        (0, False, Outcome.CLEAN),
        (0, True, Outcome.CLEANED),
        (2, True, Outcome.INCOMPLETE),
        (1, False, Outcome.INCOMPLETE),  # an unreadable row alone
    ],
)
def test_conclusion(failed: int, had_orphans: bool, outcome: Outcome) -> None:
    result = JobResult(Action.SWEEP, "m1", unbind_failed=failed)
    _conclude(result, had_orphans=had_orphans)
    assert result.outcome is outcome
    if outcome is Outcome.INCOMPLETE:
        assert result.reason == f"{failed} handler(s) could not be unbound (permanent errors)"
    else:
        assert result.reason == ""
