"""Held orphans over the real sandbox (moto + the emulator over HTTP): the three accidents of design §3.

Each accident: the sweep holds the live handler (nothing unbound, `HandlersHeld`, a log line with
event, URL, reason and until when), then releases it once its grace has passed.

Time: moto dates every parameter version "now" and offers no way to write an old one, so the
history scenario moves the orphan rules' clock forward instead (`engine.orphan_records.clock`:
the same as the history being dated in the past; the portal side keeps the real clock, so
tokens are not suddenly expired). The first-seen scenario writes the ledger with old dates, as
another night's worker would have.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ApiCalls, Stdout

from b24_cleanup import runtime
from b24_cleanup.engine import Engine, EngineOptions
from b24_cleanup.handlers import worker
from b24_cleanup.held import DAY, ledger_key
from b24_cleanup.jobs import Action, Job, Outcome
from b24_cleanup.ops.sandbox import Sandbox, SeededPortal, sandbox
from b24_cleanup.pacing import Backoff

APP = "https://app.example.com/b24/events"
UNINSTALL = "https://app.example.com/b24/uninstall"
OLD = "https://old.example.com/b24/events"
NEW = "https://app.example.com/b24/v2/events"
DECLARED = [{"event": "ONCRMLEADADD", "handler": APP}, {"event": "ONAPPUNINSTALL", "handler": UNINSTALL}]
LIVE = [{"event": "ONCRMLEADADD", "handler": APP, "user_id": u} for u in (0, 1)] + [
    {"event": "ONAPPUNINSTALL", "handler": UNINSTALL}
]
FAST = EngineOptions(backoff=Backoff(attempts=2, base=0.01, cap=0.02), settle_seconds=0.05)


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox(declared=DECLARED) as sb:
        yield sb


def make_engine(box: Sandbox, grace: int = 2, **kwargs: Any) -> Engine:
    return Engine(box.store, options=FAST, orphan_grace_days=grace, **kwargs)


def sweep(engine: Engine, seeded: SeededPortal) -> Any:
    engine.new_invocation()  # each sweep below is another night's invocation
    return engine.run(Job(Action.SWEEP, seeded.member_id))


def rows(box: Sandbox, seeded: SeededPortal) -> list[tuple[str, str | None]]:
    return sorted((r["event"], r.get("handler")) for r in seeded.portal.handlers(box.app))


def ledger(box: Sandbox) -> dict[str, int]:
    value = box.store.client.get_parameter(Name=f"{box.prefix}/app/orphans")["Parameter"]["Value"]
    return json.loads(value)["orphans"]


def put_ledger(box: Sandbox, entries: dict[str, int] | str) -> None:
    value = entries if isinstance(entries, str) else json.dumps({"orphans": entries})
    box.store.client.put_parameter(Name=f"{box.prefix}/app/orphans", Value=value, Type="String", Overwrite=True)


def version(box: Sandbox, name: str) -> int:
    return box.store.client.get_parameter(Name=f"{box.prefix}/app/{name}")["Parameter"]["Version"]


# ------------------------------------------------------------------------------------ accident 1


@pytest.mark.parametrize(
    "typo",
    [
        lambda url: url + "/",  # a trailing slash
        lambda url: url.replace("app.example.com", "App.Example.COM"),  # the host's case
        lambda url: url.replace("app.example.com", "app.example.com:443"),  # the default port
    ],
    ids=["trailing-slash", "host-case", "default-port"],
)
def test_a_typo_in_the_declared_set_holds_the_live_handlers_until_the_set_is_fixed(box: Sandbox, typo: Any) -> None:
    box.put_declared([{"event": e["event"], "handler": typo(e["handler"])} for e in DECLARED])
    seeded = box.add_portal("typo.bitrix24.test", handlers=LIVE)
    before = rows(box, seeded)
    # Long known as orphans (the worst case: the ledger alone would release them).
    put_ledger(box, {ledger_key(r["event"], r["handler"]): int(time.time() - 90 * DAY) for r in LIVE})
    engine = make_engine(box)

    result = sweep(engine, seeded)

    assert result.outcome is Outcome.CLEAN and result.unbound == 0
    assert rows(box, seeded) == before
    assert result.metrics()["HandlersHeld"] == 3
    reasons = {(p["event"], p["handler"]): p for p in result.held}
    assert set(reasons) == {("ONCRMLEADADD", APP), ("ONAPPUNINSTALL", UNINSTALL)}
    lead = reasons[("ONCRMLEADADD", APP)]
    assert lead["reason"] == "near_miss" and lead["rows"] == 2 and lead["until"] is None
    assert lead["near_miss_of"] == typo(APP)

    # ... past any grace: a year later, still held.
    engine.orphan_records.clock = lambda: time.time() + 365 * DAY
    assert sweep(engine, seeded).unbound == 0
    assert sweep(make_engine(box, grace=0), seeded).unbound == 0
    assert rows(box, seeded) == before

    # Fixing the set releases them the only right way: they are declared again.
    box.put_declared(DECLARED)
    fixed = sweep(engine, seeded)
    assert fixed.outcome is Outcome.CLEAN and fixed.kept == 3 and fixed.held == []
    assert rows(box, seeded) == before


# ------------------------------------------------------------------------------------ accident 2


def test_an_entry_removed_today_is_held_for_the_grace_then_unbound(box: Sandbox) -> None:
    box.put_declared([*DECLARED, {"event": "ONCRMDEALADD", "handler": OLD}])
    seeded = box.add_portal("removed.bitrix24.test", handlers=[*LIVE, {"event": "ONCRMDEALADD", "handler": OLD}])
    removed_at = time.time()
    box.put_declared(DECLARED)  # edited away by mistake, today
    put_ledger(box, {ledger_key("ONCRMDEALADD", OLD): int(time.time() - 30 * DAY)})  # the ledger would release it
    engine = make_engine(box)

    held = sweep(engine, seeded)

    assert held.outcome is Outcome.CLEAN and held.unbound == 0
    (pair,) = held.held
    assert (pair["event"], pair["handler"], pair["reason"]) == ("ONCRMDEALADD", OLD, "declared_within_grace")
    assert pair["status"].startswith("held: declared until ")
    assert ("ONCRMDEALADD", OLD) in rows(box, seeded)

    # Two days after the removal (and a minute), the history no longer holds it.
    engine.orphan_records.clock = lambda: removed_at + 2 * DAY + 60
    released = sweep(engine, seeded)
    assert released.outcome is Outcome.CLEANED and released.unbound == 1 and released.held == []
    assert ("ONCRMDEALADD", OLD) not in rows(box, seeded)
    assert ("ONCRMLEADADD", APP) in rows(box, seeded)


# ------------------------------------------------------------------------------------ accident 3


def test_a_url_first_seen_today_is_held_and_recorded_then_unbound_after_the_grace(box: Sandbox) -> None:
    seeded = box.add_portal("deploy.bitrix24.test", handlers=[*LIVE, {"event": "ONCRMLEADADD", "handler": NEW}])
    engine = make_engine(box)
    started = time.time()

    held = sweep(engine, seeded)

    assert held.outcome is Outcome.CLEAN and held.unbound == 0
    (pair,) = held.held
    assert (pair["handler"], pair["reason"]) == (NEW, "first_seen_within_grace")
    recorded = ledger(box)
    assert list(recorded) == [ledger_key("ONCRMLEADADD", NEW)]
    assert started - 1 <= recorded[ledger_key("ONCRMLEADADD", NEW)] <= time.time()
    written = version(box, "orphans")

    # The same night again: still held, and the ledger is not written a second time.
    assert sweep(engine, seeded).unbound == 0
    assert version(box, "orphans") == written

    # Three nights later (the ledger as that night's worker finds it): released.
    put_ledger(box, {ledger_key("ONCRMLEADADD", NEW): int(time.time() - 3 * DAY)})
    released = sweep(engine, seeded)
    assert released.outcome is Outcome.CLEANED and released.unbound == 1
    assert ("ONCRMLEADADD", NEW) not in rows(box, seeded)


# ------------------------------------------------------------------------------------ failure paths


@pytest.mark.parametrize("content", ["not json", '{"orphans": []}', None])
def test_a_ledger_that_cannot_be_read_holds_everything_and_is_replaced(box: Sandbox, content: str | None) -> None:
    seeded = box.add_portal("stale.bitrix24.test", handlers=[*LIVE, {"event": "ONCRMDEALADD", "handler": OLD}])
    if content is not None:
        put_ledger(box, content)

    result = sweep(make_engine(box), seeded)

    assert result.outcome is Outcome.CLEAN and result.unbound == 0
    assert [p["reason"] for p in result.held] == ["first_seen_within_grace"]
    assert ("ONCRMDEALADD", OLD) in rows(box, seeded)
    assert list(ledger(box)) == [ledger_key("ONCRMDEALADD", OLD)]  # a fresh ledger: first seen now


def test_grace_zero_unbinds_at_once_but_near_misses_stay_held(box: Sandbox, api_calls: ApiCalls) -> None:
    box.put_declared([*DECLARED, {"event": "ONCRMDEALADD", "handler": APP}])
    seeded = box.add_portal(
        "eager.bitrix24.test",
        handlers=[*LIVE, {"event": "ONCRMDEALADD", "handler": APP + "/"}, {"event": "ONCRMLEADADD", "handler": OLD}],
    )
    api_calls.watch(box.store.client)

    result = sweep(make_engine(box, grace=0), seeded)

    assert result.outcome is Outcome.CLEANED and result.unbound == 1
    assert [(p["handler"], p["reason"]) for p in result.held] == [(APP + "/", "near_miss")]
    assert "ssm.GetParameterHistory" not in api_calls  # grace off: neither history nor ledger read
    assert ("ONCRMDEALADD", APP + "/") in rows(box, seeded)


def test_a_dry_run_holds_the_same_and_writes_no_ledger(box: Sandbox) -> None:
    seeded = box.add_portal("dry.bitrix24.test", handlers=[*LIVE, {"event": "ONCRMLEADADD", "handler": NEW}])
    result = sweep(make_engine(box, dry_run=True), seeded)
    assert result.unbound == 0 and [p["handler"] for p in result.held] == [NEW]
    assert "orphans" not in {name.rsplit("/", 1)[-1] for name in _names(box)}


def test_uninstall_jobs_read_no_orphan_records(box: Sandbox, api_calls: ApiCalls) -> None:
    seeded = box.add_portal("leaving.bitrix24.test", handlers=LIVE)
    box.emulator.uninstall(seeded.portal, box.app)
    api_calls.watch(box.store.client)
    job = Job(Action.UNINSTALL, seeded.member_id, application_token=seeded.installation.application_token, ts="1")
    make_engine(box).run(job)
    assert "ssm.GetParameterHistory" not in api_calls
    assert f"{box.prefix}/app/orphans" not in _names(box)


def _names(box: Sandbox) -> set[str]:
    pages = box.store.client.get_paginator("describe_parameters").paginate()
    return {p["Name"] for page in pages for p in page["Parameters"]}


# ------------------------------------------------------------------------------------ the worker


@pytest.fixture
def worker_box(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    for key, value in box.env(B24_ORPHAN_GRACE_DAYS="2").items():
        monkeypatch.setenv(key, value)
    runtime.reset()
    runtime.engine().options = FAST
    yield box
    runtime.reset()


def sqs_records(member_ids: list[str]) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"m{i}",
                "receiptHandle": f"r{i}",
                "body": json.dumps({"action": "sweep", "member_id": m}),
                "attributes": {"MessageGroupId": m},
                "messageAttributes": {},
                "eventSource": "aws:sqs",
            }
            for i, m in enumerate(member_ids)
        ]
    }


def test_worker_reports_held_rows_and_reads_history_and_ledger_once_per_invocation(
    worker_box: Sandbox, stdout: Stdout, api_calls: ApiCalls, lambda_context: Any
) -> None:
    box = worker_box
    typo = [{"event": "ONCRMLEADADD", "handler": APP + "/"}, {"event": "ONAPPUNINSTALL", "handler": UNINSTALL}]
    box.put_declared(typo)
    portals = [box.add_portal(f"p{i}.bitrix24.test", handlers=LIVE) for i in range(10)]
    api_calls.watch(*runtime.engine().store.clients())  # the worker's own SSM clients, reads and writes

    answer = worker.process(sqs_records([p.member_id for p in portals]), lambda_context)

    assert answer == {"batchItemFailures": []}
    assert stdout.metric_values()["HandlersHeld"] == 20  # 2 rows x 10 portals
    assert stdout.metric_values().get("HandlersUnbound", 0) == 0
    held_lines = [line for line in stdout.logs() if "held, not unbound" in str(line.get("message"))]
    assert len(held_lines) == 10
    message = held_lines[0]["message"]
    assert f"ONCRMLEADADD {APP} x2" in message and "near miss of the declared" in message
    assert "held until the declared set changes" in message
    assert all(len(p.portal.handlers(box.app)) == 3 for p in portals)
    # The rules' SSM cost: one history read and one ledger read for the whole batch of 10, plus
    # one read-modify-write of the ledger for the keys first seen tonight (once, not per portal).
    assert api_calls.count("ssm.GetParameterHistory") == 1
    assert api_calls.count("ssm.PutParameter") == 1
    assert api_calls.count("ssm.GetParameter") == 10 + 1 + 2  # records, declared set, ledger + its re-read

    # The next invocation, nothing new: one history read and one ledger read, no write.
    api_calls.clear()
    worker.process(sqs_records([p.member_id for p in portals]), lambda_context)
    assert api_calls.count("ssm.GetParameterHistory") == 1
    assert api_calls.count("ssm.GetParameter") == 10 + 1 + 1
    assert "ssm.PutParameter" not in api_calls


def test_worker_without_orphans_pays_nothing_for_the_rules(
    worker_box: Sandbox, api_calls: ApiCalls, lambda_context: Any
) -> None:
    portals = [worker_box.add_portal(f"c{i}.bitrix24.test", handlers=LIVE) for i in range(3)]
    api_calls.watch(runtime.engine().store.client)
    worker.process(sqs_records([p.member_id for p in portals]), lambda_context)
    assert "ssm.GetParameterHistory" not in api_calls
    assert api_calls.count("ssm.GetParameter") == 3 + 1
