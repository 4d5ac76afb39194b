"""The worker handler in-process: sample events, FIFO partial failures, concurrency, EMF (design §5, §6)."""

from __future__ import annotations

import copy
import itertools
import json
from typing import Any

import pytest
from fixtures.aws import APPLICATION_TOKEN, MEMBER_ID, load_event
from fixtures.sandbox import APP_URL, FAST, OLD_URL

from b24_cleanup import runtime
from b24_cleanup.handlers import worker
from b24_cleanup.ops.sandbox import Sandbox, collect_results


@pytest.fixture(autouse=True)
def _fast_worker_engine(handler_env: Sandbox) -> None:
    """The handlers' own engine (built from the box's environment), with the suite's quick backoff."""
    engine = runtime.engine()
    engine.options = FAST
    engine.buckets = type(engine.buckets)(FAST.rate, FAST.burst)


def record(body: dict[str, Any], message_id: str, group: str, template: dict[str, Any]) -> dict[str, Any]:
    rec = copy.deepcopy(template)
    rec["messageId"] = message_id
    rec["body"] = json.dumps(body)
    rec["attributes"]["MessageGroupId"] = group
    return rec


def emf_blobs(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]


def test_sample_events_run_through_the_worker(box: Sandbox, lambda_context: Any, capsys: Any) -> None:
    box.add_portal(
        "sample.bitrix24.test",
        member_id=MEMBER_ID,
        extra={"application_token": APPLICATION_TOKEN},
        handlers=[{"event": "ONCRMLEADADD", "handler": APP_URL}, {"event": "ONCRMLEADADD", "handler": OLD_URL}],
    )

    swept = worker.lambda_handler(load_event("worker_sweep.json"), lambda_context)
    removed = worker.lambda_handler(load_event("worker_uninstall.json"), lambda_context)

    assert swept == removed == {"batchItemFailures": []}
    # The tokens still work, so the uninstall is unconfirmed: it unbinds nothing, keeps the record.
    assert box.record(MEMBER_ID) is not None
    blobs = emf_blobs(capsys.readouterr().out)
    by_action = {b["action"]: b for b in blobs}
    assert set(by_action) == {"sweep", "uninstall"}
    assert by_action["sweep"]["PortalsCleaned"] == [1.0] and by_action["sweep"]["HandlersUnbound"] == [1.0]
    assert by_action["uninstall"]["PortalsSkipped"] == [1.0] and by_action["uninstall"]["UninstallUnconfirmed"] == [1.0]
    assert "HandlersUnbound" not in by_action["uninstall"]
    for blob in blobs:
        assert blob["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "B24Cleanup"
        assert blob["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["action"]]
        assert MEMBER_ID not in json.dumps(blob)


def test_mixed_batch_reports_only_failed_records_and_keeps_group_order(
    box: Sandbox, lambda_context: Any, capsys: Any
) -> None:
    template = load_event("worker_sweep.json")["Records"][0]
    ok = box.add_portal("ok.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": OLD_URL}])
    down = box.add_portal("down.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": OLD_URL}])
    stale = box.add_portal("stale.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": OLD_URL}])
    down.portal.fail_next(10, "INTERNAL_SERVER_ERROR")
    records = [
        record({"action": "sweep", "member_id": ok.member_id}, "m-ok", ok.member_id, template),
        record({"action": "sweep", "member_id": down.member_id}, "m-down-1", down.member_id, template),
        record(
            {"action": "uninstall", "member_id": stale.member_id, "application_token": "old", "clean": True, "ts": "1"},
            "m-stale",
            stale.member_id,
            template,
        ),
        record(
            {
                "action": "uninstall",
                "member_id": down.member_id,
                "application_token": down.installation.application_token,
                "clean": True,
                "ts": "2",
            },
            "m-down-2",
            down.member_id,
            template,
        ),
        record({"action": "explode"}, "m-bad", "some-group", template),
    ]

    with collect_results() as results:
        answer = worker.lambda_handler({"Records": records}, lambda_context)

    assert answer == {"batchItemFailures": [{"itemIdentifier": i} for i in ("m-down-1", "m-down-2", "m-bad")]}
    outcomes = {(j["member_id"], j["action"]): j["outcome"] for j in results.jobs}
    assert outcomes == {
        (ok.member_id, "sweep"): "cleaned",
        (down.member_id, "sweep"): "failed",
        (stale.member_id, "uninstall"): "skipped",
    }  # the second job of the failed portal was handed back unprocessed
    assert box.record(down.member_id) is not None
    assert len(down.portal.handlers(box.app)) == 1
    sums: dict[tuple[str, str], float] = {}
    for blob in emf_blobs(capsys.readouterr().out):
        for metric in blob["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
            sums[(blob["action"], metric["Name"])] = sum(blob[metric["Name"]])
    assert sums[("sweep", "PortalsProcessed")] == 2
    assert sums[("sweep", "PortalsCleaned")] == 1 and sums[("sweep", "PortalsFailed")] == 1
    assert sums[("uninstall", "PortalsProcessed")] == 1 and sums[("uninstall", "PortalsSkipped")] == 1
    assert ("uninstall", "PortalsFailed") not in sums  # m-down-2 reached no outcome


def test_portals_of_one_batch_run_concurrently(box: Sandbox, lambda_context: Any) -> None:
    template = load_event("worker_sweep.json")["Records"][0]
    box.emulator.latency = 0.2
    seeded = [box.add_portal(f"c{i}.bitrix24.test") for i in range(5)]
    records = [
        record({"action": "sweep", "member_id": s.member_id}, f"m{i}", s.member_id, template)
        for i, s in enumerate(seeded)
    ]

    assert worker.lambda_handler({"Records": records}, lambda_context) == {"batchItemFailures": []}

    spans = sorted((e.ts, e.ts + e.duration) for e in box.emulator.requests_log(kind="rest"))
    assert len(spans) == 5
    overlapping = sum(1 for (_, end), (start, _) in itertools.pairwise(spans) if start < end)
    assert overlapping >= 1, spans


def test_empty_batch_does_nothing(box: Sandbox, lambda_context: Any, capsys: Any) -> None:
    assert worker.lambda_handler({"Records": []}, lambda_context) == {"batchItemFailures": []}
    assert emf_blobs(capsys.readouterr().out) == []


def test_bad_job_body_fails_its_record_with_a_clear_log_line(box: Sandbox, lambda_context: Any, capsys: Any) -> None:
    event = load_event("worker_uninstall.json")
    event["Records"][0]["body"] = "{not json"
    answer = worker.lambda_handler(event, lambda_context)
    assert answer == {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}
    logs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"level"')]
    assert any(
        line["message"].startswith("bad job body") and line.get("reason") == "job body is not JSON" for line in logs
    )


def test_a_job_near_the_invocation_timeout_fails_cleanly_instead_of_starting(box: Sandbox, lambda_context: Any) -> None:
    seeded = box.add_portal("late.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": OLD_URL}])
    template = load_event("worker_sweep.json")["Records"][0]
    lambda_context.get_remaining_time_in_millis = lambda: 20_000  # under the deadline margin

    with collect_results() as results:
        answer = worker.lambda_handler(
            {"Records": [record({"action": "sweep", "member_id": seeded.member_id}, "m1", seeded.member_id, template)]},
            lambda_context,
        )

    assert answer == {"batchItemFailures": [{"itemIdentifier": "m1"}]}
    assert [(j["outcome"], j["reason"]) for j in results.jobs] == [
        ("failed", "event.get: OUT_OF_TIME: the invocation is about to time out")
    ]
    assert box.emulator.requests_log(member_id=seeded.member_id) == []


def test_a_declared_set_changed_between_invocations_applies_to_the_next_batch(
    box: Sandbox, lambda_context: Any
) -> None:
    template = load_event("worker_sweep.json")["Records"][0]
    seeded = box.add_portal("cfg.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": OLD_URL}])
    event = {"Records": [record({"action": "sweep", "member_id": seeded.member_id}, "m1", seeded.member_id, template)]}

    box.put_declared('{"handlers": []}')  # broken: nothing may be unbound
    with collect_results() as first:
        worker.lambda_handler(event, lambda_context)
    box.put_declared([{"event": "ONCRMLEADADD", "handler": APP_URL}])  # mended
    with collect_results() as second:
        worker.lambda_handler(event, lambda_context)

    assert [j["outcome"] for j in first.jobs] == ["skipped"]
    assert [j["outcome"] for j in second.jobs] == ["cleaned"]
    assert seeded.portal.handlers(box.app) == []


def test_the_worker_reads_its_settings_once_per_process_and_again_after_a_reset(
    box: Sandbox, lambda_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Lambda the environment never changes; a process that drives the handler with other
    settings (a harness, the demo) resets the runtime and gets an engine built for the new ones."""
    template = load_event("worker_sweep.json")["Records"][0]
    seeded = box.add_portal("env.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": OLD_URL}])
    event = {"Records": [record({"action": "sweep", "member_id": seeded.member_id}, "m1", seeded.member_id, template)]}

    monkeypatch.setenv("B24_DRY_RUN", "true")
    runtime.reset()
    with collect_results() as dry:
        worker.lambda_handler(event, lambda_context)
    monkeypatch.setenv("B24_DRY_RUN", "false")
    with collect_results() as still_dry:  # no reset: the process keeps what it read
        worker.lambda_handler(event, lambda_context)
    runtime.reset()
    with collect_results() as real:
        worker.lambda_handler(event, lambda_context)

    assert [(j["outcome"], j["dry_run"]) for j in dry.jobs] == [("cleaned", True)]
    assert [(j["outcome"], j["dry_run"]) for j in still_dry.jobs] == [("cleaned", True)]
    assert [(j["outcome"], j["dry_run"]) for j in real.jobs] == [("cleaned", False)]
    assert seeded.portal.handlers(box.app) == []
