"""Trust under adversity (issue 13, the worker's half): forged uninstalls, races with other writers.

Each test is named after the rule it holds (design §5 steps 3, 6, 8; §7). Everything runs on the
real wire: the project's emulator over loopback HTTP and moto. A race with another writer is
staged from inside the emulator (a `fail_command` match that writes SSM while the portal is
answering), so the engine meets it exactly where it would in production: between its read and
its write.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from fixtures.aws import ROOT

from b24_cleanup import runtime
from b24_cleanup.config import Settings
from b24_cleanup.engine import Engine, EngineOptions
from b24_cleanup.errors import JobFailedError
from b24_cleanup.handlers import worker
from b24_cleanup.jobs import Action, Job, Outcome
from b24_cleanup.oauth import OAuthClient
from b24_cleanup.ops.sandbox import REGION, Sandbox, SeededPortal, sandbox, sqs_event
from b24_cleanup.pacing import Backoff, LeakyBucket
from b24_cleanup.record import PortalRecord
from b24_cleanup.store import PortalStore, write_pacer
from b24_cleanup.tokens import PERSIST_BUDGET_SECONDS, ChainState, TokenKeeper

if str(ROOT) not in sys.path:  # bench/ lives beside functions/, not inside the package
    sys.path.insert(0, str(ROOT))

from bench.campaign import AwsFaults

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
    kwargs.setdefault("orphan_grace_days", 0)  # orphans may go at once here (held orphans: test_held_orphans.py)
    kwargs.setdefault("oauth_url", box.emulator.oauth_url)  # the emulator is no trusted OAuth host
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


# ------------------------------------------------------------------- helpers for the chain tests

NO_RETRIES = Config(retries={"mode": "standard", "total_max_attempts": 1})


class QuickEngine(Engine):
    """The production engine whose keepers' clock jumps through their pauses (no real waiting)."""

    def keeper(self, member_id: str, record: PortalRecord, ends_at: float | None = None) -> TokenKeeper:
        made = super().keeper(member_id, record, ends_at)
        now = [time.monotonic()]
        made.sleep = lambda seconds: now.__setitem__(0, now[0] + seconds)
        made.monotonic = lambda: now[0]
        return made


class RacingOAuth:
    """The OAuth client, but `before` runs first: another writer moves while this refresh is in flight."""

    def __init__(self, real: OAuthClient, before: Callable[[], None]) -> None:
        self.real, self.before = real, before

    def refresh(self, token_url: str, refresh_token: str) -> dict[str, Any]:
        self.before()
        return self.real.refresh(token_url, refresh_token)


class RacingEngine(Engine):
    def __init__(self, store: PortalStore, before: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(store, options=FAST, **kwargs)
        self.before = before

    def oauth_client(self) -> OAuthClient:
        return RacingOAuth(super().oauth_client(), self.before)  # type: ignore[return-value]


def chain_works(box: Sandbox, member_id: str) -> bool:
    """The stored refresh token is the live end of the portal's chain (spends it: call last)."""
    record = box.record(member_id)
    try:
        OAuthClient(box.store.app_credentials()).refresh(box.emulator.oauth_url, record.refresh_token)
    except Exception:
        return False
    return True


# ------------------------------------------------------------------- item 2: the persist budget


def test_no_refresh_starts_with_less_than_the_persist_budget_left(box: Sandbox) -> None:
    """design §5 step 3: a pair rotated with no time left to store it would be lost with the invocation."""
    seeded = box.add_portal("late.bitrix24.test", expired=True)
    before = box.record(seeded.member_id).data

    with pytest.raises(JobFailedError) as failed:
        engine(box).run(sweep(seeded), ends_at=time.monotonic() + PERSIST_BUDGET_SECONDS - 1)

    assert "OUT_OF_TIME" in failed.value.result.reason
    assert box.emulator.requests_log(kind="oauth") == []  # the refresh token was never spent
    assert box.record(seeded.member_id).data == before
    again = engine(box).run(sweep(seeded), ends_at=time.monotonic() + 120)  # the retry, with time
    assert again.outcome is Outcome.CLEAN and again.refreshed == 1


def test_a_rotated_pair_is_retried_until_stored_within_the_time_left(box: Sandbox) -> None:
    seeded = box.add_portal("throttled.bitrix24.test", expired=True)
    store = PortalStore(box.prefix, client=boto3.client("ssm", config=NO_RETRIES))
    faults = AwsFaults().attach(store.client)
    faults.fail_next("ssm.PutParameter", *["throttle"] * 12)  # twelve throttled writes, then SSM takes one

    result = QuickEngine(store, oauth_url=box.emulator.oauth_url, options=FAST).run(
        sweep(seeded), ends_at=time.monotonic() + 120
    )

    assert result.outcome is Outcome.CLEAN and result.refreshed == 1
    assert faults.attempts["ssm.PutParameter"] == 13
    assert chain_works(box, seeded.member_id)


def test_ssm_writes_are_paced_to_the_containers_share() -> None:
    settings = Settings.from_env({"B24_SSM_PREFIX": "/p", "B24_SSM_WRITE_RATE": "3", "B24_WORKER_CONCURRENCY": "5"})
    store = settings.store()
    assert store.pacer is not None and store.pacer.rate == pytest.approx(3 / 5)
    now, slept = [0.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = LeakyBucket(0.6, 0.6, clock=lambda: now[0], sleep=sleep)  # write_pacer's, without its random phase
    for _ in range(4):
        pacer.acquire()
    # Below one write a second the bank is a fraction of one: even a rested container's first
    # write waits for it, so five containers that pause together never write five at once.
    assert slept == pytest.approx([0.4 / 0.6] + [1 / 0.6] * 3)


def test_a_containers_pacer_banks_one_second_of_its_share_and_no_more() -> None:
    """A batch's writes come together after seconds of REST calls: one second of the share is
    kept for them (the containers' banks add up to SSM's one-second burst), not the whole idle time."""
    now, slept = [0.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    assert (write_pacer(2.0).rate, write_pacer(2.0).burst) == (2.0, 2.0)  # 10 writes/s shared by 5 containers
    pacer = LeakyBucket(2.0, 2.0, clock=lambda: now[0], sleep=sleep)  # without the random phase
    for _ in range(4):
        pacer.acquire()
    assert slept == pytest.approx([0.5, 0.5])  # two at once, then 2/s
    now[0] += 30.0  # a long idle stretch banks one second's worth, never thirty
    for _ in range(4):
        pacer.acquire()
    assert slept == pytest.approx([0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="positive rate"):
        write_pacer(0)


@pytest.mark.parametrize(("rate", "containers"), [(3, 5), (10, 5), (1, 7), (40, 3)])
def test_the_fleets_banks_add_up_to_one_second_of_the_whole_rate(rate: float, containers: int) -> None:
    """Every container rested and starting together: the fleet's first burst is what one second of
    SSM's bucket admits, and the writes after it keep to the rate."""
    frozen = 0.0  # every container asks for 20 write slots at the same instant
    pacers = [write_pacer(rate / containers, clock=lambda: frozen, sleep=lambda _: None) for _ in range(containers)]
    waits = [pacer.acquire() for pacer in pacers for _ in range(20)]  # how long each write waits
    assert sum(1 for wait in waits if wait == 0) <= rate  # at once: one second of the whole rate
    assert sum(1 for wait in waits if wait <= 10.0) <= rate * 11  # then no more than the rate


def test_containers_that_start_together_do_not_write_together() -> None:
    """Same start, same work: without a random phase five containers would write in the same
    instant after every pause. Each starts at a random point of its first write interval."""
    frozen = 0.0
    firsts = [write_pacer(0.6, clock=lambda: frozen, sleep=lambda _: None).acquire() for _ in range(5)]
    assert len({round(wait, 6) for wait in firsts}) == 5
    assert all(0.4 / 0.6 <= wait <= 1.4 / 0.6 for wait in firsts)  # within one interval of 1/0.6 s


def test_the_fresh_read_of_a_paced_write_comes_after_the_wait(box: Sandbox) -> None:
    """At the quota a write slot can be seconds away: the read the write depends on is taken after
    the wait, so a pair another writer stored meanwhile is what the change sees (and keeps)."""
    seeded = box.add_portal("wait.bitrix24.test", expired=True)
    member_id = seeded.member_id
    before = box.record(member_id)
    assert before is not None
    other = PortalStore(box.prefix, client=boto3.client("ssm", region_name=REGION))

    def another_writer_during_the_wait(seconds: float) -> None:
        other.modify(member_id, lambda r: r.data.update(refresh_token="stored-meanwhile") is None)

    store = PortalStore(box.prefix, client=boto3.client("ssm", region_name=REGION))
    store.pacer = LeakyBucket(1.0, 1, sleep=another_writer_during_the_wait)
    store.pacer.acquire()  # the slot is taken: the next write waits
    seen: list[str] = []

    def change(current: PortalRecord) -> bool:
        seen.append(current.refresh_token)
        current.data["mark"] = "x"
        return True

    store.modify(member_id, change)

    assert seen == ["stored-meanwhile"]
    after = box.record(member_id)
    assert after is not None and after.refresh_token == "stored-meanwhile" and after.data["mark"] == "x"


def test_a_refresh_takes_its_write_slot_before_it_spends_the_refresh_token(box: Sandbox) -> None:
    """The wait for a write slot comes before the OAuth call, never between the rotation and its
    write: a pair the OAuth server has issued is stored at once, and the round trip overlaps the wait."""
    seeded = box.add_portal("slot.bitrix24.test", expired=True)
    record = box.record(seeded.member_id)
    assert record is not None
    store = PortalStore(box.prefix, client=boto3.client("ssm", region_name=REGION))
    oauth_calls_when_waiting: list[int] = []

    def sleep(seconds: float) -> None:
        oauth_calls_when_waiting.append(len(box.emulator.requests_log(kind="oauth")))
        time.sleep(seconds)

    store.pacer = LeakyBucket(20.0, 1, sleep=sleep)
    store.pacer.acquire()  # another write just took the slot: this refresh has to wait
    writes = AwsFaults().attach(*store.clients())  # no faults: it counts the store's SSM attempts
    keeper = TokenKeeper(
        store,
        seeded.member_id,
        record,
        lambda: OAuthClient(box.store.app_credentials()),
        chains=ChainState(),
        oauth_url=box.emulator.oauth_url,
    )
    keeper.access_token()

    assert oauth_calls_when_waiting == [0]  # waited once, before the refresh token was spent
    assert writes.attempts["ssm.PutParameter"] == 1
    assert chain_works(box, seeded.member_id)


# ------------------------------------------------------------------- item 4: a pair that failed to store


def test_pending_pair_never_overwrites_a_newer_installation(box: Sandbox) -> None:
    """A pair whose write failed is kept in process for the retry, and dropped if the portal was
    reinstalled meanwhile: it must never revert the new application_token or cut off its chain."""
    seeded = box.add_portal("reinstalled.bitrix24.test", expired=True)
    store = PortalStore(box.prefix, client=boto3.client("ssm", config=NO_RETRIES))
    AwsFaults(1.0, kinds=("5xx",), operations={"ssm.PutParameter"}).attach(store.client)
    with pytest.raises(JobFailedError):
        QuickEngine(store, oauth_url=box.emulator.oauth_url, options=FAST).run(
            sweep(seeded), ends_at=time.monotonic() + 120
        )
    assert seeded.member_id in runtime.chains().pending  # the only copy of the rotated pair

    box.emulator.uninstall(seeded.portal, box.app)
    newer = box.emulator.install(seeded.portal, box.app)
    box.store.put(seeded.member_id, PortalRecord(box.emulator.record_for(newer)))

    retry = engine(box).run(sweep(seeded))

    record = box.record(seeded.member_id)
    assert record.application_token == newer.application_token
    assert retry.outcome is Outcome.CLEAN
    assert seeded.member_id not in runtime.chains().pending
    assert chain_works(box, seeded.member_id)


# ------------------------------------------------------------------- item 5: the refresh's own keys only


def test_refresh_never_reverts_an_update_registered_meanwhile(box: Sandbox) -> None:
    """design §5 step 3: an ONAPPUPDATE stored while the job refreshes keeps its application_token and pair."""
    seeded = box.add_portal("updated.bitrix24.test", expired=True)
    updates = []

    def update() -> None:
        if not updates:
            updates.append(box.emulator.update(seeded.portal, box.app))
            box.store.put(seeded.member_id, PortalRecord(box.emulator.record_for(updates[0])))

    result = RacingEngine(box.store, update, oauth_url=box.emulator.oauth_url).run(sweep(seeded))

    record = box.record(seeded.member_id)
    assert record.application_token == updates[0].application_token
    assert record.refresh_token == updates[0].refresh_token  # the update's pair, not the job's
    assert result.outcome is Outcome.CLEAN  # the job went on with the update's token
    assert chain_works(box, seeded.member_id)


def test_a_refresh_that_finds_an_older_pair_put_back_stores_its_own_once_that_write_is_mended(box: Sandbox) -> None:
    """On SSM a write can put an older pair back for a moment, until its writer mends it (store.PortalStore._mend).

    The rotated pair is the chain's only live end: it is stored once the record holds the pair it was
    rotated from again, not dropped for the moment's older pair.
    """
    seeded = box.add_portal("mended.bitrix24.test", expired=True)
    live = box.record(seeded.member_id)
    older = PortalRecord({**live.data, "refresh_token": "an-older-spent-token"})
    settled: list[float] = []

    class ClobberedOAuth:
        def __init__(self, real: OAuthClient) -> None:
            self.real = real

        def refresh(self, token_url: str, refresh_token: str) -> dict[str, Any]:
            answer = self.real.refresh(token_url, refresh_token)
            box.store.put(seeded.member_id, older)  # another writer's stale write lands now...
            return answer

    class MendedEngine(Engine):
        def oauth_client(self) -> OAuthClient:
            return ClobberedOAuth(super().oauth_client())  # type: ignore[return-value]

        def keeper(self, member_id: str, record: PortalRecord, ends_at: float | None = None) -> TokenKeeper:
            made = super().keeper(member_id, record, ends_at)

            def settle(seconds: float) -> None:
                settled.append(seconds)
                box.store.put(seeded.member_id, live)  # ...and its writer mends it meanwhile

            made.sleep = settle
            return made

    result = MendedEngine(box.store, options=FAST, oauth_url=box.emulator.oauth_url).run(sweep(seeded))

    assert settled == [FAST.settle_seconds]
    assert result.outcome is Outcome.CLEAN and result.refreshed == 1
    assert chain_works(box, seeded.member_id)


def test_refresh_writes_only_the_pairs_own_keys(box: Sandbox) -> None:
    seeded = box.add_portal("keys.bitrix24.test", expired=True, extra={"scope": "crm", "note": "v1"})

    def other_writer() -> None:
        box.store.modify(seeded.member_id, lambda r: r.data.update(note="v2", scope="crm,user") is None)

    result = RacingEngine(box.store, other_writer, oauth_url=box.emulator.oauth_url).run(sweep(seeded))

    record = box.record(seeded.member_id)
    assert result.outcome is Outcome.CLEAN and result.refreshed == 1
    assert (record.data["note"], record.data["scope"]) == ("v2", "crm,user")  # the other writer's keys
    assert record.expires > time.time() + 3000 and chain_works(box, seeded.member_id)


def test_refresh_answer_scope_is_not_written_by_the_worker(box: Sandbox) -> None:
    seeded = box.add_portal("scope.bitrix24.test", expired=True, extra={"scope": "as-installed"})
    engine(box).run(sweep(seeded))
    assert box.record(seeded.member_id).data["scope"] == "as-installed"


# ------------------------------------------------------------------- item 6: a stale revoked_at


def test_a_reached_portal_loses_a_stale_revoked_at_even_when_incomplete(box: Sandbox) -> None:
    seeded = box.add_portal(
        "paying.bitrix24.test",
        handlers=[{"event": "ONCRMLEADUPDATE", "offline": True, "connector_id": "erp"}],
        extra={"revoked_at": 12345},
    )
    seeded.portal.license_auth_connector = False  # the orphan cannot be unbound: incomplete

    result = engine(box).run(sweep(seeded))

    assert result.outcome is Outcome.INCOMPLETE
    assert box.record(seeded.member_id).revoked_at is None


def test_a_reached_portal_loses_a_stale_revoked_at_even_when_the_job_fails(box: Sandbox) -> None:
    seeded = box.add_portal(
        "flaky.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": OLD_URL}], extra={"revoked_at": 12345}
    )
    seeded.portal.fail_command(lambda method, _p: method == "event.unbind", "INTERNAL_SERVER_ERROR")

    with pytest.raises(JobFailedError):
        engine(box).run(sweep(seeded))

    assert box.record(seeded.member_id).revoked_at is None


def test_an_unconfirmed_uninstall_also_removes_a_stale_revoked_at(box: Sandbox) -> None:
    seeded = box.add_portal("marked.bitrix24.test", extra={"revoked_at": 12345})
    assert engine(box).run(uninstall(seeded)).outcome is Outcome.SKIPPED
    assert box.record(seeded.member_id).revoked_at is None


def test_a_dry_run_keeps_a_stale_revoked_at(box: Sandbox) -> None:
    seeded = box.add_portal("dry-marked.bitrix24.test", extra={"revoked_at": 12345})
    engine(box, dry_run=True).run(sweep(seeded))
    assert box.record(seeded.member_id).revoked_at == 12345


# ------------------------------------------------------------------- suspected: the newest-record cache


def test_newest_record_cache_is_not_adopted_across_a_reinstall_without_expires(box: Sandbox) -> None:
    seeded = box.add_portal("cached.bitrix24.test", expired=True)
    assert engine(box).run(sweep(seeded)).refreshed == 1  # this process now remembers the old install's pair
    box.emulator.uninstall(seeded.portal, box.app)
    newer = box.emulator.install(seeded.portal, box.app)
    data = box.emulator.record_for(newer)
    del data["expires"]  # an app's own install flow may store none: due at once
    box.store.put(seeded.member_id, PortalRecord(data))

    result = engine(box).run(sweep(seeded))

    assert result.outcome is Outcome.CLEAN, result.reason
    record = box.record(seeded.member_id)
    assert record.application_token == newer.application_token and record.revoked_at is None
    assert chain_works(box, seeded.member_id)
