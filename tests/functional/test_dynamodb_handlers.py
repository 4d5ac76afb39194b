"""B24_STORE=dynamodb through the real handlers: scheduler Scan → queue → worker, records in the table."""

from __future__ import annotations

from typing import Any

import boto3
import pytest

from b24_cleanup import runtime
from b24_cleanup.handlers import scheduler, worker
from b24_cleanup.ops.sandbox import REGION, drain, sandbox

APP_URL = "https://app.example.com/b24/events"
OLD_URL = "https://old.example.com/b24/events"


def test_a_sweep_with_the_table_store_cleans_and_refreshes(
    monkeypatch: pytest.MonkeyPatch, lambda_context: Any
) -> None:
    with sandbox(declared=[{"event": "ONCRMLEADADD", "handler": APP_URL}], store="dynamodb") as box:
        for key, value in box.env().items():
            monkeypatch.setenv(key, value)
        runtime.reset()  # the process state follows this sandbox's environment
        rows = [{"event": "ONCRMLEADADD", "handler": APP_URL}, {"event": "ONCRMLEADADD", "handler": OLD_URL}]
        fresh = box.add_portal("fresh.bitrix24.test", handlers=rows)
        expired = box.add_portal("expired.bitrix24.test", handlers=rows, expired=True)
        before = box.record(expired.member_id).refresh_token

        answer = scheduler.lambda_handler({"scheduled_time": "2026-12-01T02:00:00Z"}, lambda_context)
        sqs = boto3.client("sqs", region_name=REGION)
        drain(sqs, box.queue_url, worker.lambda_handler, lambda_context)

        assert answer["enqueued"] == 2  # listed by a Scan of the table
        for seeded in (fresh, expired):
            owned = {(h["event"], h["handler"]) for h in seeded.portal.handlers(box.app)}
            assert owned == {("ONCRMLEADADD", APP_URL)}, seeded.portal.domain
        record = box.record(expired.member_id)
        assert record.refresh_token != before  # refreshed and stored in the table
        assert box.store.read(expired.member_id)[1] == 2  # type: ignore[attr-defined]
        ssm_records = box.store.client.get_parameters_by_path(Path=f"{box.prefix}/portals", Recursive=True)
        assert ssm_records["Parameters"] == []
    runtime.reset()
