"""The engine against the emulator over real HTTP and moto (design §5 steps 1-8)."""

from __future__ import annotations

import math
import time

import pytest
from fixtures.sandbox import APP_URL, FAST, OLD_URL

from b24_cleanup.engine import Engine, EngineOptions
from b24_cleanup.errors import JobFailedError
from b24_cleanup.jobs import Action, Job, Outcome
from b24_cleanup.ops.sandbox import Sandbox

DECLARED = [
    {"event": "ONCRMLEADADD", "handler": APP_URL},
    {"event": "ONCRMDEALUPDATE", "event_type": "offline"},
    {"event": "ONAPPUNINSTALL", "handler": "https://app.example.com/b24/uninstall"},
    {"event": "ONCRMCONTACTADD", "handler": APP_URL},  # never bound on the portals below: missing
]
pytestmark = pytest.mark.box(declared=DECLARED)


def make_engine(box: Sandbox, **kwargs: object) -> Engine:
    kwargs.setdefault("options", FAST)
    kwargs.setdefault("orphan_grace_days", 0)  # orphans may go at once here; test_held_orphans.py holds them
    kwargs.setdefault("oauth_url", box.emulator.oauth_url)  # the emulator is no trusted OAuth host
    return Engine(box.store, **kwargs)  # type: ignore[arg-type]


def rest_calls(box: Sandbox, member_id: str, method: str | None = None) -> int:
    return len(box.emulator.requests_log(member_id=member_id, kind="rest", method=method))


def uninstall_job(seeded) -> Job:
    return Job(Action.UNINSTALL, seeded.member_id, application_token=seeded.installation.application_token, ts="1")


def sweep_job(seeded) -> Job:
    return Job(Action.SWEEP, seeded.member_id)


# --------------------------------------------------------------------------------------------- uninstall


def test_uninstall_on_revoked_portal_deletes_the_record(box: Sandbox) -> None:
    seeded = box.add_portal("gone.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": APP_URL}])
    box.emulator.uninstall(seeded.portal, box.app)

    result = make_engine(box).run(uninstall_job(seeded))

    assert result.outcome is Outcome.REVOKED
    assert "APPLICATION_NOT_FOUND" in result.reason
    assert result.record_deleted
    assert box.record(seeded.member_id) is None
    assert rest_calls(box, seeded.member_id) == 1


def test_sweep_unbinds_every_orphan_on_budget(box: Sandbox) -> None:
    rows = []
    for i in range(20):  # 20 URLs x 3 auth_types: one command per pair
        rows += [{"event": "ONCRMLEADADD", "handler": f"{OLD_URL}/{i}", "user_id": u} for u in (0, 1, 2)]
    rows += [{"event": "ONCRMDEALADD", "handler": f"https://u{i}.example.com/h"} for i in range(60)]
    rows += [
        {"event": "ONCRMDEALUPDATE", "offline": True},  # declared offline: kept
        {"event": "ONCRMLEADUPDATE", "offline": True},
        {"event": "ONCRMLEADDELETE", "offline": True},
        {"event": "ONCRMLEADUPDATE", "offline": True, "connector_id": "erp"},
    ]
    seeded = box.add_portal("full.bitrix24.test", handlers=rows)

    result = make_engine(box).run(sweep_job(seeded))

    pairs, offline_plain, offline_keyed = 20 + 60, 2, 1  # p, f, g of design §5's budget
    assert result.outcome is Outcome.CLEANED
    assert result.found == 124
    assert result.unbound == 123
    assert [r["event"] for r in seeded.portal.handlers(box.app)] == ["ONCRMDEALUPDATE"]
    budget = 1 + math.ceil((pairs + offline_plain) / 50) + offline_keyed
    assert result.rest_calls == budget == rest_calls(box, seeded.member_id)
    assert rest_calls(box, seeded.member_id, "batch") == 2
    assert box.record(seeded.member_id) is not None


def test_stale_uninstall_touches_nothing(box: Sandbox) -> None:
    seeded = box.add_portal("re.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": OLD_URL}])
    before = box.record(seeded.member_id)
    job = Job(Action.UNINSTALL, seeded.member_id, application_token="an-older-install-token", ts="1")

    result = make_engine(box).run(job)

    assert result.outcome is Outcome.SKIPPED
    assert rest_calls(box, seeded.member_id) == 0
    assert box.record(seeded.member_id).data == before.data
    assert len(seeded.portal.handlers(box.app)) == 1


def test_job_for_a_portal_without_record_is_skipped(box: Sandbox) -> None:
    seeded = box.add_portal("nostore.bitrix24.test", store=False)
    assert make_engine(box).run(sweep_job(seeded)).outcome is Outcome.SKIPPED
    assert make_engine(box).run(uninstall_job(seeded)).outcome is Outcome.SKIPPED
    assert rest_calls(box, seeded.member_id) == 0


def test_non_admin_token_unbinds_its_own_orphans(box: Sandbox) -> None:
    seeded = box.add_portal(
        "user.bitrix24.test",
        handlers=[
            {"event": "ONCRMLEADADD", "handler": OLD_URL, "user_id": 2},
            {"event": "ONCRMLEADADD", "handler": OLD_URL, "user_id": 1},
            {"event": "ONCRMLEADADD", "handler": APP_URL, "user_id": 2},
        ],
    )
    pair = box.emulator.issue_tokens(seeded.portal, box.app, 2)  # user 2 is not an admin
    record = box.record(seeded.member_id)
    record.data.update(access_token=pair.access_token, refresh_token=pair.refresh_token, expires=pair.expires)
    box.store.put(seeded.member_id, record)

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.CLEANED
    assert result.found == 2  # a non-admin sees only its own rows
    assert result.unbound == 1 and result.kept == 1 and result.unbind_failed == 0
    left = seeded.portal.handlers(box.app)
    assert {(r["handler"], r["auth_type"]) for r in left} == {(OLD_URL, "1"), (APP_URL, "2")}


# --------------------------------------------------------------------------------------------- sweep


def test_sweep_unbinds_only_orphans_and_reports_missing(box: Sandbox) -> None:
    seeded = box.add_portal(
        "sweep.bitrix24.test",
        handlers=[
            {"event": "ONCRMLEADADD", "handler": APP_URL, "user_id": 0},
            {"event": "oncrmleadadd", "handler": APP_URL, "user_id": 1},
            {"event": "ONCRMLEADADD", "handler": OLD_URL, "user_id": 0},
            {"event": "ONCRMLEADADD", "handler": OLD_URL, "user_id": 1},
            {"event": "ONCRMDEALUPDATE", "offline": True},
            {"event": "ONCRMLEADUPDATE", "offline": True},
            {"event": "ONAPPUNINSTALL", "handler": "https://app.example.com/b24/uninstall"},
            {"event": "ONAPPUNINSTALL", "handler": OLD_URL},
        ],
    )

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.CLEANED
    assert (result.found, result.kept, result.unbound, result.missing) == (8, 4, 4, 1)
    assert result.missing_handlers == [{"event": "ONCRMCONTACTADD", "handler": APP_URL}]
    left = {(r["event"], r.get("handler")) for r in seeded.portal.handlers(box.app)}
    assert left == {
        ("ONCRMLEADADD", APP_URL),
        ("ONCRMDEALUPDATE", None),
        ("ONAPPUNINSTALL", "https://app.example.com/b24/uninstall"),
    }
    assert result.rest_calls == 2
    assert box.record(seeded.member_id) is not None


def test_sweep_of_a_clean_portal_makes_one_request(box: Sandbox) -> None:
    seeded = box.add_portal("clean.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": APP_URL}])
    result = make_engine(box).run(sweep_job(seeded))
    assert result.outcome is Outcome.CLEAN
    assert result.rest_calls == 1 == rest_calls(box, seeded.member_id)


@pytest.mark.parametrize(
    "declared",
    [
        None,
        '{"handlers": []}',
        '{"handlers": [{"event": "ONCRMLEADADD", "handler": "https://app.example.com/h"}, {"event": " "}]}',
        "not json",
    ],
    ids=["missing", "empty", "one-malformed", "unparseable"],
)
def test_invalid_declared_set_unbinds_nothing(box: Sandbox, declared: str | None) -> None:
    seeded = box.add_portal("cfg.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": OLD_URL}])
    box.put_declared(declared)

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.SKIPPED
    assert result.declared_set_invalid
    assert result.metrics()["DeclaredSetInvalid"] == 1
    assert rest_calls(box, seeded.member_id) == 0
    assert len(seeded.portal.handlers(box.app)) == 1


# --------------------------------------------------------------------------------------------- failures


def _orphans(n: int) -> list[dict]:
    return [{"event": "ONCRMDEALADD", "handler": f"https://o{i}.example.com/h"} for i in range(n)]


def test_transient_command_failure_fails_the_job_and_a_rerun_finishes(box: Sandbox) -> None:
    seeded = box.add_portal("flaky.bitrix24.test", handlers=_orphans(5))
    bad = "https://o2.example.com/h"
    seeded.portal.fail_command(
        lambda m, p: m == "event.unbind" and p.get("handler") == bad, "INTERNAL_SERVER_ERROR", 500, times=1
    )

    with pytest.raises(JobFailedError) as failed:
        make_engine(box).run(sweep_job(seeded))
    first = failed.value.result
    assert first.outcome is Outcome.FAILED
    assert first.unbound == 4 and first.unbind_failed == 1
    assert first.failures == [
        {"event": "ONCRMDEALADD", "handler": bad, "error": "INTERNAL_SERVER_ERROR", "kind": "transient"}
    ]
    assert [r["handler"] for r in seeded.portal.handlers(box.app)] == [bad]

    again = make_engine(box).run(sweep_job(seeded))
    assert again.outcome is Outcome.CLEANED and again.unbound == 1
    assert seeded.portal.handlers(box.app) == []


def test_connector_keyed_offline_rows_go_by_single_calls_on_budget(box: Sandbox) -> None:
    """design §5 step 5: inside `batch` a command's auth_connector is not read (the emulator, like
    the portal, applies the batch's own), so each connector-keyed row is a single call."""
    rows = [{"event": "ONCRMDEALADD", "handler": f"https://o{i}.example.com/h"} for i in range(55)]  # p = 55
    rows += [{"event": "ONCRMLEADUPDATE", "offline": True}, {"event": "ONCRMDEALADD", "offline": True}]  # f = 2
    rows += [
        {"event": "ONCRMLEADUPDATE", "offline": True, "connector_id": "erp"},
        {"event": "ONCRMLEADUPDATE", "offline": True, "connector_id": "shop"},
        {"event": "ONCRMDEALADD", "offline": True, "connector_id": "erp"},
    ]  # g = 3
    kept = [
        {"event": "ONCRMLEADADD", "handler": APP_URL},
        {"event": "ONCRMDEALUPDATE", "offline": True, "connector_id": "erp"},  # declared offline event
    ]
    seeded = box.add_portal("connectors.bitrix24.test", handlers=rows + kept)
    box.emulator.clear_log()

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.CLEANED
    assert result.unbound == 55 + 2 + 3
    left = seeded.portal.handlers(box.app)
    assert left == [
        {"event": "ONCRMLEADADD", "handler": APP_URL, "auth_type": "0", "offline": 0},
        {"event": "ONCRMDEALUPDATE", "connector_id": "erp", "offline": 1},
    ]
    assert result.rest_calls == 1 + math.ceil((55 + 2) / 50) + 3 == rest_calls(box, seeded.member_id)
    assert rest_calls(box, seeded.member_id, "batch") == 2
    singles = box.emulator.requests_log(member_id=seeded.member_id, method="event.unbind")
    assert len(singles) == 3 and all("auth_connector" in e.params_keys for e in singles)
    batches = box.emulator.requests_log(member_id=seeded.member_id, method="batch")
    assert all("auth_connector" not in e.params_keys for e in batches)


def test_permanent_command_failure_ends_incomplete(box: Sandbox) -> None:
    rows = [*_orphans(3), {"event": "ONCRMLEADUPDATE", "offline": True, "connector_id": "erp"}]
    seeded = box.add_portal("licence.bitrix24.test", handlers=rows)
    seeded.portal.license_auth_connector = False  # unbinding a connector's queue: WRONG_LICENSE

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.INCOMPLETE
    assert result.unbound == 3 and result.unbind_failed == 1
    assert result.failures[0]["error"] == "WRONG_LICENSE"
    assert box.record(seeded.member_id) is not None
    assert result.metrics()["PortalsIncomplete"] == 1


def test_transient_5xx_raises_and_a_rerun_succeeds(box: Sandbox) -> None:
    seeded = box.add_portal("down.bitrix24.test", handlers=_orphans(2))
    seeded.portal.fail_next(3, "INTERNAL_SERVER_ERROR", 500)

    with pytest.raises(JobFailedError) as failed:
        make_engine(box).run(sweep_job(seeded))
    assert failed.value.result.outcome is Outcome.FAILED
    assert failed.value.result.metrics()["PortalsFailed"] == 1
    assert len(seeded.portal.handlers(box.app)) == 2

    assert make_engine(box).run(sweep_job(seeded)).outcome is Outcome.CLEANED


def test_overload_limit_is_not_hammered(box: Sandbox) -> None:
    seeded = box.add_portal("blocked.bitrix24.test", handlers=_orphans(1))
    seeded.portal.fail_next(5, "OVERLOAD_LIMIT", 503)
    with pytest.raises(JobFailedError):
        make_engine(box).run(sweep_job(seeded))
    assert rest_calls(box, seeded.member_id) == 1


def test_batch_refused_falls_back_to_paced_single_calls(box: Sandbox) -> None:
    box.emulator.clear_log()
    seeded = box.add_portal("nobatch.bitrix24.test", handlers=_orphans(300))
    seeded.portal.refuse_batch = True
    # A faster bucket than a real portal's keeps the test short; the client paces with the same one.
    seeded.portal.rate = 100.0
    options = EngineOptions(backoff=FAST.backoff, settle_seconds=0.05, rate=100.0, burst=50)

    started = time.monotonic()
    result = make_engine(box, options=options).run(sweep_job(seeded))
    elapsed = time.monotonic() - started

    assert result.outcome is Outcome.CLEANED and result.unbound == 300
    assert seeded.portal.handlers(box.app) == []
    log = box.emulator.requests_log(member_id=seeded.member_id, kind="rest")
    assert len(log) == 1 + 1 + 300  # event.get, the refused batch, one call per command
    assert sum(1 for entry in log if entry.status == 503) == result.rate_limited == 0
    assert elapsed >= (len(log) - 50) / 100.0 * 0.9  # paced, not fired at once


# --------------------------------------------------------------------------------------------- tokens


def test_expired_token_is_refreshed_and_persisted_before_use(box: Sandbox) -> None:
    seeded = box.add_portal("exp.bitrix24.test", handlers=_orphans(1), expired=True)
    old = box.record(seeded.member_id)

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.CLEANED and result.refreshed == 1
    new = box.record(seeded.member_id)
    assert new.refresh_token != old.refresh_token and new.access_token != old.access_token
    assert new.expires > time.time() + 3000
    oauth = box.emulator.requests_log(kind="oauth")
    assert len(oauth) == 1 and oauth[0].status == 200
    # The old refresh token is spent: the emulator refuses it now.
    from b24_cleanup.errors import InvalidGrantError
    from b24_cleanup.oauth import OAuthClient

    with pytest.raises(InvalidGrantError):
        OAuthClient(box.store.app_credentials()).refresh(box.emulator.oauth_url, old.refresh_token)


def test_a_wrong_client_id_leaves_the_job_incomplete_and_never_marks_a_portal_revoked(box: Sandbox) -> None:
    """wrong_client (HTTP 200) is no word about the portal: never "gone", nothing marked or deleted."""
    seeded = box.add_portal("cfg.bitrix24.test", handlers=_orphans(1), expired=True)
    before = box.record(seeded.member_id)
    box.store.client.put_parameter(
        Name=f"{box.store.prefix}/app/credentials",
        Value='{"client_id": "local.unknown.00000000", "client_secret": "whatever"}',
        Type="SecureString",
        Overwrite=True,
    )

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.INCOMPLETE and "wrong_client" in result.reason
    assert not result.record_deleted
    assert box.record(seeded.member_id).data == before.data  # no revoked_at; the pair untouched
    assert rest_calls(box, seeded.member_id) == 0


def test_no_auth_found_on_a_fresh_looking_token_refreshes_once(box: Sandbox) -> None:
    seeded = box.add_portal("noauth.bitrix24.test", handlers=_orphans(1))
    seeded.portal.fail_next(1, "NO_AUTH_FOUND", 401, methods={"event.get"})

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.CLEANED and result.refreshed == 1
    assert result.rest_calls == 3  # refused event.get, event.get again, one batch


def test_expired_again_after_refresh_means_revoked(box: Sandbox) -> None:
    seeded = box.add_portal("loop.bitrix24.test", handlers=_orphans(1))
    seeded.portal.fail_next(2, "expired_token", 401, methods={"event.get"})

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.REVOKED and "expired_token" in result.reason
    assert box.record(seeded.member_id).revoked_at is not None


def test_renamed_portal_is_followed_and_remembered(box: Sandbox) -> None:
    seeded = box.add_portal("old-name.bitrix24.test", handlers=_orphans(1))
    seeded.portal.rename("new-name.bitrix24.test")  # another host: followed once the OAuth server confirms it

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.CLEANED and result.refreshed == 1  # the one confirming refresh
    record = box.record(seeded.member_id)
    assert record.client_endpoint == seeded.portal.client_endpoint
    assert record.domain == seeded.portal.domain == seeded.portal.host  # the host it moved to


def test_a_dry_run_follows_a_renamed_portal_and_keeps_only_the_refresh_it_made(box: Sandbox) -> None:
    seeded = box.add_portal("was-here.bitrix24.test", handlers=_orphans(1))
    before = box.record(seeded.member_id).data
    seeded.portal.rename("is-there.bitrix24.test")

    result = make_engine(box, dry_run=True).run(sweep_job(seeded))

    assert result.outcome is Outcome.CLEANED and result.unbound == 1  # planned at the new address
    after = box.record(seeded.member_id).data
    # The move to another host cost a refresh, and a rotated pair is never dropped (design §4
    # B24_DRY_RUN): the pair and what the OAuth answer said of the address are stored, nothing else.
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    assert changed <= {"access_token", "refresh_token", "expires", "client_endpoint", "domain"}
    assert after["client_endpoint"] == seeded.portal.client_endpoint  # as the OAuth server said it
    assert after["refresh_token"] == box.emulator.state.latest_tokens(seeded.installation.chain).refresh_token


# --------------------------------------------------------------------------------------------- revoked


def test_sweep_marks_revoked_then_deletes_after_grace(box: Sandbox) -> None:
    seeded = box.add_portal("left.bitrix24.test", handlers=_orphans(1))
    box.emulator.uninstall(seeded.portal, box.app)
    now = time.time()

    first = make_engine(box, clock=lambda: now).run(sweep_job(seeded))
    assert first.outcome is Outcome.REVOKED
    assert box.record(seeded.member_id).revoked_at == int(now)

    later = make_engine(box, clock=lambda: now + 3 * 86400).run(sweep_job(seeded))
    assert later.outcome is Outcome.REVOKED and not later.record_deleted
    assert box.record(seeded.member_id).revoked_at == int(now)  # first time only

    after_grace = make_engine(box, clock=lambda: now + 7 * 86400).run(sweep_job(seeded))
    assert after_grace.outcome is Outcome.REVOKED and after_grace.record_deleted
    assert box.record(seeded.member_id) is None


def test_reachable_portal_loses_its_revoked_mark(box: Sandbox) -> None:
    seeded = box.add_portal("back.bitrix24.test", extra={"revoked_at": 12345, "custom": {"keep": True}})
    result = make_engine(box).run(sweep_job(seeded))
    assert result.outcome is Outcome.CLEAN
    record = box.record(seeded.member_id)
    assert record.revoked_at is None
    assert record.data["custom"] == {"keep": True}


# --------------------------------------------------------------------------------------------- dry run


def test_dry_run_unbinds_nothing_and_writes_only_the_refresh(box: Sandbox) -> None:
    seeded = box.add_portal("dry.bitrix24.test", handlers=_orphans(4), expired=True)
    gone = box.add_portal("dry-gone.bitrix24.test", handlers=_orphans(1))
    box.emulator.uninstall(gone.portal, box.app)
    gone_before = box.record(gone.member_id).data

    result = make_engine(box, dry_run=True).run(sweep_job(seeded))
    revoked = make_engine(box, dry_run=True).run(sweep_job(gone))

    assert result.outcome is Outcome.CLEANED and result.unbound == 4 and result.dry_run
    assert box.emulator.requests_log(method="event.unbind") == []
    assert box.emulator.requests_log(method="batch") == []
    assert len(seeded.portal.handlers(box.app)) == 4
    after = box.record(seeded.member_id)
    assert after is not None and result.refreshed == 1  # the refresh it had to make is persisted
    assert after.refresh_token != seeded.installation.refresh_token
    assert revoked.outcome is Outcome.REVOKED
    assert box.record(gone.member_id).data == gone_before  # no revoked_at mark in a dry run


def test_rate_limited_answers_are_backed_off_and_counted(box: Sandbox) -> None:
    seeded = box.add_portal("busy.bitrix24.test", handlers=_orphans(2))
    seeded.portal.fail_next(2, "QUERY_LIMIT_EXCEEDED", methods={"event.get"})

    result = make_engine(box).run(sweep_job(seeded))

    assert result.outcome is Outcome.CLEANED
    assert result.rate_limited == 2
    assert result.rest_calls == 4 == rest_calls(box, seeded.member_id)  # 2 refused event.get, event.get, batch
    assert result.metrics()["RateLimited"] == 2
