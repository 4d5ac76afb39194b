"""`b24-cleanup migrate --to dynamodb` (design §3a): conditional copy, tombstone, loud SSM readers, no branch."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from b24_cleanup.access import TokenAccess
from b24_cleanup.dynamostore import DynamoPortalStore, create_table
from b24_cleanup.engine import Engine, EngineOptions
from b24_cleanup.errors import ConfigError, JobFailedError, MovedRecordError
from b24_cleanup.jobs import Action, Job
from b24_cleanup.oauth import OAuthClient
from b24_cleanup.ops.migrate import Migration
from b24_cleanup.ops.sandbox import REGION, Sandbox, sandbox
from b24_cleanup.pacing import Backoff
from b24_cleanup.record import PortalRecord
from b24_cleanup.store import PortalStore, is_tombstone

TABLE = "portals-migrated"
APP = "https://app.example.com/b24/events"
OLD = "https://old.example.com/b24/events"
ROWS = [{"event": "ONCRMLEADADD", "handler": APP}, {"event": "ONCRMLEADADD", "handler": OLD}]
FAST = EngineOptions(backoff=Backoff(attempts=3, base=0.01, cap=0.05), settle_seconds=0.3)


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox(declared=[{"event": "ONCRMLEADADD", "handler": APP}]) as sb:
        create_table(boto3.client("dynamodb", region_name=REGION), TABLE)
        yield sb


def table() -> DynamoPortalStore:
    return DynamoPortalStore("/b24-cleanup/demo", TABLE)


def migration(box: Sandbox, **options: Any) -> Migration:
    options.setdefault("settle_seconds", 0)
    return Migration(PortalStore(box.prefix), DynamoPortalStore(box.prefix, TABLE), **options)


def raw(box: Sandbox, member_id: str) -> str:
    name = f"{box.prefix}/portals/{member_id}"
    return box.store.client.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]


def alive(box: Sandbox, record: PortalRecord) -> bool:
    """The record's refresh token still refreshes (takes the record: a failed assert shows no token)."""
    try:
        OAuthClient(box.store.app_credentials()).refresh(box.emulator.oauth_url, record.refresh_token)
    except Exception:
        return False
    return True


def same_refresh_token(a: PortalRecord, b: PortalRecord) -> bool:
    """Compared here, so that a failed assert shows records, not tokens."""
    return a.refresh_token == b.refresh_token


def test_every_record_moves_and_its_parameter_keeps_no_token(box: Sandbox) -> None:
    seeded = [box.add_portal(f"m{i}.bitrix24.test") for i in range(4)]
    before = {s.member_id: box.record(s.member_id) for s in seeded}
    progress: list[tuple[int, int | None]] = []

    counts = migration(box, progress=lambda done, total, _m: progress.append((done, total))).run()

    assert (counts.moved, counts.already_moved, counts.failed) == (4, 0, 0)
    assert progress == [(i, 4) for i in range(1, 5)]
    for s in seeded:
        assert table().get(s.member_id).data == before[s.member_id].data  # type: ignore[union-attr]
        text = raw(box, s.member_id)
        assert json.loads(text) == {"moved_to": "dynamodb", "table": TABLE}
        assert before[s.member_id].refresh_token not in text  # type: ignore[union-attr]


def test_ssm_readers_of_a_moved_record_fail_loudly_naming_the_table(box: Sandbox) -> None:
    seeded = box.add_portal("moved.bitrix24.test", expired=True)
    migration(box).run()
    store = PortalStore(box.prefix)
    with pytest.raises(MovedRecordError, match=TABLE) as err:
        store.get(seeded.member_id)
    assert isinstance(err.value, ConfigError)
    with pytest.raises(ConfigError, match=TABLE):
        TokenAccess(store).get(seeded.member_id)  # never refreshes from a tombstone
    with pytest.raises(ConfigError, match=TABLE):
        store.modify(seeded.member_id, lambda r: True)
    with pytest.raises(ConfigError, match=TABLE):
        store.delete_if_token(seeded.member_id, seeded.installation.application_token)
    assert not box.emulator.requests_log(kind="oauth")
    assert is_tombstone(raw(box, seeded.member_id))


def test_a_sweep_on_the_ssm_store_fails_the_moved_portal_and_touches_nothing(box: Sandbox) -> None:
    seeded = box.add_portal("swept.bitrix24.test", handlers=ROWS, expired=True)
    migration(box).run()
    with pytest.raises(JobFailedError) as failed:
        Engine(PortalStore(box.prefix), oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=FAST).run(
            Job(Action.SWEEP, seeded.member_id)
        )
    assert TABLE in failed.value.result.reason
    assert len(seeded.portal.handlers(box.app)) == 2
    assert not box.emulator.requests_log(kind="oauth")


def test_dry_run_writes_nothing(box: Sandbox) -> None:
    seeded = box.add_portal("dry.bitrix24.test")
    counts = migration(box, dry_run=True).run()
    assert counts.moved == 1
    assert table().get(seeded.member_id) is None
    assert not is_tombstone(raw(box, seeded.member_id))


def test_a_second_run_resumes_and_counts_what_already_moved(box: Sandbox) -> None:
    done, half, todo = (box.add_portal(f"r{i}.bitrix24.test") for i in range(3))
    migration(box).run([done.member_id])
    table().create(half.member_id, box.record(half.member_id))  # a run that stopped before the tombstone

    counts = migration(box).run()

    assert (counts.moved, counts.already_moved, counts.failed) == (1, 2, 0)
    assert all(is_tombstone(raw(box, s.member_id)) for s in (done, half, todo))


def test_a_table_item_written_since_the_copy_wins_over_a_stale_ssm_record(box: Sandbox) -> None:
    """Resuming after the functions already moved the chain on in the table: the SSM copy is not copied."""
    seeded = box.add_portal("ahead.bitrix24.test")
    newer = box.record(seeded.member_id)
    assert newer is not None
    newer.data["refresh_token"] = "newer-in-the-table"
    table().create(seeded.member_id, newer)

    counts = migration(box).run()

    assert counts.already_moved == 1
    assert table().get(seeded.member_id).refresh_token == "newer-in-the-table"  # type: ignore[union-attr]


def test_a_write_landing_just_before_the_tombstone_is_moved(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    seeded = box.add_portal("late.bitrix24.test", expired=True)
    run = migration(box)
    original = run._write_tombstone

    def tombstone(member_id: str) -> int:
        # The app's backend refreshes on the SSM store between the re-read and the tombstone.
        TokenAccess(PortalStore(box.prefix), oauth_url=box.emulator.oauth_url, settle_seconds=0.05).get(member_id)
        return original(member_id)

    monkeypatch.setattr(run, "_write_tombstone", tombstone)
    counts = run.run()

    assert counts.moved == 1
    moved = table().get(seeded.member_id)
    assert moved is not None and alive(box, moved)


def test_a_late_writer_that_overwrote_the_tombstone_is_moved_by_the_final_pass(box: Sandbox) -> None:
    seeded = box.add_portal("later.bitrix24.test", expired=True)
    stale = box.record(seeded.member_id)
    assert stale is not None
    slept: list[float] = []

    def settle(seconds: float) -> None:
        # A writer that read before the tombstone stores its refreshed pair after it.
        slept.append(seconds)
        answer = OAuthClient(box.store.app_credentials()).refresh(box.emulator.oauth_url, stale.refresh_token)
        stale.data.update(refresh_token=answer["refresh_token"], access_token=answer["access_token"])
        PortalStore(box.prefix).put(seeded.member_id, stale)

    counts = migration(box, settle_seconds=7, sleep=settle).run()

    assert slept == [7]
    assert (counts.moved, counts.failed) == (1, 0)
    moved = table().get(seeded.member_id)
    assert moved is not None and same_refresh_token(moved, stale)  # the late writer's pair was moved
    assert alive(box, stale)
    assert is_tombstone(raw(box, seeded.member_id))


def test_a_conflict_with_a_table_writer_is_failed_for_an_operator(box: Sandbox) -> None:
    seeded = box.add_portal("both.bitrix24.test")

    def settle(_: float) -> None:
        record = table().get(seeded.member_id)
        assert record is not None
        table().put(seeded.member_id, PortalRecord({**record.data, "refresh_token": "table-side"}))
        PortalStore(box.prefix).put(seeded.member_id, PortalRecord({**record.data, "refresh_token": "ssm-side"}))

    counts = migration(box, settle_seconds=1, sleep=settle).run()

    assert (counts.moved, counts.failed) == (0, 1)
    assert "operator" in counts.failures[seeded.member_id]
    assert "table-side" not in counts.failures[seeded.member_id]
    assert table().get(seeded.member_id).refresh_token == "table-side"  # type: ignore[union-attr]


def test_migrate_refuses_a_dynamodb_source(box: Sandbox) -> None:
    with pytest.raises(ConfigError, match="B24_STORE=ssm"):
        Migration(table(), table())


def test_migrating_while_the_app_backend_and_a_sweep_run_keeps_every_chain(box: Sandbox) -> None:
    """Both keep working through the move: on the SSM store until it says a record moved, then on the table."""
    seeded = [box.add_portal(f"live{i}.bitrix24.test", handlers=ROWS, expired=True) for i in range(10)]
    ids = [s.member_id for s in seeded]
    stop = threading.Event()
    errors: list[str] = []
    uses = {"ssm": 0, "table": 0}

    def follow(call: Any) -> Any:
        """A backend redeployed with B24_STORE=dynamodb once its SSM store says the record moved."""
        try:
            answer = call(PortalStore(box.prefix))
            uses["ssm"] += 1
            return answer
        except MovedRecordError:
            uses["table"] += 1
            return call(DynamoPortalStore(box.prefix, TABLE))

    def backend() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            member_id = rng.choice(ids)
            try:
                portal = follow(
                    lambda store, m=member_id: TokenAccess(
                        store, oauth_url=box.emulator.oauth_url, settle_seconds=0.3
                    ).get(m)
                )
                # As if the portal answered expired_token: the app moves the chain on through the record.
                held = portal.access_token
                follow(
                    lambda store, m=member_id, t=held: TokenAccess(
                        store, oauth_url=box.emulator.oauth_url, settle_seconds=0.3
                    ).after_expired(m, t)
                )
            except Exception as exc:
                errors.append(f"backend {type(exc).__name__}: {exc}")
            time.sleep(0.01)

    def sweeper() -> None:
        while not stop.is_set():
            for member_id in ids:
                job = Job(Action.SWEEP, member_id)
                try:
                    Engine(
                        PortalStore(box.prefix), oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=FAST
                    ).run(job)
                    uses["ssm"] += 1
                except JobFailedError as failed:
                    if "moved to dynamodb" not in failed.result.reason:
                        errors.append(f"sweep on SSM: {failed.result.reason}")
                        continue
                    uses["table"] += 1
                    try:
                        Engine(
                            DynamoPortalStore(box.prefix, TABLE),
                            oauth_url=box.emulator.oauth_url,
                            orphan_grace_days=0,
                            options=FAST,
                        ).run(job)
                    except JobFailedError as again:
                        errors.append(f"sweep on the table: {again.result.reason}")

    workers = [threading.Thread(target=backend, daemon=True), threading.Thread(target=sweeper, daemon=True)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        counts = migration(box, settle_seconds=3).run()
        time.sleep(1.0)  # both go on for a moment on the table
    finally:
        stop.set()  # also when the migration raised: the threads must not outlive the sandbox
        for w in workers:
            w.join(60)

    assert not errors, errors[:5]
    assert (counts.moved, counts.failed) == (10, 0), counts.failures
    assert uses["ssm"] > 0 and uses["table"] > 0  # the move happened under both
    for s in seeded:
        assert is_tombstone(raw(box, s.member_id))
        record = table().get(s.member_id)
        assert record is not None
        assert alive(box, record), s.member_id  # the stored end of the chain is live: no branch
        assert {(h["event"], h["handler"]) for h in s.portal.handlers(box.app)} == {("ONCRMLEADADD", APP)}
