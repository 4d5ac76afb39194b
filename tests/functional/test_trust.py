"""Trust under adversity (issue 13, the worker's half): forged uninstalls, races with other writers.

Each test is named after the rule it holds (design §5 steps 3, 6, 8; §7). Everything runs on the
real wire: the project's emulator over loopback HTTP and moto. A race with another writer is
staged from inside the emulator (a `fail_command` match that writes SSM while the portal is
answering), so the engine meets it exactly where it would in production: between its read and
its write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from b24_cleanup import runtime
from b24_cleanup.engine import Engine, EngineOptions
from b24_cleanup.handlers import worker
from b24_cleanup.jobs import Action, Job, Outcome
from b24_cleanup.ops.sandbox import Sandbox, SeededPortal, sandbox, sqs_event
from b24_cleanup.pacing import Backoff

APP_URL = "https://app.example.com/b24/events"
UNINSTALL_URL = "https://app.example.com/b24/uninstall"
OLD_URL = "https://old-deploy.example.com/b24/events"
DECLARED = [
    {"event": "ONCRMLEADADD", "handler": APP_URL},
    {"event": "ONAPPUNINSTALL", "handler": UNINSTALL_URL},
]
# Declared rows, orphans under two auth types, an offline queue and a stale ONAPPUNINSTALL URL:
# everything an unbinding uninstall would have removed.
LIVE_ROWS = [
    {"event": "ONCRMLEADADD", "handler": APP_URL},
    {"event": "ONAPPUNINSTALL", "handler": UNINSTALL_URL},
    {"event": "ONAPPUNINSTALL", "handler": OLD_URL},
    {"event": "ONCRMLEADADD", "handler": OLD_URL, "user_id": 1},
    {"event": "ONCRMLEADADD", "handler": OLD_URL, "user_id": 2},
    {"event": "ONCRMDEALUPDATE", "offline": True},
]
FAST = EngineOptions(backoff=Backoff(attempts=2, base=0.01, cap=0.02), settle_seconds=0.05)
DAY = 86400


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox(declared=DECLARED) as sb:
        runtime.reset()
        yield sb
        runtime.reset()


def engine(box: Sandbox, **kwargs: Any) -> Engine:
    kwargs.setdefault("options", FAST)
    return Engine(box.store, **kwargs)


def uninstall(seeded: SeededPortal, token: str | None = None) -> Job:
    token = token or seeded.installation.application_token
    return Job(Action.UNINSTALL, seeded.member_id, application_token=token, ts="1")


def sweep(seeded: SeededPortal) -> Job:
    return Job(Action.SWEEP, seeded.member_id)


def rows(box: Sandbox, seeded: SeededPortal) -> list[tuple[str, str, int]]:
    return sorted((r["event"], r.get("handler", ""), r.get("auth_type", 0)) for r in seeded.portal.handlers(box.app))


def while_answering(seeded: SeededPortal, method: str, code: str, side_effect: Callable[[], None]) -> None:
    """The portal answers `method` with `code` once, after `side_effect` ran (another writer's move)."""
    fired: list[bool] = []

    def match(called: str, _params: dict[str, Any]) -> bool:
        if called != method or fired:
            return False
        fired.append(True)
        side_effect()
        return True

    seeded.portal.fail_command(match, code, times=1)


# ------------------------------------------------------------------- item 1: forged ONAPPUNINSTALL


def test_forged_uninstall_with_leaked_token_changes_nothing(box: Sandbox) -> None:
    """design §5 step 6, §7: the leaked application_token is genuine, the tokens work: nothing happens."""
    seeded = box.add_portal("live.bitrix24.test", handlers=LIVE_ROWS)
    before_rows, before = rows(box, seeded), box.record(seeded.member_id).data

    result = engine(box).run(uninstall(seeded))

    assert result.outcome is Outcome.SKIPPED and result.unconfirmed
    assert "unconfirmed" in result.reason
    assert not result.record_deleted and box.record(seeded.member_id).data == before
    assert rows(box, seeded) == before_rows
    assert box.emulator.requests_log(member_id=seeded.member_id, method="batch") == []
    assert box.emulator.requests_log(member_id=seeded.member_id, method="event.unbind") == []
    assert result.rest_calls == 1  # design request budget: an uninstall costs one event.get
    assert result.metrics()["UninstallUnconfirmed"] == 1 and result.metrics()["PortalsSkipped"] == 1
    assert result.unbound == 0


def test_forged_uninstall_in_a_dry_run_is_unconfirmed_too(box: Sandbox) -> None:
    seeded = box.add_portal("dry-live.bitrix24.test", handlers=LIVE_ROWS)
    result = engine(box, dry_run=True).run(uninstall(seeded))
    assert result.outcome is Outcome.SKIPPED and result.unconfirmed and result.unbound == 0
    assert len(seeded.portal.handlers(box.app)) == len(LIVE_ROWS)


def test_forged_uninstall_through_the_worker_emits_uninstall_unconfirmed_and_a_warning(
    box: Sandbox, lambda_context: Any, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in box.env().items():
        monkeypatch.setenv(key, value)
    runtime.reset()
    runtime.use_engine(engine(box))
    seeded = box.add_portal("live-worker.bitrix24.test", handlers=LIVE_ROWS)
    token = seeded.installation.application_token
    body = {"action": "uninstall", "member_id": seeded.member_id, "application_token": token, "clean": True, "ts": "9"}
    message = {"MessageId": "m-1", "ReceiptHandle": "r", "Body": json.dumps(body)}
    message["Attributes"] = {"MessageGroupId": seeded.member_id}  # type: ignore[assignment]

    answer = worker.lambda_handler(sqs_event([message], "arn:aws:sqs:us-east-1:123456789012:q.fifo"), lambda_context)

    assert answer == {"batchItemFailures": []}
    assert box.record(seeded.member_id) is not None and len(seeded.portal.handlers(box.app)) == len(LIVE_ROWS)
    out = capsys.readouterr().out
    blobs = [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]
    [blob] = [b for b in blobs if b["action"] == "uninstall"]
    assert blob["UninstallUnconfirmed"] == [1.0] and blob["PortalsSkipped"] == [1.0]
    assert "HandlersUnbound" not in blob
    warnings = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"WARNING"' in line]
    assert any("unconfirmed" in w["message"] and "leaked application_token" in w["message"] for w in warnings)
    assert token not in out


def test_confirmed_uninstall_deletes_the_record_and_unbinds_nothing(box: Sandbox) -> None:
    seeded = box.add_portal("gone.bitrix24.test", handlers=LIVE_ROWS)
    box.emulator.uninstall(seeded.portal, box.app)

    result = engine(box).run(uninstall(seeded))

    assert result.outcome is Outcome.REVOKED and result.record_deleted and not result.unconfirmed
    assert box.record(seeded.member_id) is None
    assert result.rest_calls == 1


def test_uninstall_confirmed_by_the_oauth_server_deletes_the_record(box: Sandbox) -> None:
    seeded = box.add_portal("gone-expired.bitrix24.test", handlers=LIVE_ROWS, expired=True)
    box.emulator.uninstall(seeded.portal, box.app)

    result = engine(box).run(uninstall(seeded))

    assert result.outcome is Outcome.REVOKED and "from the OAuth server" in result.reason
    assert box.record(seeded.member_id) is None and result.rest_calls == 0


def test_confirmed_uninstall_keeps_a_record_reinstalled_meanwhile(box: Sandbox) -> None:
    seeded = box.add_portal("re.bitrix24.test")
    newer = box.record(seeded.member_id)
    newer.data["application_token"] = "a-newer-installation-token"

    while_answering(seeded, "event.get", "APPLICATION_NOT_FOUND", lambda: box.store.put(seeded.member_id, newer))
    result = engine(box).run(uninstall(seeded))

    assert result.outcome is Outcome.REVOKED and not result.record_deleted
    assert box.record(seeded.member_id).data == newer.data


def test_uninstall_refused_with_payment_required_alone_marks_revoked_at_instead_of_deleting(box: Sandbox) -> None:
    seeded = box.add_portal("unpaid.bitrix24.test", handlers=LIVE_ROWS)
    seeded.portal.fail_next(1, "PAYMENT_REQUIRED", methods={"event.get"})
    now = time.time()

    result = engine(box, clock=lambda: now).run(uninstall(seeded))

    assert result.outcome is Outcome.REVOKED and not result.record_deleted
    assert "PAYMENT_REQUIRED" in result.reason and "grace" in result.reason
    record = box.record(seeded.member_id)
    assert record is not None and record.revoked_at == int(now)
    assert len(seeded.portal.handlers(box.app)) == len(LIVE_ROWS)


def test_uninstall_with_payment_required_after_the_grace_period_deletes(box: Sandbox) -> None:
    now = time.time()
    seeded = box.add_portal("unpaid-long.bitrix24.test", extra={"revoked_at": int(now - 8 * DAY)})
    seeded.portal.fail_next(1, "PAYMENT_REQUIRED", methods={"event.get"})

    result = engine(box, clock=lambda: now).run(uninstall(seeded))

    assert result.outcome is Outcome.REVOKED and result.record_deleted
    assert box.record(seeded.member_id) is None


# ------------------------------------------------------------------- suspected: the grace-period delete


def test_grace_delete_keeps_a_record_whose_refresh_token_changed(box: Sandbox) -> None:
    """design §5 step 8: a pair stored meanwhile means someone is using the portal."""
    now = time.time()
    seeded = box.add_portal("in-use.bitrix24.test", extra={"revoked_at": int(now - 8 * DAY)})
    moved_on = box.record(seeded.member_id)
    moved_on.data["refresh_token"] = "a-pair-the-apps-backend-stored"

    while_answering(seeded, "event.get", "APPLICATION_NOT_FOUND", lambda: box.store.put(seeded.member_id, moved_on))
    result = engine(box, clock=lambda: now).run(sweep(seeded))

    assert result.outcome is Outcome.REVOKED and not result.record_deleted
    assert box.record(seeded.member_id).data == moved_on.data


def test_grace_delete_still_deletes_an_unchanged_record(box: Sandbox) -> None:
    now = time.time()
    seeded = box.add_portal("gone-long.bitrix24.test", extra={"revoked_at": int(now - 8 * DAY)})
    box.emulator.uninstall(seeded.portal, box.app)

    result = engine(box, clock=lambda: now).run(sweep(seeded))

    assert result.outcome is Outcome.REVOKED and result.record_deleted
    assert box.record(seeded.member_id) is None
