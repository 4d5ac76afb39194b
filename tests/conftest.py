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


@pytest.fixture(autouse=True)
def _fresh_runtime(_aws_test_env: None) -> Iterator[None]:
    """Settings, clients, engine and chain state are read once per process: each test starts afresh."""
    from b24_cleanup import runtime

    runtime.reset()
    yield
    runtime.reset()


class _CurrentStdout:
    """A stream that writes to the current sys.stdout."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@pytest.fixture(autouse=True)
def _reset_powertools(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fresh metrics per test; logs go to the stdout that capsys sees."""
    from aws_lambda_powertools.metrics.provider import cold_start

    from b24_cleanup.handlers.observability import logger, metrics

    def reset() -> None:
        metrics.clear_metrics()
        metrics.clear_default_dimensions()
        cold_start.is_cold_start = True

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


# ---------------------------------------------------------------------------------------------
# Session-wide leak guard (SPEC §7): no token, refresh token, client secret or application token that
# any emulator of this session issued may appear in a log record (root and the project's loggers:
# message, extras and traceback), in a test's captured output, or in a failed test's report. Every
# emulator registers itself (a small wrap of State.__init__); each test's records and reports are
# scanned as the test ends, so memory stays flat; a leak fails the session and names the test.
# ---------------------------------------------------------------------------------------------

import functools  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys as _sys  # noqa: E402
import threading  # noqa: E402
import weakref  # noqa: E402

_SECRET_RUN = re.compile(r"[A-Za-z0-9]{16,}")
_STANDARD_RECORD_KEYS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def find_secrets(text: str, secrets: set[str] | frozenset[str]) -> set[str]:
    """The members of `secrets` that occur in `text`, in one pass over the text.

    Emulator secrets are long runs of letters and digits (hex tokens, 50-character client secrets), so
    each maximal alphanumeric run of the text is checked against them by length; any other secret of
    8 characters or more is searched for directly.
    """
    plain = {s for s in secrets if len(s) >= 16 and s.isascii() and s.isalnum()}
    found = {s for s in secrets if len(s) >= 8 and s not in plain and s in text}
    if not plain:
        return found
    lengths = sorted({len(s) for s in plain})
    for match in _SECRET_RUN.finditer(text):
        run = match.group()
        for size in lengths:
            if size > len(run):
                break
            for start in range(len(run) - size + 1):
                if run[start : start + size] in plain:
                    found.add(run[start : start + size])
    return found


def _issued(parts: tuple[Any, ...]) -> set[str]:
    """What a State held when it died (its token tables, apps and application tokens)."""
    access, refresh, apps, application_tokens = parts
    return set(access) | set(refresh) | {app.client_secret for app in apps.values()} | set(application_tokens)


class _LeakGuard(logging.Handler):
    """Keeps the formatted records of the running test and every secret the session's emulators issued."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.texts: list[str] = []
        self.tracked: list[tuple[Any, tuple[Any, ...] | None]] = []
        self.harvested: set[str] = set()
        self.findings: list[tuple[str, str, str]] = []  # (where, what, masked secret)
        self._last: logging.LogRecord | None = None
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        # Powertools adds a filter to every root handler that drops its own records on their way up
        # (log deduplication); the guard must see them all.
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if record is self._last:  # the same record again, on its way up to the root logger
            return
        self._last = record
        try:
            text = self.format(record)
        except Exception:
            text = f"{record.msg!r} {record.args!r}"
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_RECORD_KEYS}
        if extras:
            text += " " + repr(extras)
        with self._lock:
            self.texts.append(text)

    def track(self, state: Any) -> None:
        # The tables, not the State: a dead emulator's log and servers are freed, its secrets kept.
        try:
            parts: tuple[Any, ...] | None = (state._access, state._refresh, state.apps, state._application_tokens)
            ref: Any = weakref.ref(state)
        except AttributeError:  # the emulator changed shape: hold it, and ask it through secrets()
            parts, ref = None, (lambda: state)
        with self._lock:
            self.tracked.append((ref, parts))

    def secrets(self) -> set[str]:
        """Every secret issued so far (live emulators through their public `secrets()`)."""
        with self._lock:
            tracked, self.tracked = self.tracked, []
        keep = []
        for ref, parts in tracked:
            state = ref()
            self.harvested |= state.secrets() if state is not None else _issued(parts or ((), (), {}, ()))
            if state is not None:
                keep.append((ref, parts))
        with self._lock:
            self.tracked = keep + self.tracked
        return set(self.harvested)

    def scan(self, where: str, what: str, texts: list[str], secrets: set[str]) -> None:
        if not texts or not secrets:
            return
        for secret in sorted(find_secrets("\n".join(texts), secrets)):
            self.findings.append((where, what, f"{secret[:4]}... ({len(secret)} chars)"))

    def take_texts(self) -> list[str]:
        with self._lock:
            texts, self.texts = self.texts, []
        return texts


_LEAK_GUARD = _LeakGuard()
# The root logger sees what propagates (the Powertools logger `b24-cleanup` included); `b24_cleanup` does
# not propagate. The guard stays off the Powertools logger itself: code that re-points that logger's
# stream handlers (the demo, the benchmarks) walks its handler list.
_GUARDED_LOGGERS = ("", "b24_cleanup")


def emulator_secrets() -> set[str]:
    """Every token, client secret and application token issued by any emulator of this session so far."""
    return _LEAK_GUARD.secrets()


def _register_emulators() -> None:
    from b24_cleanup.ops.emulator import state as emulator_state

    original = emulator_state.State.__init__
    if getattr(original, "_leak_guard", False):
        return

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _LEAK_GUARD.track(self)

    init._leak_guard = True  # type: ignore[attr-defined]
    emulator_state.State.__init__ = init  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    _register_emulators()
    for name in _GUARDED_LOGGERS:
        logging.getLogger(name).addHandler(_LEAK_GUARD)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    texts = [content for _, content in report.sections]
    if report.failed:
        texts.append(report.longreprtext)
    _LEAK_GUARD.scan(report.nodeid, f"{report.when}: report and captured output", texts, _LEAK_GUARD.secrets())


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _LEAK_GUARD.scan(nodeid, "log records", _LEAK_GUARD.take_texts(), _LEAK_GUARD.secrets())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    guard = _LEAK_GUARD
    guard.scan("(outside tests)", "log records", guard.take_texts(), guard.secrets())
    for name in _GUARDED_LOGGERS:
        logging.getLogger(name).removeHandler(guard)
    if guard.findings:
        lines = [f"LEAK GUARD: secrets issued by the emulator appeared {len(guard.findings)} time(s) (SPEC §7):"]
        lines += [f"  {where}: {what}: {masked}" for where, what, masked in guard.findings]
        print("\n" + "\n".join(lines), file=_sys.stderr)
        session.exitstatus = 1
