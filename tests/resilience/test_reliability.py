"""Reliability and security (issue 6): fault injection, AWS faults, token races, hostile input, template.

1. The fault-injection campaign of bench/campaign.py (one implementation) on 40 portals: a fifth of all
   REST requests fail, SSM/SQS calls fail, scheduler → queue → worker with redelivery and moto's DLQ.
2. SSM and SQS throttling, 5xx, reset connections and lost replies injected with botocore hooks:
   botocore retries them, nothing is lost or written twice; when the retries run out the job fails
   and SQS retries it; a rotated pair whose write fails is kept for the retry.
3. Token races: two jobs for one portal at once (one container, and two containers that share only
   SSM), and the app's backend refreshing while a job runs (one-field edits never revert its pair).
4. Hostile input at the endpoint: > 5,000 hypothesis cases, never a 5xx, never a side effect or an
   outbound request without the genuine token; tokens compared with hmac.compare_digest everywhere.
5. (tests/resilience/test_leaks.py and the session guard, tests/leakguard.py.)
6. Template checks that tests/functional/test_template.py does not make yet.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import boto3
import hypothesis
import pytest
import requests
from botocore.config import Config
from fixtures.aws import APPLICATION_TOKEN, FORM, MEMBER_ID, ROOT, WRONG_TOKEN, AwsAccount, load_event
from fixtures.sandbox import APP_URL, DECLARED, OLD_URL, PATIENT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b24_cleanup import runtime, tokens
from b24_cleanup.access import TokenAccess
from b24_cleanup.client import PortalClient
from b24_cleanup.engine import Engine, EngineOptions
from b24_cleanup.errors import JobFailedError, TransientError
from b24_cleanup.handlers import endpoint, scheduler, worker
from b24_cleanup.jobs import Action, Job, JobResult, Outcome
from b24_cleanup.oauth import OAuthClient
from b24_cleanup.ops.emulator import Emulator, payloads
from b24_cleanup.ops.functionurl import FakeContext, function_url_event
from b24_cleanup.ops.sandbox import Sandbox, drain
from b24_cleanup.payload import MAX_BODY_BYTES, MAX_DEPTH, parse_event_body
from b24_cleanup.record import PortalRecord
from b24_cleanup.registration import register
from b24_cleanup.store import PortalStore

if str(ROOT) not in sys.path:  # bench/ lives beside functions/, not inside the package
    sys.path.insert(0, str(ROOT))

from bench.campaign import DLQ, RECORD_KEYS, AwsFaults, CampaignConfig, run_campaign

# Races need the other writer's PutParameter to land before the one re-read decides (design §5 step 3):
# the production settle time, so that a loaded machine does not decide the race.
RACE = EngineOptions(backoff=PATIENT.backoff, settle_seconds=1.0)
pytestmark = pytest.mark.box(declared=DECLARED)
DECLARED_ROWS = [
    {"event": "ONCRMLEADADD", "handler": APP_URL},
    {"event": "ONCRMLEADADD", "handler": APP_URL, "user_id": 2},
    {"event": "ONCRMDEALADD", "offline": True},
]
ORPHAN_ROWS = [
    {"event": "ONCRMLEADADD", "handler": OLD_URL},
    {"event": "ONCRMLEADADD", "handler": OLD_URL, "user_id": 1},
    {"event": "ONCRMCONTACTADD", "handler": APP_URL},
    {"event": "ONCRMLEADUPDATE", "offline": True},
]
# A client whose errors reach the code at once: what the production client shows once botocore's own
# ten adaptive attempts are used up.
NO_RETRIES = Config(retries={"mode": "standard", "total_max_attempts": 1})


def sweep(member_id: str) -> Job:
    return Job(Action.SWEEP, member_id)


def run(engine: Engine, job: Job) -> JobResult:
    try:
        return engine.run(job)
    except JobFailedError as failed:
        return failed.result


def chain_works(box: Sandbox, member_id: str) -> bool:
    """The stored refresh token is the live end of the portal's chain (spends it: call last)."""
    record = box.store.get(member_id)
    try:
        OAuthClient(box.store.app_credentials()).refresh(box.emulator.oauth_url, record.refresh_token)
    except Exception:
        return False
    return True


def rows(box: Sandbox, seeded: Any) -> set[tuple[str, str]]:
    return {
        (r["event"], r.get("handler") or f"offline:{r.get('connector_id', '')}")
        for r in seeded.portal.handlers(box.app)
    }


def version(box: Sandbox, member_id: str) -> int:
    name = box.store.portal_name(member_id)
    return box.store.client.get_parameter(Name=name)["Parameter"]["Version"]


# =============================================================================================
# 1. The fault-injection campaign
# =============================================================================================


def test_campaign_with_rest_and_aws_faults_keeps_every_invariant() -> None:
    """design §7 under a fifth of all REST requests failing and a tenth of the SSM/SQS attempts failing."""
    config = CampaignConfig(
        portals=40,
        fault_rate=0.2,
        seed=20261125,
        aws_fault_rate=0.1,
        # Throttling costs botocore ~1 s of backoff per hit: it has its own scripted test below.
        aws_fault_kinds=("5xx", "reset", "lost_reply"),
        timeout_delay=0.2,  # an injected timeout drops the connection after 0.2 s...
        read_timeout=2.0,  # ...well before the engine's read timeout: a loaded machine is not a fault
        backoff=PATIENT.backoff,
        settle_seconds=0.01,
        rate=20.0,
    )
    report = run_campaign(config)

    assert report.ok, report.format()
    # The campaign was as hostile as it says, and every path was taken.
    assert sum(report.rest_faults.values()) >= 10, report.format()
    assert len(report.rest_faults) >= 3, report.format()
    assert report.aws_faults, report.format()
    assert report.redeliveries > 0
    assert {kind for kind, _ in report.dlq} >= {"doomed", "doomed_get"}
    assert report.dlq_deliveries and set(report.dlq_deliveries) == {5}, "DLQ after exactly maxReceiveCount=5"
    assert report.final["sweep"][DLQ] >= 2
    for outcome in ("cleaned", "clean", "revoked", "skipped", "incomplete"):
        assert report.final["sweep"][outcome] > 0, outcome
    assert report.final["uninstall"]["revoked"] and report.final["uninstall"]["skipped"]
    assert report.forged_live >= 2 and report.wiped_by_forged == 0
    assert "live portals wiped by forged uninstalls: 0" in report.format()
    assert report.declared_rows > 100 and report.declared_lost == 0
    assert report.tokens_expected > 20 and report.tokens_verified == report.tokens_expected
    assert report.secrets_checked > 50 and report.secrets_leaked == 0


# =============================================================================================
# 2. AWS faults: retried by botocore, nothing lost, nothing half-written
# =============================================================================================


def test_ssm_faults_during_a_refresh_are_retried_and_nothing_is_lost(box: Sandbox) -> None:
    seeded = box.add_portal("retry.bitrix24.test", handlers=DECLARED_ROWS + ORPHAN_ROWS, expired=True)
    store = PortalStore(box.prefix)  # the production clients: adaptive reads, bounded writes
    faults = AwsFaults().attach(*store.clients())
    faults.fail_next("ssm.GetParameter", "5xx", "reset")
    faults.fail_next("ssm.DescribeParameters", "lost_reply")
    faults.fail_next("ssm.PutParameter", "throttle", "5xx", "reset", "lost_reply")

    result = Engine(store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=PATIENT).run(
        sweep(seeded.member_id)
    )

    assert result.outcome is Outcome.CLEANED and result.refreshed == 1
    assert faults.total == 7
    # Four attempts; the last one landed although its reply was lost: the next fresh read finds the
    # rotated pair stored and writes nothing more. v1 (seed) → v2 (the lost reply).
    assert (faults.attempts["ssm.PutParameter"], version(box, seeded.member_id)) == (4, 2), faults.by_operation()
    record = box.record(seeded.member_id)
    assert set(RECORD_KEYS) <= set(record.data)
    latest = box.emulator.state.latest_tokens(seeded.installation.chain)
    assert (record.access_token, record.refresh_token) == (latest.access_token, latest.refresh_token)
    assert rows(box, seeded) == {("ONCRMLEADADD", APP_URL), ("ONCRMDEALADD", "offline:")}
    assert chain_works(box, seeded.member_id)


def queued(box: Sandbox, queue_url: str | None = None) -> list[dict[str, Any]]:
    sqs = boto3.client("sqs")
    out: list[dict[str, Any]] = []
    for _ in range(1000):
        got = sqs.receive_message(
            QueueUrl=queue_url or box.queue_url, MaxNumberOfMessages=10, VisibilityTimeout=600, AttributeNames=["All"]
        )
        if not got.get("Messages"):
            return out
        out.extend(got["Messages"])
    raise AssertionError("the queue never emptied")


def post_uninstall(box: Sandbox, seeded: Any, token: str) -> dict[str, Any]:
    pairs = payloads.uninstall_form(box.emulator.state, seeded.portal, token, clean=True, ts=1795172400)
    event = function_url_event(
        "POST", "/", {"content-type": "application/x-www-form-urlencoded"}, urlencode(pairs).encode()
    )
    return endpoint.lambda_handler(event, FakeContext())


def test_endpoint_ssm_and_sqs_faults_are_retried_and_queue_one_job(handler_env: Sandbox) -> None:
    box = handler_env
    seeded = box.add_portal("bye.bitrix24.test", handlers=DECLARED_ROWS)
    faults = AwsFaults().attach(runtime.endpoint_store().client, runtime.endpoint_sqs())
    faults.fail_next("ssm.GetParameter", "5xx", "reset")
    faults.fail_next("sqs.SendMessage", "5xx", "lost_reply")  # the lost reply's message did arrive

    answer = post_uninstall(box, seeded, seeded.installation.application_token)

    assert answer["statusCode"] == 200
    assert faults.attempts["sqs.SendMessage"] == 3 and faults.attempts["ssm.GetParameter"] == 3
    (message,) = queued(box)  # the retry after the lost reply was deduplicated
    assert json.loads(message["Body"])["member_id"] == seeded.member_id


def test_scheduler_fan_out_survives_ssm_and_sqs_faults_without_duplicates(handler_env: Sandbox) -> None:
    box = handler_env
    members = {box.add_portal(f"s{i}.bitrix24.test").member_id for i in range(23)}
    faults = AwsFaults().attach(runtime.store().client, runtime.sqs())
    faults.fail_next("ssm.GetParameter", "reset")
    faults.fail_next("ssm.DescribeParameters", "5xx", "lost_reply")
    faults.fail_next("sqs.SendMessageBatch", "lost_reply", "5xx", "reset", "lost_reply")

    answer = scheduler.lambda_handler({"scheduled_time": "2026-11-25T02:00:00Z"}, FakeContext())

    assert answer["enqueued"] == 23
    assert faults.total == 7
    bodies = [json.loads(m["Body"]) for m in queued(box)]
    assert sorted(b["member_id"] for b in bodies) == sorted(members)  # each portal exactly once


def test_ssm_failing_beyond_retries_fails_the_job_until_the_dlq(handler_env: Sandbox) -> None:
    """A transient failure fails, is retried by SQS and ends in the DLQ; nothing is written or called."""
    box = handler_env
    seeded = box.add_portal("down.bitrix24.test", handlers=DECLARED_ROWS + ORPHAN_ROWS)
    store = PortalStore(box.prefix, client=boto3.client("ssm", config=NO_RETRIES))
    faults = AwsFaults(1.0, kinds=("5xx",), operations={"ssm.GetParameter"}).attach(store.client)
    runtime.use_engine(Engine(store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=PATIENT))
    sqs = boto3.client("sqs")
    sqs.send_message(
        QueueUrl=box.queue_url,
        MessageBody=json.dumps(sweep(seeded.member_id).to_message()),
        MessageGroupId=seeded.member_id,
        MessageDeduplicationId="down-1",
    )
    results: list[Any] = []

    def deliver(event: dict[str, Any], context: Any) -> dict[str, Any]:
        answer = worker.process(event, context)
        results.append(answer)
        return answer

    drain(sqs, box.queue_url, deliver, FakeContext())

    assert len(results) == 5 and all(r["batchItemFailures"] for r in results)
    (dead,) = queued(box, box.dlq_url)
    assert json.loads(dead["Body"]) == {"action": "sweep", "member_id": seeded.member_id}
    assert faults.total == 5
    assert box.emulator.requests_log(member_id=seeded.member_id) == []
    assert version(box, seeded.member_id) == 1
    assert len(seeded.portal.handlers(box.app)) == len(DECLARED_ROWS + ORPHAN_ROWS)


def _engine_without_sleeps(store: PortalStore, monkeypatch: pytest.MonkeyPatch, oauth_url: str) -> Engine:
    """TokenKeeper retries a write for as long as the persist budget allows; the test's clock jumps instead."""
    original = Engine.keeper

    def keeper(self: Engine, member_id: str, record: Any, ends_at: float | None = None) -> tokens.TokenKeeper:
        made = original(self, member_id, record, ends_at)
        now = [1000.0]
        made.sleep = lambda seconds: now.__setitem__(0, now[0] + seconds)
        made.monotonic = lambda: now[0]
        return made

    monkeypatch.setattr(Engine, "keeper", keeper)
    return Engine(store, oauth_url=oauth_url, orphan_grace_days=0, options=PATIENT)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _refresh_whose_write_fails(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, JobResult, _Records]:
    seeded = box.add_portal("lost.bitrix24.test", handlers=DECLARED_ROWS + ORPHAN_ROWS, expired=True)
    spent = box.record(seeded.member_id).refresh_token
    store = PortalStore(box.prefix, client=boto3.client("ssm", config=NO_RETRIES))
    # Every write fails for the whole persist budget (the test's clock jumps through the pauses).
    faults = AwsFaults(1.0, kinds=("5xx",), operations={"ssm.PutParameter"}).attach(store.client)
    records = _Records()
    logging.getLogger("b24_cleanup.tokens").addHandler(records)
    try:
        with pytest.raises(JobFailedError) as failed:
            _engine_without_sleeps(store, monkeypatch, box.emulator.oauth_url).run(sweep(seeded.member_id))
    finally:
        logging.getLogger("b24_cleanup.tokens").removeHandler(records)
    assert faults.attempts["ssm.PutParameter"] >= 4
    assert box.record(seeded.member_id).refresh_token == spent  # nothing was half-written
    return seeded, failed.value.result, records


def test_a_refresh_whose_write_keeps_failing_fails_the_job(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pair was rotated at the OAuth server but cannot be stored: the job must fail, loudly."""
    seeded, result, records = _refresh_whose_write_fails(box, monkeypatch)

    assert result.outcome is Outcome.FAILED
    assert "SSM_" in result.reason
    assert result.unbound == 0 and len(seeded.portal.handlers(box.app)) == len(DECLARED_ROWS + ORPHAN_ROWS)
    assert box.emulator.requests_log(member_id=seeded.member_id, kind="rest") == []  # not used before stored
    assert any("could not persist a refreshed token pair" in m for m in records.messages)


def test_the_retry_after_a_lost_write_keeps_the_chain(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    seeded, _, _ = _refresh_whose_write_fails(box, monkeypatch)

    retry = run(
        _engine_without_sleeps(PortalStore(box.prefix), monkeypatch, box.emulator.oauth_url), sweep(seeded.member_id)
    )

    assert retry.outcome is not Outcome.REVOKED, retry.reason
    assert chain_works(box, seeded.member_id)


def test_a_registration_whose_write_fails_once_keeps_the_chain(box: Sandbox) -> None:
    portal = box.emulator.add_portal("joined.bitrix24.test")
    inst = box.emulator.install(portal, box.app)
    body = parse_event_body(
        urlencode(payloads.install_form(box.emulator.state, inst)).encode(), "application/x-www-form-urlencoded"
    )
    store = PortalStore(box.prefix, client=boto3.client("ssm", config=NO_RETRIES))
    AwsFaults().attach(store.client).fail_next("ssm.PutParameter", "5xx")

    with contextlib.suppress(TransientError):  # today: 503 at the endpoint
        register(body, store, oauth_url=box.emulator.oauth_url)
    assert box.record(portal.member_id) is not None
    assert chain_works(box, portal.member_id)


# =============================================================================================
# 3. Token races
# =============================================================================================


class _NoMemory(dict):
    """Stands in for the chain state's `latest`: remembers nothing, as another process would not."""

    def __setitem__(self, key: str, value: Any) -> None:
        return None


@pytest.fixture(params=["one container", "two containers"])
def isolation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """`two containers`: the threads share nothing but SSM and the OAuth server, like two Lambda containers."""
    if request.param == "two containers":
        monkeypatch.setattr(runtime.chains(), "latest", _NoMemory())
        monkeypatch.setattr(runtime.chains(), "lock", lambda _member_id: threading.Lock())
    return request.param


def oauth_statuses(box: Sandbox, member_id: str) -> list[int]:
    return sorted(e.status for e in box.emulator.requests_log(kind="oauth") if e.member_id == member_id)


def test_two_jobs_for_one_expired_portal_keep_one_chain(
    box: Sandbox, isolation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FIFO ordering bypassed: two sweeps of one portal run at once, both needing a refresh."""
    seeded = box.add_portal("twice.bitrix24.test", handlers=DECLARED_ROWS + ORPHAN_ROWS, expired=True)
    if isolation == "two containers":
        # Both refreshes leave together: one wins, the other is refused and must find the winner's pair.
        gate = threading.Barrier(2, timeout=10)
        original = OAuthClient.refresh
        gated = [2]  # the jobs' two refreshes; not the check at the end

        def refresh(self: OAuthClient, token_url: str, refresh_token: str) -> dict[str, Any]:
            if gated[0] > 0:
                gated[0] -= 1
                gate.wait()
            return original(self, token_url, refresh_token)

        monkeypatch.setattr(OAuthClient, "refresh", refresh)
    start = threading.Barrier(2, timeout=10)
    results: list[JobResult] = []

    def job() -> None:
        engine = Engine(box.new_store(), oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=RACE)
        start.wait()
        results.append(run(engine, sweep(seeded.member_id)))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert len(results) == 2
    outcomes = sorted(r.outcome.value for r in results)
    assert Outcome.REVOKED.value not in outcomes, [r.reason for r in results]
    assert set(outcomes) <= {"cleaned", "clean"} and "cleaned" in outcomes
    if isolation == "two containers":
        assert oauth_statuses(box, seeded.member_id) == [200, 400]  # the race really happened
    else:
        assert oauth_statuses(box, seeded.member_id) == [200]  # the second thread adopted the first's pair
    assert rows(box, seeded) == {("ONCRMLEADADD", APP_URL), ("ONCRMDEALADD", "offline:")}
    assert box.record(seeded.member_id).revoked_at is None
    assert chain_works(box, seeded.member_id)


def _app_refreshes_after_event_get(box: Sandbox, seeded: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Between the job's event.get and what follows, the app's backend meets expired_token and refreshes."""
    original = PortalClient.call
    app_tokens: list[str] = []

    def call(self: PortalClient, method: str, params: Any = None) -> Any:
        answer = original(self, method, params)
        if method == "event.get" and not app_tokens:
            seeded.portal.expire_tokens(box.app)
            access = TokenAccess(box.new_store(), oauth_url=box.emulator.oauth_url, settle_seconds=RACE.settle_seconds)
            held = box.store.get(seeded.member_id).access_token
            app_tokens.append(access.after_expired(seeded.member_id, held).access_token)
        return answer

    monkeypatch.setattr(PortalClient, "call", call)
    return app_tokens


def works(client_endpoint: str, access_token: str) -> bool:
    answer = requests.post(f"{client_endpoint}event.get", json={"auth": access_token}, timeout=5)
    return answer.status_code == 200


def test_the_app_backend_refreshing_while_a_job_unbinds(
    box: Sandbox, isolation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = box.add_portal("shared.bitrix24.test", handlers=DECLARED_ROWS + ORPHAN_ROWS)
    app_tokens = _app_refreshes_after_event_get(box, seeded, monkeypatch)

    result = run(
        Engine(box.new_store(), oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=RACE),
        sweep(seeded.member_id),
    )

    assert result.outcome is Outcome.CLEANED, result.reason
    assert rows(box, seeded) == {("ONCRMLEADADD", APP_URL), ("ONCRMDEALADD", "offline:")}
    # The job took the app's pair instead of rotating the chain again: the app's token still works.
    assert oauth_statuses(box, seeded.member_id) == ([200] if isolation == "one container" else [200, 400])
    record = box.record(seeded.member_id)
    assert record.access_token == app_tokens[0]
    assert works(record.client_endpoint, app_tokens[0])
    assert chain_works(box, seeded.member_id)


def test_clearing_revoked_at_keeps_a_pair_the_app_stored_meanwhile(
    box: Sandbox, isolation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A live portal with an old revoked mark and nothing to unbind: event.get is the job's only call.
    seeded = box.add_portal("marked.bitrix24.test", handlers=DECLARED_ROWS, extra={"revoked_at": 1})
    _app_refreshes_after_event_get(box, seeded, monkeypatch)

    result = run(
        Engine(box.new_store(), oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=RACE),
        sweep(seeded.member_id),
    )

    assert result.outcome is Outcome.CLEAN
    assert box.record(seeded.member_id).revoked_at is None
    assert chain_works(box, seeded.member_id)


def test_the_revoked_mark_never_overwrites_a_newer_install(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    seeded = box.add_portal("back.bitrix24.test", handlers=DECLARED_ROWS)
    box.emulator.uninstall(seeded.portal, box.app)  # the uninstall event was lost
    original = Engine._revoked
    newer: list[str] = []

    def revoked(self: Engine, *args: Any) -> None:
        # The portal installs the app again and the install is registered, right before the mark.
        inst = box.emulator.install(seeded.portal, box.app)
        body = parse_event_body(
            urlencode(payloads.install_form(box.emulator.state, inst)).encode(), "application/x-www-form-urlencoded"
        )
        register(body, box.store, oauth_url=box.emulator.oauth_url)
        newer.append(inst.application_token)
        original(self, *args)

    monkeypatch.setattr(Engine, "_revoked", revoked)

    result = run(
        Engine(box.new_store(), oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=PATIENT),
        sweep(seeded.member_id),
    )

    assert result.outcome is Outcome.REVOKED
    record = box.record(seeded.member_id)
    assert record.application_token == newer[0]
    assert record.revoked_at is None
    assert chain_works(box, seeded.member_id)


def test_a_stale_uninstall_racing_a_reinstall_keeps_the_new_record(box: Sandbox) -> None:
    """The uninstall job's guarded delete re-reads: a reinstall registered before it is never removed."""
    seeded = box.add_portal("again.bitrix24.test", handlers=DECLARED_ROWS)
    old_token = seeded.installation.application_token
    box.emulator.uninstall(seeded.portal, box.app)
    inst = box.emulator.install(seeded.portal, box.app)
    body = parse_event_body(
        urlencode(payloads.install_form(box.emulator.state, inst)).encode(), "application/x-www-form-urlencoded"
    )
    original = box.store.delete_if

    def delete_if(member_id: str, condition: Callable[[PortalRecord], bool]) -> bool:
        register(body, box.store, oauth_url=box.emulator.oauth_url)  # lands right before the delete
        return original(member_id, condition)

    store = box.new_store()
    store.delete_if = delete_if  # type: ignore[method-assign]
    job = Job(Action.UNINSTALL, seeded.member_id, application_token=old_token, ts="1")

    result = run(Engine(store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=PATIENT), job)

    assert result.outcome is Outcome.REVOKED and not result.record_deleted
    assert box.record(seeded.member_id).application_token == inst.application_token
    assert chain_works(box, seeded.member_id)


# =============================================================================================
# 4. Hostile input at the endpoint
# =============================================================================================

WRITES = {"ssm.PutParameter", "ssm.DeleteParameter", "sqs.SendMessage", "sqs.SendMessageBatch"}
TRUSTED_TOKEN_URLS = {"https://oauth.bitrix.info/oauth/token/", "https://oauth.bitrix24.tech/oauth/token/"}


class AwsLog:
    """(operation, params) of every call the endpoint's boto3 clients make."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def watch(self, *clients: Any) -> AwsLog:
        for client in clients:
            client.meta.events.register("before-parameter-build", self._record, unique_id=f"aws-log-{id(self)}")
        return self

    def _record(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.calls.append((f"{model.service_model.service_name}.{model.name}", dict(params)))


class Outbound:
    """Every HTTP request the code tries to send; only `allow`ed URL prefixes go out."""

    def __init__(self, allow: tuple[str, ...] = ()) -> None:
        self.urls: list[str] = []
        self.allow = allow

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Outbound:
        original = requests.adapters.HTTPAdapter.send

        def send(adapter: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            self.urls.append(request.url)
            if self.allow and request.url.startswith(self.allow):
                return original(adapter, request, *args, **kwargs)
            raise requests.ConnectionError("outbound HTTP is blocked in this test")

        monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", send)
        return self


@pytest.fixture
def watched_endpoint(mock_aws: AwsAccount, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AwsLog, Outbound]]:
    runtime.reset()
    log = AwsLog().watch(runtime.endpoint_store().client, runtime.endpoint_sqs())
    outbound = Outbound().install(monkeypatch)
    yield log, outbound
    runtime.reset()


def _genuine_pairs() -> list[tuple[str, str]]:
    raw = base64.b64decode(load_event("uninstall_form.json")["body"]).decode()
    return parse_qsl(raw, keep_blank_values=True, strict_parsing=True)


GENUINE_PAIRS = _genuine_pairs()


def _event(
    body: Any, *, b64: Any = False, content_type: Any = FORM, method: Any = "POST", headers: Any = None
) -> dict[str, Any]:
    event = load_event("uninstall_form.json")
    event["requestContext"]["http"]["method"] = method
    if headers is not None:
        event["headers"] = headers
    elif content_type is None:
        event["headers"].pop("content-type", None)
    else:
        event["headers"]["content-type"] = content_type
    event["body"] = body
    event["isBase64Encoded"] = b64
    return event


def _texts_of(event: dict[str, Any]) -> list[str]:
    """Every reading of the request body a parser could make: raw, base64-decoded, percent-decoded."""
    body = event.get("body")
    if not isinstance(body, str):
        return []
    out = [body, unquote(body)]
    try:
        decoded = base64.b64decode(body, validate=False).decode("utf-8", "replace")
        out += [decoded, unquote(decoded)]
    except ValueError:
        pass
    return out


def check_endpoint(event: dict[str, Any], log: AwsLog, outbound: Outbound, *, installs: bool = False) -> int:
    """The design §7 property of one request; returns the status."""
    before, sent_before = len(log.calls), len(outbound.urls)
    answer = endpoint.lambda_handler(event, FakeContext())
    calls = log.calls[before:]
    status = answer["statusCode"]
    hypothesis.event(f"status {status}")
    assert status in {200, 400, 401, 405, 413}, answer  # never a 5xx (moto works; the input decides)
    writes = [(op, params) for op, params in calls if op in WRITES]
    reads = [params["Name"] for op, params in calls if op == "ssm.GetParameter"]
    if status == 200:  # only a genuine uninstall: no registration here is vouched for by an OAuth server
        assert [op for op, _ in writes] == ["sqs.SendMessage"], calls
        job = json.loads(writes[0][1]["MessageBody"])
        assert (job["member_id"], job["application_token"]) == (MEMBER_ID, APPLICATION_TOKEN)
        assert any(APPLICATION_TOKEN in text for text in _texts_of(event)), "a side effect without the token"
    else:
        assert writes == [], calls
    if installs and len(reads) == 2:
        # Registration reads the app's credentials and the posted portal's record *before* it spends
        # the posted token (design §9), so that a failing read costs a 503 and not the chain.
        assert reads[0] == "/b24-cleanup/test/app/credentials", reads
        assert reads[1].startswith("/b24-cleanup/test/portals/"), reads
    else:
        assert len(reads) <= 1, reads
    assert all(name.startswith("/b24-cleanup/test/") for name in reads), reads
    for url in outbound.urls[sent_before:]:
        assert installs, f"outbound request from an uninstall: {url}"
        assert url.split("?")[0] in TRUSTED_TOKEN_URLS or url.startswith(outbound.allow), url
    return status


FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)

# Hypothesis favours the first element of sampled_from (its shrink target), and small integers: so
# the common case goes first and rare branches are drawn as `True` from this one.
_rarely = st.sampled_from([False, False, False, True])

_names = st.sampled_from(
    [
        "event",
        "ts",
        "auth[member_id]",
        "auth[application_token]",
        "auth[domain]",
        "data[CLEAN]",
        "auth",
        "auth[]",
        "auth[member_id][]",
        "auth[member_id][x]",
        "auth[application_token][0]",
        "event[]",
        "event[x]",
        "auth[[member_id]]",
        "auth[member_id",
        "auth]member_id[",
        "AUTH[member_id]",
        "auth[MEMBER_ID]",
        "auth[ member_id]",
        "auth[member_id] ",
        "auth%5Bmember_id%5D",
        "auth[member_id]\x00",
        "data",
        "data[]",
        "auth[application_token]\u200b",
        "\u0430uth[member_id]",  # a Cyrillic a
    ]
) | st.text(max_size=12)
_values = st.sampled_from(
    [
        "ONAPPUNINSTALL",
        "onappuninstall",
        " ONAPPUNINSTALL ",
        "ONAPPINSTALL",
        "ONAPPUPDATE",
        "ONCRMLEADADD",
        MEMBER_ID,
        MEMBER_ID.upper(),
        MEMBER_ID + "\n",
        "../app/credentials",
        "..",
        "",
        "1",
        "0",
        APPLICATION_TOKEN,
        APPLICATION_TOKEN.upper(),
        APPLICATION_TOKEN + " ",
        APPLICATION_TOKEN[:-1],
        WRONG_TOKEN,
        "\x00",
        "é" * 3,
        "\U0001f642",
        "%00",
        "%ZZ",
        "a&b=c",
        "x" * 300,
    ]
) | st.text(max_size=40)


@st.composite
def form_bodies(draw: st.DrawFn) -> tuple[str, bool]:
    """A form body: from scratch, or the genuine one mutated; encoded properly or not."""
    if draw(_rarely):
        pairs = draw(st.lists(st.tuples(_names, _values), max_size=12))
    else:
        pairs = list(GENUINE_PAIRS)
        for _ in range(draw(st.integers(0, 4))):
            op = draw(st.sampled_from(["drop", "dup", "replace", "insert", "swap"]))
            if op == "drop" and pairs:
                pairs.pop(draw(st.integers(0, len(pairs) - 1)))
            elif op == "dup" and pairs:
                pairs.append(pairs[draw(st.integers(0, len(pairs) - 1))])
            elif op == "replace" and pairs:
                i = draw(st.integers(0, len(pairs) - 1))
                pairs[i] = (pairs[i][0], draw(_values))
            elif op == "insert":
                pairs.insert(draw(st.integers(0, len(pairs))), (draw(_names), draw(_values)))
            elif op == "swap" and len(pairs) > 1:
                pairs.reverse()
    style = draw(st.sampled_from(["urlencode"] * 4 + ["raw", "semicolons", "quote_plus_free"]))
    if style == "urlencode":
        text = urlencode(pairs)
    elif style == "raw":
        text = "&".join(f"{k}={v}" for k, v in pairs)
    elif style == "semicolons":
        text = ";".join(f"{quote(k)}={quote(v)}" for k, v in pairs)
    else:
        text = "&".join(f"{quote(k, safe='[]')}={quote(v, safe='')}" for k, v in pairs)
    b64 = draw(st.booleans())
    return (base64.b64encode(text.encode("utf-8", "surrogatepass")).decode() if b64 else text), b64


_odd_content_types = st.sampled_from(
    [
        FORM,
        FORM,
        FORM + "; charset=UTF-8",
        "APPLICATION/X-WWW-FORM-URLENCODED",
        " application/x-www-form-urlencoded ",
        "application/json",
        "application/vnd.api+json",
        "text/plain",
        "multipart/form-data; boundary=x",
        "",
        FORM + ";",
        "application/x-www-form-urlencoded, application/json",
        None,
    ]
) | st.text(max_size=30)
_content_types = st.one_of(st.just(FORM), st.just(FORM), st.just(FORM + "; charset=utf-8"), _odd_content_types)


@settings(FUZZ, max_examples=1500)
@given(body=form_bodies(), content_type=_content_types)
def test_fuzz_form_bodies(watched_endpoint: tuple[AwsLog, Outbound], body: tuple[str, bool], content_type: Any) -> None:
    log, outbound = watched_endpoint
    text, b64 = body
    check_endpoint(_event(text, b64=b64, content_type=content_type), log, outbound)


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _values


@st.composite
def json_bodies(draw: st.DrawFn) -> str:
    auth = draw(
        st.dictionaries(
            st.sampled_from(["member_id", "application_token", "domain", "MEMBER_ID", ""]) | st.text(max_size=8),
            _json_scalars
            | st.lists(_json_scalars, max_size=3)
            | st.dictionaries(st.text(max_size=5), _json_scalars, max_size=3),
            max_size=5,
        )
    )
    if not draw(_rarely):
        auth["member_id"] = MEMBER_ID
        auth["application_token"] = draw(st.sampled_from([APPLICATION_TOKEN, WRONG_TOKEN, APPLICATION_TOKEN[:-1]]))
    payload: Any = {
        "event": draw(st.sampled_from(["ONAPPUNINSTALL"] * 4 + ["onAppUninstall", "ONAPPINSTALL", 1, None, ["x"]])),
        "auth": draw(st.sampled_from([auth] * 6 + [[auth], "auth", None])),
        "data": draw(st.sampled_from([{"CLEAN": "1"}] * 3 + [{"CLEAN": 1}, {"CLEAN": True}, {}, [], "x", None])),
        "ts": draw(st.sampled_from(["1795172400"] * 3 + [1795172400, 1.5, None, [], {}, ""])),
    }
    payload.pop(draw(st.sampled_from(["-", "-", "-", "event", "auth", "data", "ts"])), None)
    if draw(_rarely):
        payload = draw(st.sampled_from([[payload], "x", 1, None]))
    text = json.dumps(payload, ensure_ascii=draw(st.booleans()))
    mangle = draw(st.sampled_from(["none"] * 10 + ["dup_key", "truncate", "trailing", "bom", "nan"]))
    if mangle == "dup_key" and text.startswith("{") and len(text) > 2:
        text = '{"event": "ONAPPUNINSTALL", ' + text[1:]
    elif mangle == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif mangle == "trailing":
        text += draw(st.sampled_from(["}", " x", "\x00", "{}"]))
    elif mangle == "bom":
        text = "\ufeff" + text
    elif mangle == "nan":
        text = text.replace("null", "NaN", 1)
    return text


@settings(FUZZ, max_examples=1000)
@given(
    body=json_bodies(),
    b64=st.booleans(),
    content_type=st.sampled_from(
        ["application/json"] * 3 + ["application/json; charset=utf-8", None, FORM, "application/problem+json"]
    ),
)
def test_fuzz_json_bodies(watched_endpoint: tuple[AwsLog, Outbound], body: str, b64: bool, content_type: Any) -> None:
    log, outbound = watched_endpoint
    text = base64.b64encode(body.encode("utf-8", "surrogatepass")).decode() if b64 else body
    check_endpoint(_event(text, b64=b64, content_type=content_type), log, outbound)


@st.composite
def encodings(draw: st.DrawFn) -> tuple[Any, Any]:
    """The genuine body (or a near miss) wrapped in every encoding mistake: flags, alphabets, charsets."""
    raw = urlencode(
        GENUINE_PAIRS
        if draw(st.booleans())
        else [(k, WRONG_TOKEN if k == "auth[application_token]" else v) for k, v in GENUINE_PAIRS]
    )
    kind = draw(
        st.sampled_from(
            [
                "b64",
                "plain",
                "b64_flag_off",
                "plain_flag_on",
                "urlsafe",
                "whitespace",
                "no_padding",
                "extra_padding",
                "bad_char",
                "truncated_b64",
                "latin1",
                "utf16",
                "bom",
                "surrogate",
                "bytes",
                "flag_string",
                "flag_int",
                "double_b64",
                "percent_bytes",
            ]
        )
    )
    data = raw.encode()
    if kind == "b64":
        return base64.b64encode(data).decode(), True
    if kind == "plain":
        return raw, False
    if kind == "b64_flag_off":
        return base64.b64encode(data).decode(), False
    if kind == "plain_flag_on":
        return raw, True
    if kind == "urlsafe":
        return base64.urlsafe_b64encode(data + draw(st.binary(max_size=3))).decode(), True
    if kind == "whitespace":
        text = base64.b64encode(data).decode()
        i = draw(st.integers(0, len(text)))
        return text[:i] + draw(st.sampled_from([" ", "\n", "\r\n", "\t"])) + text[i:], True
    if kind == "no_padding":
        return base64.b64encode(data + b"x").decode().rstrip("="), True
    if kind == "extra_padding":
        return base64.b64encode(data).decode() + "==", True
    if kind == "bad_char":
        text = base64.b64encode(data).decode()
        i = draw(st.integers(0, len(text) - 1))
        return text[:i] + draw(st.sampled_from(["*", "-", "_", "é", "\x00", "%"])) + text[i + 1 :], True
    if kind == "truncated_b64":
        text = base64.b64encode(data).decode()
        return text[: draw(st.integers(0, len(text)))], True
    if kind == "latin1":
        return base64.b64encode((raw + "&data[NAME]=Müller").encode("latin-1")).decode(), True
    if kind == "utf16":
        return base64.b64encode(raw.encode("utf-16")).decode(), True
    if kind == "bom":
        return base64.b64encode(b"\xef\xbb\xbf" + data).decode(), True
    if kind == "surrogate":
        return raw + "&data[X]=" + draw(st.sampled_from(["\ud800", "\udfff", "\ud83d"])), False
    if kind == "bytes":
        return data, draw(st.booleans())
    if kind == "flag_string":
        return base64.b64encode(data).decode(), draw(st.sampled_from(["true", "True", "1", "yes"]))
    if kind == "flag_int":
        return base64.b64encode(data).decode(), draw(st.sampled_from([1, 1.0, None]))
    if kind == "double_b64":
        return base64.b64encode(base64.b64encode(data)).decode(), True
    return raw + "&data[X]=" + draw(st.sampled_from(["%FF", "%C3%28", "%ED%A0%80", "%F0%9F", "%"])), False


@settings(FUZZ, max_examples=1000)
@given(body=encodings(), content_type=_content_types)
def test_fuzz_encodings(watched_endpoint: tuple[AwsLog, Outbound], body: tuple[Any, Any], content_type: Any) -> None:
    log, outbound = watched_endpoint
    text, flag = body
    check_endpoint(_event(text, b64=flag, content_type=content_type), log, outbound)


_header_values = st.sampled_from([FORM, "application/json", "", None, 1, ["x"], {"a": 1}, "\x00", "é"]) | st.text(
    max_size=20
)


@st.composite
def event_shapes(draw: st.DrawFn) -> Any:
    """Events that are not quite Function URL events: odd headers, methods, contexts and body types."""
    body = urlencode(GENUINE_PAIRS if draw(st.booleans()) else GENUINE_PAIRS[:-1])
    event: Any = _event(body, b64=False)
    headers_kind = draw(
        st.sampled_from(["form", "form", "dict", "none", "list", "str", "mixed_case", "two_types", "huge"])
    )
    if headers_kind == "form":
        event["headers"] = {
            "content-type": FORM,
            **draw(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)),
        }
    elif headers_kind == "none":
        event["headers"] = None
    elif headers_kind == "list":
        event["headers"] = [["content-type", FORM]]
    elif headers_kind == "str":
        event["headers"] = "content-type: " + FORM
    elif headers_kind == "mixed_case":
        event["headers"] = {"Content-Type": draw(_header_values), "CONTENT-TYPE": draw(_header_values)}
    elif headers_kind == "two_types":
        event["headers"] = {"content-type": draw(_header_values), "Content-Type": FORM}
    elif headers_kind == "huge":
        event["headers"] = {f"x-{i}": "v" * 100 for i in range(200)} | {"content-type": FORM}
    else:
        event["headers"] = draw(
            st.dictionaries(st.text(max_size=15) | st.just("content-type"), _header_values, max_size=6)
        )
    method = draw(
        st.sampled_from(["POST"] * 4 + ["post", "Post", " POST", "GET", "HEAD", "OPTIONS", "", None, 1, ["POST"]])
    )
    context = draw(st.sampled_from(["ok"] * 6 + ["missing", "none", "http_missing", "http_str", "list"]))
    if context == "ok":
        event["requestContext"]["http"]["method"] = method
    elif context == "missing":
        event.pop("requestContext")
    elif context == "none":
        event["requestContext"] = None
    elif context == "http_missing":
        event["requestContext"].pop("http")
    elif context == "http_str":
        event["requestContext"]["http"] = "POST"
    else:
        event["requestContext"] = [event["requestContext"]]
    body_kind = draw(st.sampled_from(["str"] * 6 + ["none", "int", "list", "dict", "bytes", "missing"]))
    if body_kind == "none":
        event["body"] = None
    elif body_kind == "int":
        event["body"] = 7
    elif body_kind == "list":
        event["body"] = [body]
    elif body_kind == "dict":
        event["body"] = dict(GENUINE_PAIRS)
    elif body_kind == "bytes":
        event["body"] = body.encode()
    elif body_kind == "missing":
        event.pop("body")
    event["isBase64Encoded"] = draw(st.sampled_from([False] * 4 + [True, None, "false", 0]))
    for key in draw(st.lists(st.sampled_from(["version", "rawPath", "routeKey", "isBase64Encoded"]), max_size=2)):
        event.pop(key, None)
    if draw(_rarely):
        event = draw(st.sampled_from([None, [], "event", 0, {}]))
    return event


@settings(FUZZ, max_examples=800)
@given(event=event_shapes())
def test_fuzz_event_shapes_and_headers(watched_endpoint: tuple[AwsLog, Outbound], event: Any) -> None:
    log, outbound = watched_endpoint
    before = len(log.calls)
    answer = endpoint.lambda_handler(event, FakeContext())
    hypothesis.event(f"status {answer['statusCode']}")
    assert answer["statusCode"] in {200, 400, 401, 405, 413}, answer
    if answer["statusCode"] != 200:
        assert not [op for op, _ in log.calls[before:] if op in WRITES]
    assert outbound.urls == []


@st.composite
def nested_and_sized(draw: st.DrawFn) -> tuple[str, bool, str]:
    """Bracket nesting around the limit, deep JSON, field counts and sizes around 64 KiB."""
    kind = draw(st.sampled_from(["form_depth", "json_depth", "fields", "size", "size_multibyte", "json_wide"]))
    token = draw(st.sampled_from([APPLICATION_TOKEN, WRONG_TOKEN]))
    if kind == "form_depth":
        depth = draw(st.integers(0, MAX_DEPTH + 30))
        key = draw(st.sampled_from(["auth", "data", "x", "auth[member_id]"])) + "".join(
            f"[{draw(st.sampled_from(['', 'a', '0', 'member_id']))}]" for _ in range(depth)
        )
        pairs = [*GENUINE_PAIRS, (key, "v")] if draw(st.booleans()) else [(key, MEMBER_ID), *GENUINE_PAIRS[:1]]
        return urlencode([(k, token if k == "auth[application_token]" else v) for k, v in pairs]), False, FORM
    if kind == "json_depth":
        depth = draw(st.sampled_from([MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 100, 999, 5000, 100_000]))
        inner = draw(st.sampled_from(["[", '{"a":']))
        close = "]" if inner == "[" else "}"
        nested = inner * depth + "1" + close * depth
        text = (
            '{"event":"ONAPPUNINSTALL","auth":{"member_id":"'
            + MEMBER_ID
            + '","application_token":"'
            + token
            + '"},"data":'
            + nested
            + "}"
        )
        return text, False, "application/json"
    if kind == "fields":
        n = draw(st.sampled_from([990, 995, 1000, 1001, 1010, 5000]))
        pairs = [*GENUINE_PAIRS, *[(f"data[F{i}]", "1") for i in range(n - len(GENUINE_PAIRS))]]
        return urlencode([(k, token if k == "auth[application_token]" else v) for k, v in pairs]), False, FORM
    if kind == "json_wide":
        n = draw(st.sampled_from([990, 1000, 1001, 3000]))
        data = {f"k{i}": i for i in range(n)}
        text = json.dumps(
            {"event": "ONAPPUNINSTALL", "auth": {"member_id": MEMBER_ID, "application_token": token}, "data": data}
        )
        b64 = draw(st.booleans())
        return (base64.b64encode(text.encode()).decode() if b64 else text), b64, "application/json"
    base = urlencode([(k, token if k == "auth[application_token]" else v) for k, v in GENUINE_PAIRS])
    target = MAX_BODY_BYTES + draw(st.integers(-3, 3)) * draw(st.sampled_from([1, 7, 1000]))
    fill = "é" if kind == "size_multibyte" else "x"
    pad = max(0, target - len(base.encode()) - len("&data[PAD]="))
    text = base + "&data[PAD]=" + fill * (pad // len(fill.encode()))
    b64 = draw(st.booleans())
    return (base64.b64encode(text.encode()).decode() if b64 else text), b64, FORM


@settings(FUZZ, max_examples=500)
@given(case=nested_and_sized())
def test_fuzz_nesting_depth_field_counts_and_sizes(
    watched_endpoint: tuple[AwsLog, Outbound], case: tuple[str, bool, str]
) -> None:
    log, outbound = watched_endpoint
    text, b64, content_type = case
    status = check_endpoint(_event(text, b64=b64, content_type=content_type), log, outbound)
    raw = base64.b64decode(text) if b64 else text.encode()
    if len(raw) > MAX_BODY_BYTES:
        assert status == 413


@pytest.fixture
def install_endpoint(
    mock_aws: AwsAccount, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[AwsLog, Outbound, Emulator]]:
    """B24_ACCEPT_INSTALL on, the OAuth URL on an emulator that knows nothing of the stored app."""
    with Emulator() as emu:
        monkeypatch.setenv("B24_ACCEPT_INSTALL", "true")
        monkeypatch.setenv("B24_OAUTH_URL", emu.oauth_url)
        runtime.reset()
        log = AwsLog().watch(runtime.endpoint_store().client, runtime.endpoint_sqs())
        outbound = Outbound(allow=(emu.oauth_url,)).install(monkeypatch)
        yield log, outbound, emu
        runtime.reset()


_install_auth = st.fixed_dictionaries(
    {},
    optional={
        "member_id": st.sampled_from([MEMBER_ID, "f" * 32, "../x"]) | st.text(max_size=10),
        "application_token": st.sampled_from([APPLICATION_TOKEN, WRONG_TOKEN]) | st.text(max_size=10),
        "refresh_token": st.sampled_from(["f" * 64, "", " "]) | st.text(max_size=20),
        "access_token": st.text(max_size=20),
        "server_endpoint": st.sampled_from(
            ["https://oauth.bitrix.info/rest/", "http://127.0.0.1:9/rest/", "https://evil.example/rest/"]
        )
        | st.text(max_size=20),
        "client_endpoint": st.sampled_from(["https://evil.example/rest/", "http://127.0.0.1:9/"]),
        "domain": st.text(max_size=10),
    },
)


@settings(FUZZ, max_examples=400)
@given(
    event_name=st.sampled_from(["ONAPPINSTALL", "ONAPPUPDATE", "onappinstall", "ONAPPUNINSTALL"]),
    auth=_install_auth,
    as_json=st.booleans(),
)
def test_fuzz_forged_installs_store_nothing(
    install_endpoint: tuple[AwsLog, Outbound, Emulator], event_name: str, auth: dict[str, str], as_json: bool
) -> None:
    log, outbound, emu = install_endpoint
    body = {"event": event_name, "ts": "1795172400", "auth": auth}
    if as_json:
        event = _event(json.dumps(body), content_type="application/json")
    else:
        event = _event(urlencode([("event", event_name), *[(f"auth[{k}]", v) for k, v in auth.items()]]))
    check_endpoint(event, log, outbound, installs=True)
    assert emu.requests_log(kind="rest") == []  # never a portal call
    # Nothing was vouched for: every OAuth answer was an error (`wrong_client` comes with HTTP 200).
    assert all(e.error for e in emu.requests_log(kind="oauth"))


_trusted_lookalikes = st.sampled_from(
    [
        "https://oauth.bitrix.info.evil.example/rest/",
        "https://oauth.bitrix.info@evil.example/rest/",
        "https://evil.example@oauth.bitrix.info/rest/",
        "https://oauth.bitrix.info:8443/rest/",
        "http://oauth.bitrix.info/rest/",
        "https://oauth.bitrix.info./rest/",
        "https://\u043eauth.bitrix.info/rest/",
        "https://oauth.bitrix.info%2F@evil.example/",
        "//oauth.bitrix.info/rest/",
        "https:/oauth.bitrix.info/rest/",
        "https://xn--auth-ctd.bitrix.info/rest/",
        "https://oauth.bitrix24.tech:80/rest/",
        "https://127.0.0.1/rest/",
        "https://oauth.bitrix.info:0/",
        "https://[::1]/rest/",
        "https://oauth.bitrix.info:99999/",
    ]
) | st.text(max_size=40)


@pytest.fixture
def untrusted_endpoint(mock_aws: AwsAccount, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AwsLog, Outbound]]:
    """B24_ACCEPT_INSTALL on and no B24_OAUTH_URL: the posted server_endpoint decides (design §9)."""
    monkeypatch.setenv("B24_ACCEPT_INSTALL", "true")
    monkeypatch.delenv("B24_OAUTH_URL", raising=False)
    runtime.reset()
    log = AwsLog().watch(runtime.endpoint_store().client, runtime.endpoint_sqs())
    outbound = Outbound().install(monkeypatch)  # blocks everything: even a trusted host is unreachable
    yield log, outbound
    runtime.reset()


@settings(FUZZ, max_examples=300)
@given(server_endpoint=_trusted_lookalikes)
def test_fuzz_untrusted_oauth_hosts_are_never_contacted(
    untrusted_endpoint: tuple[AwsLog, Outbound], server_endpoint: str
) -> None:
    """Without B24_OAUTH_URL a registration may only ever talk to Bitrix24's own OAuth hosts."""
    log, outbound = untrusted_endpoint
    sent = len(outbound.urls)
    pairs = [
        ("event", "ONAPPINSTALL"),
        ("auth[member_id]", MEMBER_ID),
        ("auth[application_token]", "t" * 32),
        ("auth[refresh_token]", "r" * 64),
        ("auth[server_endpoint]", server_endpoint),
    ]
    status = check_endpoint(_event(urlencode(pairs)), log, outbound, installs=True)
    assert status in {400, 401}
    for url in outbound.urls[sent:]:
        parts = urlsplit(url)
        assert (parts.scheme, parts.port) == ("https", None), url
        assert parts.hostname in {"oauth.bitrix.info", "oauth.bitrix24.tech"}, url


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Every pair of arguments hmac.compare_digest is called with (it still compares)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


def test_the_endpoint_compares_application_tokens_in_constant_time(
    mock_aws: AwsAccount, compared: list[tuple[bytes, bytes]]
) -> None:
    """Also for a posted token that is not ASCII (no fallback to `==` on a TypeError)."""
    runtime.reset()
    for token in (WRONG_TOKEN, "ключ-" + WRONG_TOKEN, APPLICATION_TOKEN):
        body = urlencode([(k, token if k == "auth[application_token]" else v) for k, v in GENUINE_PAIRS])
        status = endpoint.lambda_handler(_event(body), FakeContext())["statusCode"]
        assert status == (200 if token == APPLICATION_TOKEN else 401)
        assert compared[-1] == (APPLICATION_TOKEN.encode(), token.encode())
    runtime.reset()


def test_the_worker_compares_application_tokens_in_constant_time(
    box: Sandbox, compared: list[tuple[bytes, bytes]]
) -> None:
    seeded = box.add_portal("ct.bitrix24.test", handlers=DECLARED_ROWS)
    token = seeded.installation.application_token
    engine = Engine(box.store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=PATIENT)

    stale = run(engine, Job(Action.UNINSTALL, seeded.member_id, application_token=WRONG_TOKEN, ts="1"))
    assert stale.outcome is Outcome.SKIPPED
    assert (token.encode(), WRONG_TOKEN.encode()) in compared  # the stale-uninstall check
    compared.clear()
    box.emulator.uninstall(seeded.portal, box.app)  # only the portal's refusal confirms an uninstall
    done = run(engine, Job(Action.UNINSTALL, seeded.member_id, application_token=token, ts="2"))
    assert done.outcome is Outcome.REVOKED and done.record_deleted
    assert compared.count((token.encode(), token.encode())) >= 2  # the job's check and the guarded delete


# =============================================================================================
# 6. Template security: what tests/functional/test_template.py does not check yet
# =============================================================================================


def test_function_url_has_no_cors_and_buffers(template: dict[str, Any]) -> None:
    """No browser origin may read the endpoint's answers; Bitrix24 posts server to server."""
    config = template["Resources"]["EndpointFunction"]["Properties"]["FunctionUrlConfig"]
    assert "Cors" not in config
    assert config.get("InvokeMode", "BUFFERED") == "BUFFERED"


def test_the_worker_is_not_capped_by_reserved_concurrency(template: dict[str, Any]) -> None:
    """Reserved concurrency on an SQS consumer throttles invocations, burns receive counts and sends
    healthy jobs to the DLQ early (design §11.2): the cap belongs on the event source."""
    worker_props = template["Resources"]["WorkerFunction"]["Properties"]
    assert "ReservedConcurrentExecutions" not in worker_props
    assert "ReservedConcurrentExecutions" not in template["Globals"]["Function"]


def test_no_secret_travels_through_the_template(template: dict[str, Any]) -> None:
    """Credentials live in SSM only: no parameter, variable or resource of the template carries one."""
    secretish = re.compile(r"secret|token|password|credential|apikey|api_key", re.IGNORECASE)
    not_secrets = {"TokenStore"}  # where records live (ssm | dynamodb): a name, not a token
    for name, param in template.get("Parameters", {}).items():
        if secretish.search(name) and name not in not_secrets:
            assert param.get("NoEcho") is True, f"parameter {name} looks like a secret: NoEcho, or keep it in SSM"
            assert "Default" not in param, name
    env = dict(template["Globals"]["Function"].get("Environment", {}).get("Variables", {}))
    for res in template["Resources"].values():
        env.update(res.get("Properties", {}).get("Environment", {}).get("Variables", {}) or {})
    assert not [k for k in env if secretish.search(k)], env
    text = (ROOT / "template.yaml").read_text()
    assert not re.search(r"\b[0-9a-f]{32,}\b", text), "a token-like hex string in the template"
    assert "LOG_EVENT" not in text, "the endpoint's events carry tokens: never log them"


def test_failed_jobs_have_time_to_reach_the_dlq(template: dict[str, Any]) -> None:
    """A job that keeps failing is retried maxReceiveCount times, then kept 14 days in the DLQ (design §7)."""
    resources = template["Resources"]
    queue = resources["WorkQueue"]["Properties"]
    dlq = resources["DeadLetterQueue"]["Properties"]
    retention = queue.get("MessageRetentionPeriod", 345600)
    worker_timeout = resources["WorkerFunction"]["Properties"].get(
        "Timeout", template["Globals"]["Function"].get("Timeout", 3)
    )
    max_receives = int(queue["RedrivePolicy"]["maxReceiveCount"])
    assert retention >= max_receives * queue["VisibilityTimeout"] + worker_timeout, "jobs would expire before the DLQ"
    assert dlq["MessageRetentionPeriod"] >= retention
