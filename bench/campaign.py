"""Fault-injection campaign (issue 6): many portals, a fifth of all REST requests failing, AWS faults.

    .venv/bin/python -m bench.campaign [--portals 200] [--fault-rate 0.2] [--seed 7] [--aws-fault-rate 0.05]

Everything runs on loopback: the project's Bitrix24 emulator and moto in-process (the sandbox), with
the real Lambda handlers. Portals get mixed handler sets (declared, orphans under several auth
types, offline rows, a 60-orphan portal, expired and silently expired tokens, revoked portals,
licence-locked rows, genuine uninstall events, forged ones with a wrong token and forged ones
carrying the portal's genuine, leaked application_token while the app is installed, and a few
portals that fail every attempt). Then the emulator fails a random `--fault-rate` of REST requests (500, 503
QUERY_LIMIT_EXCEEDED, 429 OPERATION_TIME_LIMIT, 503 OVERLOAD_LIMIT, dropped connections) and
botocore hooks fail `--aws-fault-rate` of the SSM and SQS calls the handlers make (throttling, 5xx,
reset connections, and replies lost after the call took effect). Scheduler → queue → worker runs
through `drain`, with redelivery of failed records and moto's dead-letter queue after 5 receives.

At the end it checks design §7 against the emulator's and moto's state, one checker per rule (CHECKS,
each a function registered with @check; a new rule is one more function):
- every portal job ended with the outcome its portal was built for, or is in the DLQ (none dropped);
- no declared handler was unbound; no portal reported cleaned/clean still holds an orphan;
- every stored refresh token still works at the emulator (refreshed once, at the very end);
- no forged uninstall carrying a leaked application_token wiped its live portal (record, declared rows);
- then (run_throttled_sweep) a sweep of portals whose tokens are all due while SSM throttles writes at
  its quota: no rotated pair lost, no worker invocation past its timeout;
- the EMF metrics add up: PortalsProcessed = the outcome counters + the `clean` jobs;
- no token, refresh token, client secret or application token appears in anything printed.
It prints what happened and exits 1 when an invariant is broken.

The test suite runs the same code on fewer portals (tests/resilience/test_reliability.py): one implementation.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlencode

from botocore.awsrequest import AWSResponse
from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

from b24_cleanup.engine import Engine, EngineOptions
from b24_cleanup.oauth import OAuthClient
from b24_cleanup.ops.emulator import CHAOS_FAULTS, Portal, payloads
from b24_cleanup.ops.functionurl import FakeContext, function_url_event
from b24_cleanup.ops.sandbox import Sandbox, collect_results, drain, patched_environ, sandbox
from b24_cleanup.pacing import Backoff
from b24_cleanup.record import PortalRecord
from b24_cleanup.store import PortalStore

APP = "https://app.example.com/b24"
OLD = "https://app-v1.example.com/b24/events"  # a deployment retired long ago
UNINSTALL_URL = f"{APP}/uninstall"
DECLARED = [
    {"event": "ONCRMLEADADD", "handler": f"{APP}/events"},
    {"event": "ONCRMDEALUPDATE", "handler": f"{APP}/events"},
    {"event": "ONCRMDEALADD", "event_type": "offline"},
    {"event": "ONAPPUNINSTALL", "handler": UNINSTALL_URL},
]
_DECLARED_ONLINE = {(d["event"], d["handler"]) for d in DECLARED if "handler" in d}
_DECLARED_OFFLINE = {d["event"] for d in DECLARED if d.get("event_type") == "offline"}

OUTCOME_COUNTERS = {
    "cleaned": "PortalsCleaned",
    "revoked": "PortalsRevoked",
    "skipped": "PortalsSkipped",
    "incomplete": "PortalsIncomplete",
    "failed": "PortalsFailed",
}
RECORD_KEYS = (
    "member_id",
    "domain",
    "client_endpoint",
    "server_endpoint",
    "access_token",
    "refresh_token",
    "expires",
    "application_token",
)
DLQ = "dlq"
MAX_RECEIVES = 5  # the sandbox queue's maxReceiveCount, as in template.yaml

# Portal kinds: share of the portals, minimum count, and what each job must end as.
#   tidy          only declared handlers                                   sweep: clean
#   orphans       declared + a random mix of orphans (stale URL under up to 3 auth types, an event the
#                 app dropped, a second ONAPPUNINSTALL URL, offline queues)  sweep: cleaned
#   many          60 orphan URLs: two `batch` calls                         sweep: cleaned
#   expired       orphans, record expired: the first call refreshes         sweep: cleaned
#   stale_access  record not due, but the portal says expired_token         sweep: cleaned
#   revoked       app uninstalled, its event lost                           sweep: revoked (record marked)
#   revoked_due   the same with an expired record: OAuth says invalid_grant sweep: revoked
#   locked        an offline orphan under a connector the plan forbids      sweep: incomplete
#   uninstalled   genuine ONAPPUNINSTALL (tokens revoked)                   uninstall: revoked, sweep: skipped
#   leaked        ONAPPUNINSTALL forged with the portal's genuine (leaked)  uninstall: skipped (unconfirmed),
#                 application_token while the app is installed              sweep: cleaned
#   doomed        every unbind command fails (transient)                    sweep: in the DLQ
#   doomed_get    every event.get fails (transient)                         sweep: in the DLQ
KINDS: tuple[tuple[str, float, int], ...] = (
    ("orphans", 0.0, 0),  # the remainder
    ("tidy", 0.18, 2),
    ("many", 0.03, 1),
    ("expired", 0.14, 2),
    ("stale_access", 0.07, 1),
    ("revoked", 0.05, 1),
    ("revoked_due", 0.025, 1),
    ("locked", 0.02, 1),
    ("uninstalled", 0.03, 1),
    ("leaked", 0.03, 2),
    ("doomed", 0.01, 1),
    ("doomed_get", 0.01, 1),
)
EXPECT: dict[str, dict[str, frozenset[str]]] = {
    "orphans": {"sweep": frozenset({"cleaned"})},
    "tidy": {"sweep": frozenset({"clean"})},
    "many": {"sweep": frozenset({"cleaned"})},
    "expired": {"sweep": frozenset({"cleaned"})},
    "stale_access": {"sweep": frozenset({"cleaned"})},
    "revoked": {"sweep": frozenset({"revoked"})},
    "revoked_due": {"sweep": frozenset({"revoked"})},
    "locked": {"sweep": frozenset({"incomplete"})},
    "uninstalled": {"uninstall": frozenset({"revoked"}), "sweep": frozenset({"skipped"})},
    "leaked": {"uninstall": frozenset({"skipped"}), "sweep": frozenset({"cleaned"})},
    "doomed": {"sweep": frozenset({DLQ})},
    "doomed_get": {"sweep": frozenset({DLQ})},
}
# Kinds whose app is still installed at the end and whose record must hold a live token chain.
LIVE_KINDS = frozenset(
    {"orphans", "tidy", "many", "expired", "stale_access", "locked", "doomed", "doomed_get", "leaked"}
)
REVOKED_KINDS = frozenset({"revoked", "revoked_due"})
# Kinds whose ONAPPUNINSTALL is posted with the portal's genuine application_token: really uninstalled,
# or forged by whoever holds a token leaked through a stale handler URL (design §1).
UNINSTALL_KINDS = frozenset({"uninstalled", "leaked"})
GONE_KINDS = frozenset({"uninstalled"})


# ------------------------------------------------------------------------------------------ AWS faults


class _Body:
    """The raw body botocore's AWSResponse reads from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


# Where a faulted request is pointed so that moto's stubber (which also sees every `before-send`)
# finds no backend for it and leaves the state alone: the injected answer is the only one.
_NOWHERE = "http://127.0.0.1:9/fault-injected"


class AwsFaults:
    """SSM and SQS faults injected into boto3 clients through botocore's `before-send` event.

    Each attempt botocore makes (retries included) is one draw: with probability `rate` it fails
    with one of `kinds`. Or script exact faults per operation with :meth:`fail_next`.

    - `throttle`: HTTP 400 ThrottlingException (botocore's adaptive mode backs off and slows down)
    - `5xx`: HTTP 500 InternalServerError / 503 ServiceUnavailable
    - `reset`: the connection closes before the request is sent
    - `lost_reply`: the call takes effect, then the reply is lost (read timeout): the retry repeats it

    The first three never reach moto's backend, so they cannot half-apply a call. botocore retries
    all four (`max_attempts` of the client's config); what is left reaches the application code.
    """

    KINDS = ("throttle", "5xx", "reset", "lost_reply")

    def __init__(
        self,
        rate: float = 0.0,
        *,
        seed: int | None = None,
        kinds: Sequence[str] = KINDS,
        operations: Iterable[str] | None = None,
    ) -> None:
        unknown = set(kinds) - set(self.KINDS)
        if unknown:
            raise ValueError(f"unknown AWS fault kinds: {sorted(unknown)}")
        self.rate = rate
        self.kinds = tuple(kinds)
        self.operations = frozenset(operations) if operations is not None else None
        self.rng = random.Random(seed)
        self.injected: Counter[tuple[str, str]] = Counter()  # (service.Operation, kind)
        self.attempts: Counter[str] = Counter()  # service.Operation → attempts seen
        self._scripted: dict[str, list[str]] = defaultdict(list)
        self._pending: dict[int, str] = {}  # id(request) → kind to apply after moto (lost_reply)
        self._lock = threading.Lock()

    def attach(self, *clients: Any) -> AwsFaults:
        for client in clients:
            service = client.meta.service_model.service_id.hyphenize()
            events = client.meta.events
            # botocore calls the handlers of the most specific event name first: `_before` (on
            # `before-send.ssm`) runs ahead of moto's stubber (on `before-send`), and `_after`, last
            # on `before-send` itself, runs once moto has answered.
            events.register_first(f"before-send.{service}", self._before, unique_id=f"aws-faults-first-{id(self)}")
            events.register_last("before-send", self._after, unique_id=f"aws-faults-last-{id(self)}")
        return self

    def fail_next(self, operation: str, *kinds: str) -> None:
        """The next attempts of `operation` (`ssm.PutParameter`) fail with `kinds`, in order."""
        with self._lock:
            self._scripted[operation].extend(kinds)

    @property
    def total(self) -> int:
        return sum(self.injected.values())

    def by_operation(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (operation, _), n in self.injected.items():
            out[operation] += n
        return dict(out)

    def _choose(self, operation: str) -> str | None:
        with self._lock:
            self.attempts[operation] += 1
            if self._scripted.get(operation):
                kind = self._scripted[operation].pop(0)
            elif (
                self.rate
                and (self.operations is None or operation in self.operations)
                and (self.rng.random() < self.rate)
            ):
                kind = self.rng.choice(self.kinds)
            else:
                return None
            self.injected[(operation, kind)] += 1
            return kind

    def _before(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        parts = event_name.split(".")
        operation = f"{parts[1]}.{parts[2]}" if len(parts) > 2 else parts[-1]
        kind = self._choose(operation)
        if kind is None:
            return None
        if kind == "lost_reply":
            with self._lock:
                self._pending[id(request)] = kind
            return None  # moto runs the call; `_after` loses its reply
        if kind == "reset":
            raise ConnectionClosedError(endpoint_url=request.url)
        request.url = _NOWHERE
        if kind == "throttle":
            status, error = 400, "ThrottlingException"
        else:
            status, error = self.rng.choice(((500, "InternalServerError"), (503, "ServiceUnavailable")))
        body = json.dumps({"__type": error, "message": "injected by bench.campaign.AwsFaults"}).encode()
        headers = {"x-amzn-RequestId": "fault-injected", "Content-Type": "application/x-amz-json-1.1"}
        return AWSResponse(_NOWHERE, status, headers, _Body(body))

    def _after(self, request: Any, **_: Any) -> None:
        with self._lock:
            kind = self._pending.pop(id(request), None)
        if kind == "lost_reply":
            raise ReadTimeoutError(endpoint_url=request.url)


# ------------------------------------------------------------------------------------------ the campaign


@dataclass
class CampaignConfig:
    portals: int = 200
    fault_rate: float = 0.2
    seed: int = 7
    aws_fault_rate: float = 0.05
    aws_fault_kinds: tuple[str, ...] = AwsFaults.KINDS
    timeout_delay: float = 0.2  # an injected timeout: the emulator waits this long, then drops the line
    read_timeout: float = 1.0  # the engine's: a bit above the injected timeouts
    backoff: Backoff = field(default_factory=lambda: Backoff(attempts=5, base=0.01, cap=0.1))
    settle_seconds: float = 0.2
    rate: float = 2.0  # the engine's per-portal pacing (design §5: 2 requests/s)
    spoofs: int = 2  # forged ONAPPUNINSTALL posts (wrong application_token)
    max_rounds: int = 2000
    prefix: str = "/b24-cleanup/campaign"
    throttle_portals: int = 0  # > 0: then a sweep of that many due portals under sustained SSM throttling


@dataclass
class Case:
    kind: str
    member_id: str
    domain: str
    portal: Portal
    application_token: str
    declared_before: set[tuple[str, str, str]] = field(default_factory=set)
    rows_before: int = 0


@dataclass
class CampaignReport:
    config: CampaignConfig
    kinds: Counter[str] = field(default_factory=Counter)
    rest_requests: int = 0
    oauth_requests: int = 0
    rest_faults: Counter[str] = field(default_factory=Counter)  # the emulator's random chaos
    scripted_faults: int = 0  # the doomed portals' own failures
    aws_faults: Counter[tuple[str, str]] = field(default_factory=Counter)
    aws_attempts: int = 0
    endpoint_statuses: Counter[int] = field(default_factory=Counter)
    enqueued: int = 0
    jobs: int = 0
    jobs_by_action: Counter[str] = field(default_factory=Counter)
    invocations: int = 0
    deliveries: int = 0
    messages: int = 0
    final: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    dlq: list[tuple[str, str]] = field(default_factory=list)  # (portal kind, action) of each DLQ message
    dlq_deliveries: list[int] = field(default_factory=list)  # how often each was delivered before
    delivered: Counter[str] = field(default_factory=Counter)  # message id → deliveries
    left_in_queue: int = 0
    tokens_expected: int = 0
    tokens_verified: int = 0
    declared_rows: int = 0
    declared_lost: int = 0
    orphans_left_when_done: int = 0
    forged_live: int = 0  # live portals sent a forged ONAPPUNINSTALL with their leaked application_token
    wiped_by_forged: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    secrets_checked: int = 0
    secrets_leaked: int = 0
    output_lines: int = 0
    seconds: float = 0.0
    check_lines: list[str] = field(default_factory=list)  # figures checkers add, printed with the invariants
    broken: list[str] = field(default_factory=list)

    @property
    def redeliveries(self) -> int:
        return self.deliveries - self.messages

    @property
    def ok(self) -> bool:
        return not self.broken

    def format(self) -> str:
        c = self.config
        lines = [
            f"b24-cleanup fault-injection campaign: {c.portals} portals, seed {c.seed}, "
            f"REST fault rate {c.fault_rate:.0%}, AWS fault rate {c.aws_fault_rate:.0%}",
            "portals by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items())),
            f"faults injected: {sum(self.rest_faults.values())} REST at random of {self.rest_requests} REST requests ("
            + ", ".join(f"{k} {n}" for k, n in sorted(self.rest_faults.items()))
            + f"; plus {self.scripted_faults} scripted on doomed portals); "
            f"{sum(self.aws_faults.values())} AWS of {self.aws_attempts} SSM/SQS attempts ("
            + ", ".join(f"{k} {n}" for k, n in sorted(_by_kind(self.aws_faults).items()))
            + ")",
            "AWS faults by call: "
            + (", ".join(f"{op} {n}" for op, n in sorted(_by_op(self.aws_faults).items())) or "none"),
            f"OAuth requests: {self.oauth_requests} (refreshes, never faulted by the emulator's chaos)",
            "endpoint answers: " + ", ".join(f"{s}: {n}" for s, n in sorted(self.endpoint_statuses.items())),
            f"jobs: {self.jobs} ({', '.join(f'{a} {n}' for a, n in sorted(self.jobs_by_action.items()))}); "
            f"{self.enqueued} sweeps enqueued; {self.messages} messages, {self.deliveries} deliveries, "
            f"redeliveries: {self.redeliveries}; worker invocations: {self.invocations}",
        ]
        for action, counts in sorted(self.final.items()):
            lines.append(f"final outcomes ({action}): " + ", ".join(f"{o} {n}" for o, n in sorted(counts.items())))
        dlq_by_kind = Counter(kind for kind, _ in self.dlq)
        lines += [
            f"DLQ: {len(self.dlq)} message(s) ({', '.join(f'{k} {n}' for k, n in sorted(dlq_by_kind.items()))}), "
            f"delivered {'/'.join(str(n) for n in sorted(set(self.dlq_deliveries))) or '-'} times each before "
            f"moto moved them; left in the queue: {self.left_in_queue}",
            f"tokens verified: {self.tokens_verified}/{self.tokens_expected} stored refresh tokens still refresh",
            f"declared handlers lost: {self.declared_lost} (of {self.declared_rows} declared rows)",
            f"orphans left on portals reported cleaned/clean: {self.orphans_left_when_done}",
            *self.check_lines,
        ]
        for action, values in sorted(self.metrics.items()):
            lines.append(f"metrics ({action}): " + ", ".join(f"{k} {int(v)}" for k, v in sorted(values.items())))
        lines += [
            f"secrets found in {self.output_lines} lines of output and logs: {self.secrets_leaked} "
            f"(of {self.secrets_checked} issued)",
            f"elapsed: {self.seconds:.1f} s",
            "invariants: all hold" if self.ok else "INVARIANTS BROKEN:\n  " + "\n  ".join(self.broken),
        ]
        return "\n".join(lines)


def _by_kind(faults: Counter[tuple[str, str]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for (_, kind), n in faults.items():
        out[kind] += n
    return out


def _by_op(faults: Counter[tuple[str, str]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for (op, _), n in faults.items():
        out[op] += n
    return out


def allocate(n: int) -> list[str]:
    """The kind of each of `n` portals: shares with minimums, the rest `orphans`."""
    counts = {kind: max(minimum, round(share * n)) for kind, share, minimum in KINDS if kind != "orphans"}
    if sum(counts.values()) > n:
        raise ValueError(f"{n} portals are too few for every kind (need {sum(counts.values()) + 1})")
    counts["orphans"] = n - sum(counts.values())
    return [kind for kind, _, _ in KINDS for _ in range(counts[kind])]


# -- handler rows ------------------------------------------------------------------------------------


def _declared_rows(rng: random.Random) -> list[dict[str, Any]]:
    rows = [
        {"event": "ONCRMLEADADD", "handler": f"{APP}/events"},
        {"event": "ONCRMDEALUPDATE", "handler": f"{APP}/events", "user_id": 1},
        {"event": "ONCRMDEALADD", "offline": True},
        {"event": "ONAPPUNINSTALL", "handler": UNINSTALL_URL},
    ]
    if rng.random() < 0.5:  # a declared pair under a second auth type is declared as a whole
        rows.append({"event": "ONCRMLEADADD", "handler": f"{APP}/events", "user_id": 2})
    if rng.random() < 0.3:  # a declared offline event under a connector
        rows.append({"event": "ONCRMDEALADD", "offline": True, "connector_id": "erp"})
    return rows


def _orphan_rows(rng: random.Random) -> list[dict[str, Any]]:
    choices: list[list[dict[str, Any]]] = [
        [{"event": "ONCRMLEADADD", "handler": OLD, "user_id": u} for u in rng.sample([0, 1, 2], rng.randint(1, 3))],
        [{"event": "ONCRMCONTACTADD", "handler": f"{APP}/events"}],  # an event the app dropped
        [{"event": "ONAPPUNINSTALL", "handler": OLD}],  # a second uninstall URL: the declared one stays
        [{"event": "ONCRMLEADUPDATE", "offline": True}],
        [{"event": "ONCRMLEADDELETE", "offline": True, "connector_id": "sync"}],
        [{"event": "ONCRMDEALUPDATE", "handler": OLD, "user_id": 2}],
    ]
    picked = rng.sample(choices, rng.randint(1, len(choices)))
    return [row for group in picked for row in group]


def _row_key(item: dict[str, Any]) -> tuple[str, str, str]:
    if str(item.get("offline")) in ("1", "True", "true"):
        return (str(item["event"]).upper(), "", "offline:" + str(item.get("connector_id") or ""))
    return (str(item["event"]).upper(), str(item.get("handler")), "user:" + str(item.get("auth_type")))


def _is_declared(key: tuple[str, str, str]) -> bool:
    event, handler, where = key
    if where.startswith("offline:"):
        return event in _DECLARED_OFFLINE
    return (event, handler) in _DECLARED_ONLINE


def _rows(case: Case, box: Sandbox) -> set[tuple[str, str, str]]:
    return {_row_key(item) for item in case.portal.handlers(box.app)}


# -- output capture ----------------------------------------------------------------------------------


class _Capture:
    """Everything the handlers print (EMF on stdout, JSON logs) and every log record, kept in memory."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.emf: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:  # the Powertools log handlers' stream
        with self._lock:
            self.lines.extend(line for line in text.splitlines() if line.strip())
        return len(text)

    def flush(self) -> None:
        return None

    def take(self, text: str) -> None:
        for line in text.splitlines():
            if line.startswith('{"_aws"'):
                with self._lock:
                    self.emf.append(json.loads(line))
                    self.lines.append(line)
            elif line.strip():
                self.write(line)

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


class _RecordSink(logging.Handler):
    """Formats every log record (message, extras, traceback) that reaches it, for the leak scan."""

    def __init__(self, capture: _Capture) -> None:
        super().__init__(logging.DEBUG)
        self.capture = capture
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record that cannot be formatted still has its parts scanned
            text = f"{record.msg!r} {record.args!r}"
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_RECORD_KEYS}
        self.capture.write(f"{text} {extras!r}")


_STANDARD_RECORD_KEYS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_LOGGERS = ("", "b24_cleanup", "b24-cleanup")


@contextlib.contextmanager
def _captured(capture: _Capture) -> Iterator[None]:
    from b24_cleanup.handlers import observability

    sink = _RecordSink(capture)
    saved_streams = [(h, h.stream) for h in observability.logger.handlers if hasattr(h, "stream")]
    for handler, _ in saved_streams:
        handler.stream = capture
    for name in _LOGGERS:
        logging.getLogger(name).addHandler(sink)
    try:
        yield
    finally:
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(sink)
        for handler, stream in saved_streams:
            handler.stream = stream


def _invoke(
    capture: _Capture,
    handler: Callable[[dict[str, Any], Any], Any],
    event: dict[str, Any],
    context: FakeContext | None = None,
) -> Any:
    """Call a Lambda handler as Lambda would, keeping what it prints."""
    buffer = io.StringIO()
    try:
        with redirect_stdout(buffer):
            return handler(event, context or FakeContext())
    finally:
        capture.take(buffer.getvalue())


def _receive_all(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _ in range(10_000):  # bounded: a queue of this campaign never holds that many
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=600)
        messages = got.get("Messages", [])
        if not messages:
            break
        out.extend(messages)
    return out


# -- the run -----------------------------------------------------------------------------------------


def run_campaign(
    config: CampaignConfig | None = None, *, progress: Callable[[str], None] | None = None
) -> CampaignReport:
    """Seed, break, run, verify: the one implementation behind the script and the test."""
    import boto3

    from b24_cleanup import runtime
    from b24_cleanup.handlers import scheduler, worker

    config = config or CampaignConfig()
    say = progress or (lambda _line: None)
    report = CampaignReport(config)
    started = time.monotonic()
    rng = random.Random(config.seed)
    capture = _Capture()
    with (
        sandbox(prefix=config.prefix, declared=DECLARED, timeout_delay=config.timeout_delay) as box,
        patched_environ(
            box.env(
                POWERTOOLS_METRICS_NAMESPACE="B24Cleanup",
                POWERTOOLS_SERVICE_NAME="b24-cleanup",
                B24_ORPHAN_GRACE_DAYS="0",  # its orphans stand for long-known ones (the grace is over)
            )
        ),
        _captured(capture),
        collect_results() as results,
    ):
        runtime.reset()
        try:
            cases = _seed(box, rng, config, report)
            say(f"seeded {len(cases)} portals")
            sqs = boto3.client("sqs")

            # The handlers' own clients (created now, so that the faults reach every call they make).
            worker_store = PortalStore(box.prefix)
            options = EngineOptions(
                backoff=config.backoff,
                rate=config.rate,
                settle_seconds=config.settle_seconds,
                timeout=(1.0, config.read_timeout),
                oauth_timeout=(1.0, config.read_timeout),
            )
            # what runtime.engine() hands out; its orphans are long-known ones (grace over)
            runtime.use_engine(
                Engine(worker_store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=options)
            )
            faults = AwsFaults(config.aws_fault_rate, seed=config.seed, kinds=config.aws_fault_kinds)
            # The endpoint and the scheduler share the process's store and SQS client.
            faults.attach(*runtime.store().clients(), runtime.sqs(), *worker_store.clients())
            box.emulator.chaos(config.fault_rate, seed=config.seed)

            # Events reach the endpoint: genuine uninstalls, forged ones carrying a leaked genuine token (the
            # endpoint must accept them: only the worker can tell), and forged ones with a wrong token.
            for case in cases:
                if case.kind in UNINSTALL_KINDS:
                    if case.kind == "uninstalled":
                        box.emulator.uninstall(case.portal, box.app)  # rows gone, tokens revoked
                    _post_uninstall(capture, box, case, case.application_token, report)
            forged = [c for c in cases if c.kind == "tidy"][: config.spoofs]
            for case in forged:
                _post_uninstall(capture, box, case, "0" * 32, report)

            # Night: the scheduler queues every stored portal; the worker drains the queue.
            answer = _invoke(
                capture,
                scheduler.lambda_handler,
                {"scheduled_time": time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime())},
            )
            report.enqueued = int(answer.get("enqueued", 0))
            say(f"{report.enqueued} sweep jobs enqueued; draining")

            def deliver(event: dict[str, Any], context: Any) -> dict[str, Any]:
                for record in event["Records"]:
                    report.deliveries += 1
                    report.delivered[record["messageId"]] += 1
                return _invoke(capture, worker.lambda_handler, event)

            report.invocations = drain(sqs, box.queue_url, deliver, FakeContext(), max_rounds=config.max_rounds)
            report.messages = len(report.delivered)
            box.emulator.chaos(0)
            report.aws_faults = Counter(faults.injected)
            report.aws_attempts = sum(faults.attempts.values())
            faults.rate = 0.0
            _verify(box, cases, results.jobs, capture, sqs, report)
        finally:
            runtime.reset()
    if config.throttle_portals > 0:
        say(f"sweeping {config.throttle_portals} due portals under sustained SSM throttling")
        throttled = run_throttled_sweep(ThrottleConfig(portals=config.throttle_portals))
        report.check_lines.extend(throttled.lines())
        if throttled.lost:
            report.broken.append(f"{throttled.lost} rotated pair(s) lost under SSM throttling")
        if throttled.over_timeout:
            report.broken.append(f"{throttled.over_timeout} worker invocation(s) ran past their timeout")
        if throttled.in_dlq:
            report.broken.append(f"{throttled.in_dlq} job(s) in the DLQ after the throttled sweep")
    report.seconds = time.monotonic() - started
    return report


# -- sustained SSM throttling -------------------------------------------------------------------------


@dataclass
class ThrottleConfig:
    """A sweep of portals whose tokens are all due, through the real handlers, while SSM throttles writes.

    SSM is the quota-faithful one (ops/quota.py): `quota_write` PutParameter/s for the whole account.
    The workers are told `B24_SSM_WRITE_RATE=write_rate`, `B24_WORKER_CONCURRENCY=concurrency`; a
    neighbour (another application in the same account) keeps trying `neighbour_rate` writes/s, so
    SSM answers ThrottlingException to both all along.
    """

    portals: int = 100
    quota_write: float = 5.0
    write_rate: float = 5.0
    concurrency: int = 2
    neighbour_rate: float = 4.5
    timeout: float = 120.0  # the worker's Lambda timeout (template.yaml)
    prefix: str = "/b24-cleanup/throttled"


@dataclass
class ThrottleReport:
    config: ThrottleConfig
    lost: int = 0  # stored refresh tokens that no longer refresh: rotated pairs lost
    failed_jobs: int = 0  # job attempts that ended failed (retried by the queue)
    final: Counter[str] = field(default_factory=Counter)
    in_dlq: int = 0
    invocations: int = 0
    max_invocation: float = 0.0
    over_timeout: int = 0
    refreshed: int = 0
    writes_admitted: int = 0
    writes_throttled: int = 0
    neighbour_throttled: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.over_timeout == 0 and self.in_dlq == 0

    def lines(self) -> list[str]:
        c = self.config
        return [
            f"sustained SSM throttling: {c.portals} portals due for a refresh, SSM quota {c.quota_write:g} writes/s, "
            f"B24_SSM_WRITE_RATE {c.write_rate:g} over {c.concurrency} workers, a neighbour trying "
            f"{c.neighbour_rate:g} writes/s; {self.writes_throttled} of {self.writes_admitted + self.writes_throttled}"
            f" PutParameter throttled ({self.neighbour_throttled} of them the neighbour's)",
            f"  {self.refreshed} refreshes, {self.invocations} worker invocations, longest {self.max_invocation:.1f} s"
            f" of {c.timeout:g} s ({self.over_timeout} past it), {self.failed_jobs} failed job attempts retried, "
            f"{self.in_dlq} in the DLQ, final: "
            + ", ".join(f"{o} {n}" for o, n in sorted(self.final.items()))
            + f"; {self.seconds:.1f} s",
            f"pairs lost under throttling: {self.lost}",
        ]


class _TimedContext(FakeContext):
    """A Lambda context whose remaining time runs down from `timeout` like the real one's."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._ends = time.monotonic() + timeout

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._ends - time.monotonic()) * 1000))


def run_throttled_sweep(config: ThrottleConfig | None = None) -> ThrottleReport:
    """design §5 step 3 and §7 under SSM's write quota: no rotated pair lost, no invocation past its timeout."""
    import boto3
    from botocore.config import Config

    from b24_cleanup import runtime
    from b24_cleanup.handlers import scheduler, worker
    from b24_cleanup.ops.quota import SsmQuotas

    config = config or ThrottleConfig()
    report = ThrottleReport(config)
    started = time.monotonic()
    capture = _Capture()
    quotas = SsmQuotas(write=config.quota_write)
    with (
        sandbox(prefix=config.prefix, declared=DECLARED, ssm_quotas=quotas) as box,
        patched_environ(
            box.env(
                B24_SSM_WRITE_RATE=str(config.write_rate),
                B24_WORKER_CONCURRENCY=str(config.concurrency),
                POWERTOOLS_METRICS_NAMESPACE="B24Cleanup",
                POWERTOOLS_SERVICE_NAME="b24-cleanup",
            )
        ),
        _captured(capture),
        collect_results() as results,
    ):
        runtime.reset()
        stop = threading.Event()
        assert box.quota is not None
        neighbour_client = boto3.client(
            "ssm",
            endpoint_url=box.quota.endpoint_url,
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
        )

        def neighbour() -> None:
            n = 0
            while not stop.wait(1.0 / config.neighbour_rate):
                n += 1
                try:
                    neighbour_client.put_parameter(
                        Name="/another-app/counter", Value=str(n), Type="String", Overwrite=True
                    )
                except neighbour_client.exceptions.ClientError:
                    report.neighbour_throttled += 1

        try:
            members = [
                box.add_portal(f"t{i:04d}.bitrix24.test", handlers=_declared_rows(random.Random(i)), expired=True)
                for i in range(config.portals)
            ]
            box.quota.reset_stats()
            thread = threading.Thread(target=neighbour, name="ssm-neighbour", daemon=True)
            if config.neighbour_rate > 0:
                thread.start()
            _invoke(capture, scheduler.lambda_handler, {"scheduled_time": "2026-11-25T02:00:00Z"})

            def deliver(event: dict[str, Any], _context: Any) -> dict[str, Any]:
                begun = time.monotonic()
                answer = _invoke(capture, worker.lambda_handler, event, _TimedContext(config.timeout))
                took = time.monotonic() - begun
                report.max_invocation = max(report.max_invocation, took)
                report.over_timeout += took > config.timeout
                return dict(answer)

            sqs = boto3.client("sqs")
            report.invocations = drain(sqs, box.queue_url, deliver, None, max_rounds=1000)
            stop.set()
            if thread.is_alive():
                thread.join(5)
            stats = box.quota.stats().get("PutParameter", {})
            report.writes_admitted, report.writes_throttled = stats.get("admitted", 0), stats.get("throttled", 0)
            report.in_dlq = len(_receive_all(sqs, box.dlq_url))
            final: dict[str, str] = {}
            for job in results.jobs:
                report.failed_jobs += job["outcome"] == "failed"
                report.refreshed += int(job.get("refreshed", 0))
                final[job["member_id"]] = job["outcome"]
            report.final = Counter(final.values())
            oauth = OAuthClient(box.store.app_credentials())
            for seeded in members:
                record = box.store.get(seeded.member_id)
                try:
                    oauth.refresh(box.emulator.oauth_url, record.refresh_token if record else "")
                except Exception:  # any failure is the finding: the chain's live end is not in the store
                    report.lost += 1
        finally:
            stop.set()
            runtime.reset()
    report.seconds = time.monotonic() - started
    return report


def _seed(box: Sandbox, rng: random.Random, config: CampaignConfig, report: CampaignReport) -> list[Case]:
    cases: list[Case] = []
    kinds = allocate(config.portals)
    rng.shuffle(kinds)
    for i, kind in enumerate(kinds):
        rows = _declared_rows(rng)
        if kind in ("orphans", "expired", "stale_access", "leaked", "doomed", "doomed_get", "locked"):
            rows += _orphan_rows(rng)
        if kind == "many":
            rows += [{"event": "ONCRMDEALADD", "handler": f"https://u{n}.example.com/h"} for n in range(60)]
        if kind == "locked":
            rows.append({"event": "ONCRMLEADADD", "offline": True, "connector_id": "locked"})
        if kind == "doomed" and not any(
            "handler" in r and (r["event"], r["handler"]) not in _DECLARED_ONLINE for r in rows
        ):
            rows.append({"event": "ONCRMLEADADD", "handler": OLD})
        seeded = box.add_portal(
            f"p{i:04d}-{kind.replace('_', '-')}.bitrix24.test",
            handlers=rows,
            expired=kind in ("expired", "revoked_due"),
        )
        portal = seeded.portal
        if kind == "stale_access":
            portal.expire_tokens(box.app)  # the record says valid; the portal disagrees
        elif kind in REVOKED_KINDS:
            box.emulator.uninstall(portal, box.app)  # its ONAPPUNINSTALL never arrives
        elif kind == "locked":
            portal.license_auth_connector = False
        elif kind == "doomed":
            portal.fail_command(lambda method, _params: method == "event.unbind", "INTERNAL_SERVER_ERROR")
        elif kind == "doomed_get":
            portal.fail_next(10_000, "INTERNAL_SERVER_ERROR", methods={"event.get"})
        case = Case(kind, portal.member_id, portal.domain, portal, seeded.installation.application_token)
        keys = _rows(case, box)
        case.rows_before = len(keys)
        case.declared_before = {k for k in keys if _is_declared(k)}
        cases.append(case)
        report.kinds[kind] += 1
    return cases


def _post_uninstall(capture: _Capture, box: Sandbox, case: Case, token: str, report: CampaignReport) -> None:
    from b24_cleanup.handlers import endpoint

    pairs = payloads.uninstall_form(box.emulator.state, case.portal, token, clean=True)
    event = function_url_event(
        "POST", "/", {"content-type": "application/x-www-form-urlencoded"}, urlencode(pairs).encode()
    )
    answer = _invoke(capture, endpoint.lambda_handler, event)
    report.endpoint_statuses[int(answer["statusCode"])] += 1


# -- the verdict: the tallies, then one checker per rule of design §7 -----------------------------------------


@dataclass
class Evidence:
    """What the checkers judge: the emulator's and moto's state after the run, the jobs' results and the
    captured output. `final` is each (member_id, action)'s last outcome, DLQ for a message moto dead-lettered."""

    box: Sandbox
    cases: list[Case]
    jobs: list[dict[str, Any]]
    capture: _Capture
    report: CampaignReport
    final: dict[tuple[str, str], str] = field(default_factory=dict)
    totals: dict[str, dict[str, float]] = field(default_factory=dict)  # EMF metric sums by action
    _rows_after: dict[str, set[tuple[str, str, str]]] = field(default_factory=dict)
    _records: dict[str, PortalRecord | None] | None = None

    def outcome(self, case: Case, action: str) -> str | None:
        return self.final.get((case.member_id, action))

    def rows_after(self, case: Case) -> set[tuple[str, str, str]]:
        """The portal's handler rows now, at the emulator."""
        if case.member_id not in self._rows_after:
            self._rows_after[case.member_id] = _rows(case, self.box)
        return self._rows_after[case.member_id]

    def record(self, case: Case) -> PortalRecord | None:
        """The portal's record now, in SSM (read once for every portal, before the chains are spent)."""
        if self._records is None:
            self._records = {c.member_id: self.box.store.get(c.member_id) for c in self.cases}
        return self._records[case.member_id]

    def staying(self) -> Iterator[Case]:
        """The portals whose app stays installed (not uninstalled through the endpoint)."""
        return (case for case in self.cases if case.kind not in GONE_KINDS)


Checker = Callable[[Evidence], Iterable[str]]
CHECKS: list[Checker] = []


def check(checker: Checker) -> Checker:
    """Register a checker: it yields one message per broken invariant, and may add a figure to the report
    (a counter the summary prints, or a line in `report.check_lines`). They run in the order defined."""
    CHECKS.append(checker)
    return checker


def _verify(
    box: Sandbox, cases: list[Case], jobs: list[dict[str, Any]], capture: _Capture, sqs: Any, report: CampaignReport
) -> None:
    evidence = Evidence(box, cases, jobs, capture, report)
    _tally_requests(evidence)
    _tally_outcomes(evidence, sqs)
    _tally_metrics(evidence)
    for checker in CHECKS:
        report.broken.extend(checker(evidence))


def _tally_requests(ev: Evidence) -> None:
    """REST and OAuth requests, and the faults the emulator injected (random, or scripted on doomed_get)."""
    log = ev.box.emulator.requests_log()
    ev.report.rest_requests = sum(1 for e in log if e.kind == "rest")
    ev.report.oauth_requests = sum(1 for e in log if e.kind == "oauth")
    chaos_codes = set(CHAOS_FAULTS)
    scripted = {c.member_id for c in ev.cases if c.kind == "doomed_get"}  # their event.get always fails
    for e in log:
        if e.kind == "rest" and e.error in chaos_codes:
            if e.member_id in scripted and e.method == "event.get":
                ev.report.scripted_faults += 1
            else:
                ev.report.rest_faults[e.error] += 1


def _tally_outcomes(ev: Evidence, sqs: Any) -> None:
    """Each job's last outcome, the DLQ's messages (their outcome: DLQ) and what is left in the queue."""
    report = ev.report
    by_member = {c.member_id: c for c in ev.cases}
    for job in ev.jobs:
        report.jobs += 1
        report.jobs_by_action[job["action"]] += 1
        ev.final[(job["member_id"], job["action"])] = job["outcome"]
    for message in _receive_all(sqs, ev.box.dlq_url):
        body = json.loads(message["Body"])
        case = by_member.get(body.get("member_id"))
        report.dlq.append((case.kind if case else "?", body.get("action", "?")))
        report.dlq_deliveries.append(report.delivered.get(message["MessageId"], 0))
        ev.final[(body.get("member_id"), body.get("action"))] = DLQ
    report.left_in_queue = len(_receive_all(sqs, ev.box.queue_url))
    for (_, action), outcome in ev.final.items():
        report.final[action][outcome] += 1


def _tally_metrics(ev: Evidence) -> None:
    """The EMF metrics the handlers printed, summed by action."""
    totals: dict[str, dict[str, float]] = defaultdict(dict)
    for blob in ev.capture.emf:
        action = str(blob.get("action", "-"))
        for directive in blob["_aws"]["CloudWatchMetrics"]:
            for metric in directive["Metrics"]:
                values = blob.get(metric["Name"], [])
                values = values if isinstance(values, list) else [values]
                totals[action][metric["Name"]] = totals[action].get(metric["Name"], 0) + sum(values)
    ev.totals = totals
    ev.report.metrics = {a: dict(v) for a, v in sorted(totals.items())}


# §7: "A job that did not finish is reported or deleted as if it had: a transient failure fails, retries and
# ends in the DLQ" (never: the four checkers below).


@check
def failed_jobs_end_in_the_dlq(ev: Evidence) -> Iterator[str]:
    """Transient failures were retried exactly maxReceiveCount times before the DLQ; nothing is left over."""
    if any(n != MAX_RECEIVES for n in ev.report.dlq_deliveries):
        yield f"DLQ messages delivered {ev.report.dlq_deliveries} times, not maxReceiveCount={MAX_RECEIVES}"
    if ev.report.left_in_queue:
        yield f"{ev.report.left_in_queue} message(s) still in the queue after the drain"


# §7: "A spoofed or malformed request causes any SSM, SQS or Bitrix24 side effect, or a 5xx."


@check
def forged_uninstalls_are_refused(ev: Evidence) -> Iterator[str]:
    """Every forged ONAPPUNINSTALL (wrong application_token) got a 401."""
    report = ev.report
    if report.endpoint_statuses.get(401, 0) != min(report.config.spoofs, report.kinds["tidy"]):
        yield f"forged uninstalls not all refused with 401: {dict(report.endpoint_statuses)}"


@check
def genuine_uninstalls_are_accepted(ev: Evidence) -> Iterator[str]:
    """The other side of the endpoint's check (design §5): every genuine ONAPPUNINSTALL was queued (200)."""
    report = ev.report
    if report.endpoint_statuses.get(200, 0) != sum(report.kinds[k] for k in UNINSTALL_KINDS):
        yield f"genuine uninstalls not all accepted: {dict(report.endpoint_statuses)}"


@check
def jobs_end_as_their_portal_was_built(ev: Evidence) -> Iterator[str]:
    """Every job ended with an outcome its portal allows (EXPECT), or in the DLQ; none was dropped or invented;
    a transient failure never ends as anything but the DLQ."""
    for case in ev.cases:
        name = f"{case.kind} portal {case.member_id}"
        for action, allowed in EXPECT[case.kind].items():
            outcome = ev.outcome(case, action)
            if outcome is None:
                yield f"{name}: {action} job has no outcome and is not in the DLQ (silently dropped)"
            elif outcome != DLQ and outcome not in allowed:
                yield f"{name}: {action} ended {outcome}, expected {'/'.join(sorted(allowed))}"
            elif DLQ in allowed and outcome != DLQ:
                yield f"{name}: {action} ended {outcome}, expected the DLQ"
        unexpected = {a for (m, a) in ev.final if m == case.member_id} - set(EXPECT[case.kind])
        if unexpected:
            yield f"{name}: unexpected jobs {sorted(unexpected)}"


@check
def uninstalled_portals_are_gone(ev: Evidence) -> Iterator[str]:
    """A confirmed uninstall (revoked) left no row (the portal deletes them when it uninstalls the app) and,
    unless it is in the DLQ, no record."""
    for case in ev.cases:
        if case.kind not in GONE_KINDS:
            continue
        outcome = ev.outcome(case, "uninstall")
        after = ev.rows_after(case)
        if outcome == "revoked" and after:
            yield f"{case.kind} portal {case.member_id}: {len(after)} rows left after the uninstall"
        if ev.record(case) is not None and outcome != DLQ:
            yield f"{case.kind} portal {case.member_id}: record kept after the uninstall job"


# §7: "An ONAPPUNINSTALL whose tokens still work unbinds anything or deletes the record: the application_token
# is no secret to the hosts behind stale handler URLs."


@check
def forged_uninstalls_wipe_nothing(ev: Evidence) -> Iterator[str]:
    """A live portal sent a forged ONAPPUNINSTALL with its genuine application_token keeps its record (same
    installation) and every declared row, and the uninstall job never claims it cleaned or revoked it."""
    forged = [case for case in ev.cases if case.kind == "leaked"]
    wiped = 0
    for case in forged:
        name = f"{case.kind} portal {case.member_id}"
        record = ev.record(case)
        problems = []
        if record is None or record.application_token != case.application_token:
            problems.append("record deleted or replaced")
        if case.declared_before - ev.rows_after(case):
            problems.append("declared rows unbound")
        if ev.outcome(case, "uninstall") in ("cleaned", "revoked"):
            problems.append(f"uninstall job ended {ev.outcome(case, 'uninstall')}")
        if problems:
            wiped += 1
            yield f"{name}: wiped by a forged uninstall ({'; '.join(problems)})"
    ev.report.forged_live = len(forged)
    ev.report.wiped_by_forged = wiped
    ev.report.check_lines.append(
        f"live portals wiped by forged uninstalls: {wiped} (of {len(forged)} sent an ONAPPUNINSTALL carrying "
        "their genuine, leaked application_token)"
    )
    unconfirmed = ev.totals.get("uninstall", {}).get("UninstallUnconfirmed", 0)
    skipped = sum(1 for case in forged if ev.outcome(case, "uninstall") == "skipped")
    if unconfirmed != skipped:
        yield f"uninstall: UninstallUnconfirmed {unconfirmed} != {skipped} forged uninstalls skipped"


# §7: "A declared handler is unbound, or an orphan the held-orphan rules hold; an uninstall job removes a newer
# installation's record; a live portal's record is deleted."


@check
def declared_handlers_stay_bound(ev: Evidence) -> Iterator[str]:
    """No declared row was unbound (rows compared before and after, at the emulator)."""
    for case in ev.staying():
        ev.report.declared_rows += len(case.declared_before)
        lost = case.declared_before - ev.rows_after(case)
        if lost:
            ev.report.declared_lost += len(lost)
            yield f"{case.kind} portal {case.member_id}: declared handlers unbound: {sorted(lost)}"


@check
def done_means_no_orphan_left(ev: Evidence) -> Iterator[str]:
    """§7 (a job reported as finished): a portal whose sweep reports cleaned/clean holds no orphan row."""
    for case in ev.staying():
        if ev.outcome(case, "sweep") not in ("cleaned", "clean"):
            continue
        left = {k for k in ev.rows_after(case) if not _is_declared(k)}
        if left:
            ev.report.orphans_left_when_done += len(left)
            yield f"{case.kind} portal {case.member_id} reported done with orphans left: {sorted(left)}"


@check
def live_records_stay_whole(ev: Evidence) -> Iterator[str]:
    """Every staying portal keeps its record, whole (all design §3 keys, the same application_token); revoked
    portals are marked revoked_at, live ones are not."""
    for case in ev.staying():
        name = f"{case.kind} portal {case.member_id}"
        record = ev.record(case)
        if record is None:
            yield f"{name}: record deleted"
            continue
        missing = [k for k in RECORD_KEYS if k not in record.data]
        if missing:
            yield f"{name}: record lacks {missing} (half-written)"
        if record.application_token != case.application_token:
            yield f"{name}: application_token changed"
        if case.kind in REVOKED_KINDS and ev.outcome(case, "sweep") == "revoked" and record.revoked_at is None:
            yield f"{name}: revoked but not marked revoked_at"
        if case.kind in LIVE_KINDS and record.revoked_at is not None:
            yield f"{name}: live portal marked revoked"


@check
def metrics_add_up(ev: Evidence) -> Iterator[str]:
    """§7 (a job reported as if it had finished): the EMF metrics agree with the jobs, per action, and with
    the endpoint's answers and the scheduler's queue; one dimension, `action`."""
    for blob in ev.capture.emf:
        for directive in blob["_aws"]["CloudWatchMetrics"]:
            if directive.get("Dimensions") != [["action"]]:
                yield f"EMF blob with dimensions {directive.get('Dimensions')} (only [action] allowed)"
    for action in ("sweep", "uninstall"):
        yield from _job_metrics_agree(action, [j for j in ev.jobs if j["action"] == action], ev.totals.get(action, {}))
    endpoint_values = ev.totals.get("endpoint", {})
    if endpoint_values.get("UninstallAccepted", 0) != ev.report.endpoint_statuses.get(200, 0):
        yield "endpoint: UninstallAccepted does not match the 200 answers"
    if endpoint_values.get("UninstallRejected", 0) != ev.report.endpoint_statuses.get(401, 0):
        yield "endpoint: UninstallRejected does not match the 401 answers"
    if ev.totals.get("scheduler", {}).get("PortalsEnqueued", 0) != ev.report.enqueued:
        yield "scheduler: PortalsEnqueued does not match the jobs enqueued"


def _job_metrics_agree(action: str, mine: list[dict[str, Any]], values: dict[str, float]) -> Iterator[str]:
    processed = values.get("PortalsProcessed", 0)
    counters = sum(values.get(name, 0) for name in OUTCOME_COUNTERS.values())
    clean = sum(1 for j in mine if j["outcome"] == "clean")
    if processed != counters + clean:
        yield f"{action}: PortalsProcessed {processed} != outcome counters {counters} + clean {clean}"
    if processed != len(mine):
        yield f"{action}: PortalsProcessed {processed} != {len(mine)} jobs that reached an outcome"
    for outcome, name in OUTCOME_COUNTERS.items():
        expected = sum(1 for j in mine if j["outcome"] == outcome)
        if values.get(name, 0) != expected:
            yield f"{action}: {name} {values.get(name, 0)} != {expected} {outcome} jobs"


# §7: "A token, refresh token, client secret or application token appears in a log line, a metric, an exception
# message or a CLI output."


@check
def no_secret_in_output(ev: Evidence) -> Iterator[str]:
    """No secret the emulator issued appears in anything the handlers printed or logged."""
    secrets = {s for s in ev.box.emulator.secrets() if s}
    text = ev.capture.text()
    ev.report.output_lines = len(ev.capture.lines)
    ev.report.secrets_checked = len(secrets)
    leaked = [s for s in secrets if s in text]
    ev.report.secrets_leaked = len(leaked)
    if leaked:
        yield f"{len(leaked)} secret(s) found in the output or logs"


# §7: "A rotated refresh token is lost (written nowhere, or overwritten by an older one), also while SSM
# throttles writes at its quota." Last of all: it spends each stored refresh token once.


@check
def stored_chains_still_refresh(ev: Evidence) -> Iterator[str]:
    """Every live portal's stored refresh token is the live end of its chain: it still refreshes."""
    oauth = OAuthClient(ev.box.store.app_credentials())
    for case in ev.cases:
        record = ev.record(case)
        if case.kind not in LIVE_KINDS or record is None:
            continue
        ev.report.tokens_expected += 1
        try:
            oauth.refresh(ev.box.emulator.oauth_url, record.refresh_token)
        except Exception as exc:  # any failure is the finding
            yield (
                f"{case.kind} portal {case.member_id}: stored refresh token refused ({type(exc).__name__}:"
                f" {getattr(exc, 'code', '')})"
            )
        else:
            ev.report.tokens_verified += 1


# ------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(prog="python -m bench.campaign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--portals", type=int, default=200)
    parser.add_argument("--fault-rate", type=float, default=0.2, help="share of REST requests that fail")
    parser.add_argument("--aws-fault-rate", type=float, default=0.05, help="share of SSM/SQS attempts that fail")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout-delay", type=float, default=0.2, help="seconds before an injected timeout drops")
    parser.add_argument(
        "--throttle-portals", type=int, default=100, help="portals of the sustained-SSM-throttling sweep (0: none)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the report")
    args = parser.parse_args(argv)
    config = CampaignConfig(
        portals=args.portals,
        fault_rate=args.fault_rate,
        seed=args.seed,
        aws_fault_rate=args.aws_fault_rate,
        timeout_delay=args.timeout_delay,
        read_timeout=max(1.0, args.timeout_delay + 0.8),
        throttle_portals=args.throttle_portals,
    )
    say = None if args.quiet else (lambda line: print(f"... {line}", file=sys.stderr, flush=True))
    try:
        report = run_campaign(config, progress=say)
    except ValueError as exc:
        print(f"campaign: {exc}", file=sys.stderr)
        return 2
    out.write(report.format() + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
