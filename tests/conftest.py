"""Shared fixtures: a fake AWS account (moto), a fake Lambda context, and stdout parsing for EMF.

Kept generic: per-handler fixtures (e.g. resetting a handler's cached clients) live in the test
modules. moto is imported before any boto3 client exists, and every client is created inside
the mock.
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws as moto_mock_aws

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"

REGION = "us-east-1"
PREFIX = "/b24-cleanup/test"
QUEUE_NAME = "b24-cleanup-jobs.fifo"

# The portal of the sample events in events/.
MEMBER_ID = "a223c6b3710f85df22e9377d6c4f7553"
APPLICATION_TOKEN = "51856fefc120afa4b628cc82d3935cce"
DECLARED_SET = {
    "handlers": [
        {"event": "ONAPPUNINSTALL", "handler": "https://app.example.com/b24/uninstall"},
        {"event": "ONCRMLEADADD", "handler": "https://app.example.com/b24/events"},
    ]
}


def load_event(name: str) -> dict[str, Any]:
    """A sample event from events/ (a fresh copy: tests may modify it)."""
    return json.loads((EVENTS / name).read_text())


@pytest.fixture(autouse=True)
def _aws_test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and a fixed region; nothing from the developer's shell leaks in."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SSM", "AWS_ENDPOINT_URL_SQS"):
        monkeypatch.delenv(name, raising=False)
    for name in ("B24_ACCEPT_INSTALL", "B24_DRY_RUN", "B24_OAUTH_URL", "B24_REVOKED_GRACE_DAYS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "b24-cleanup")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "B24Cleanup")
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "1")
    monkeypatch.setenv("POWERTOOLS_LOG_DEDUPLICATION_DISABLED", "1")


class _CurrentStdout:
    """A stream that writes to the current sys.stdout."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@pytest.fixture(autouse=True)
def _reset_powertools(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fresh metrics and parameter caches per test; logs go to the stdout that capsys sees."""
    from aws_lambda_powertools.metrics.provider import cold_start
    from aws_lambda_powertools.utilities import parameters

    from b24_cleanup.handlers.observability import logger, metrics

    def reset() -> None:
        metrics.clear_metrics()
        metrics.clear_default_dimensions()
        cold_start.is_cold_start = True
        parameters.clear_caches()

    reset()
    # The Logger bound its handler to the sys.stdout of import time; make it follow whatever
    # sys.stdout is when it writes (capsys swaps it in after autouse fixtures ran).
    for handler in logger.handlers:
        if hasattr(handler, "stream"):
            monkeypatch.setattr(handler, "stream", _CurrentStdout())
    yield
    reset()


@dataclass
class FakeLambdaContext:
    function_name: str = "b24-cleanup-test"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:123456789012:function:b24-cleanup-test"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = "/aws/lambda/b24-cleanup-test"
    log_stream_name: str = "2026/11/25/[$LATEST]0123456789abcdef"

    def get_remaining_time_in_millis(self) -> int:
        return 120_000  # the worker's timeout in template.yaml


@pytest.fixture
def lambda_context() -> FakeLambdaContext:
    return FakeLambdaContext()


class Stdout:
    """Everything the code under test printed: EMF blobs and structured log lines."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self.text = ""

    def read(self) -> str:
        self.text += self._capsys.readouterr().out
        return self.text

    def _json_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.read().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
        return lines

    def emf(self) -> list[dict[str, Any]]:
        """The EMF blobs (one JSON object per flush)."""
        return [item for item in self._json_lines() if "_aws" in item]

    def logs(self) -> list[dict[str, Any]]:
        """The structured log lines (everything JSON that is not EMF)."""
        return [item for item in self._json_lines() if "_aws" not in item]

    def metric_values(self) -> dict[str, float]:
        """Sum of every metric over all blobs, by name."""
        totals: dict[str, float] = {}
        for blob in self.emf():
            for directive in blob["_aws"]["CloudWatchMetrics"]:
                for metric in directive["Metrics"]:
                    value = blob[metric["Name"]]
                    values = value if isinstance(value, list) else [value]
                    totals[metric["Name"]] = totals.get(metric["Name"], 0) + sum(values)
        return totals


@pytest.fixture
def stdout(capsys: pytest.CaptureFixture[str]) -> Stdout:
    return Stdout(capsys)


@pytest.fixture
def emf(stdout: Stdout) -> Callable[[], list[dict[str, Any]]]:
    """`emf()` → the EMF blobs printed so far in this test."""
    return stdout.emf


@dataclass
class AwsAccount:
    """The moto account of one test: SSM parameters under PREFIX and the FIFO job queue."""

    prefix: str
    queue_url: str
    ssm: Any
    sqs: Any

    def portal_name(self, member_id: str) -> str:
        return f"{self.prefix}/portals/{member_id}"

    def put_portal(self, member_id: str, application_token: str, **extra: Any) -> dict[str, Any]:
        record = {
            "member_id": member_id,
            "domain": "example.bitrix24.com",
            "client_endpoint": "https://example.bitrix24.com/rest/",
            "server_endpoint": "https://oauth.bitrix.info/rest/",
            "access_token": "access-" + member_id,
            "refresh_token": "refresh-" + member_id,
            "expires": 1795172400,
            "application_token": application_token,
            "scope": "crm",
            **extra,
        }
        self.ssm.put_parameter(
            Name=self.portal_name(member_id), Value=json.dumps(record), Type="SecureString", Overwrite=True
        )
        return record

    def put_declared(self, text: str | None) -> None:
        """Replace the declared set (None deletes the parameter)."""
        name = f"{self.prefix}/app/handlers"
        if text is None:
            with contextlib.suppress(self.ssm.exceptions.ParameterNotFound):
                self.ssm.delete_parameter(Name=name)
            return
        self.ssm.put_parameter(Name=name, Value=text, Type="String", Overwrite=True)

    def param_versions(self) -> dict[str, int]:
        """Every parameter under the prefix with its version: equal before and after = no write."""
        versions: dict[str, int] = {}
        for page in self.ssm.get_paginator("get_parameters_by_path").paginate(
            Path=self.prefix, Recursive=True, WithDecryption=False
        ):
            for param in page["Parameters"]:
                versions[param["Name"]] = param["Version"]
        return versions

    def queue_depth(self) -> int:
        """Messages in the queue, visible or in flight."""
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def receive_all(self) -> list[dict[str, Any]]:
        """Receive every visible message once (left in flight, not deleted, so FIFO dedup still sees them)."""
        received: list[dict[str, Any]] = []
        while True:
            answer = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=600,
                MessageSystemAttributeNames=["All"],
            )
            messages = answer.get("Messages", [])
            if not messages:
                return received
            received.extend(messages)


@pytest.fixture
def mock_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[AwsAccount]:
    """A moto account with the app's parameters, one portal (the sample events') and the FIFO queue.

    Sets B24_SSM_PREFIX and B24_QUEUE_URL for the handlers.
    """
    with moto_mock_aws():
        ssm = boto3.client("ssm", region_name=REGION)
        sqs = boto3.client("sqs", region_name=REGION)
        queue_url = sqs.create_queue(
            QueueName=QUEUE_NAME,
            Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "false", "VisibilityTimeout": "60"},
        )["QueueUrl"]
        account = AwsAccount(prefix=PREFIX, queue_url=queue_url, ssm=ssm, sqs=sqs)
        ssm.put_parameter(
            Name=f"{PREFIX}/app/credentials",
            Value=json.dumps({"client_id": "app.test", "client_secret": "client-secret-test"}),
            Type="SecureString",
        )
        account.put_declared(json.dumps(DECLARED_SET))
        account.put_portal(MEMBER_ID, APPLICATION_TOKEN)
        monkeypatch.setenv("B24_SSM_PREFIX", PREFIX)
        monkeypatch.setenv("B24_QUEUE_URL", queue_url)
        yield account


class ApiCalls(list):
    """Operation names (`ssm.GetParameter`, `sqs.SendMessage`) seen on watched boto3 clients."""

    def watch(self, *clients: Any) -> ApiCalls:
        for client in clients:
            client.meta.events.register("before-call.*.*", self._record, unique_id=f"api-calls-{id(self)}")
        return self

    def _record(self, model: Any, **_: Any) -> None:
        self.append(f"{model.service_model.service_name}.{model.name}")


@pytest.fixture
def api_calls() -> ApiCalls:
    """`api_calls.watch(client, ...)`, then assert on the list of operation names."""
    return ApiCalls()
