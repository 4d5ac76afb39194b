"""The embedded default: the Bitrix24 emulator plus AWS in-process (moto), seeded with one app.

The demo, the integration tests and the benchmarks all run on this, so that what they show is
the same system. Needs the dev extra (moto); nothing here is imported by the Lambda handlers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..dynamostore import DynamoPortalStore, create_table
from ..record import PortalRecord
from ..store import BOTO_CONFIG, PortalStore
from .emulator import App, Emulator, Installation, Portal

if TYPE_CHECKING:
    from .quota import QuotaAws, SsmQuotas

# moto intercepts HTTP through `responses`, which logs every passed-through URL at INFO; the OAuth
# refresh URL carries the client secret and refresh token (design §10.7).
logging.getLogger("responses").setLevel(logging.WARNING)

DEFAULT_PREFIX = "/b24-cleanup/demo"
DEFAULT_TABLE = "b24-cleanup-portals"
REGION = "us-east-1"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",  # moto's fake credentials
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}


@dataclass
class SeededPortal:
    portal: Portal
    installation: Installation

    @property
    def member_id(self) -> str:
        return self.portal.member_id


class Sandbox:
    """An emulator and a moto account holding one app's SSM parameters and job queues."""

    def __init__(self, emulator: Emulator, store: PortalStore, app: App, queue_url: str, dlq_url: str) -> None:
        self.emulator = emulator
        self.store = store
        self.app = app
        self.queue_url = queue_url
        self.dlq_url = dlq_url
        # The quota-faithful SSM when the sandbox was asked for one (ops/quota.py). `store` keeps
        # a direct, unmetered client: seeding and assertions do not spend the handlers' quota.
        self.quota: QuotaAws | None = None

    @property
    def prefix(self) -> str:
        return self.store.prefix

    @property
    def table(self) -> str | None:
        """The DynamoDB table of portal records, when the sandbox stores them there (design §3a)."""
        return self.store.table if isinstance(self.store, DynamoPortalStore) else None

    def new_store(self) -> PortalStore:
        """A store of this sandbox's kind with clients of its own, as a fresh Lambda container has."""
        if self.table:
            return DynamoPortalStore(self.prefix, self.table)
        return PortalStore(self.prefix)

    def env(self, **overrides: str) -> dict[str, str]:
        """The design §4 environment for the handlers, pointed at this sandbox."""
        # The emulator's OAuth server is no trusted host (design §5 step 3): it is configured, as a
        # deployment against an emulator would configure it.
        env = {"B24_SSM_PREFIX": self.prefix, "B24_QUEUE_URL": self.queue_url, "B24_OAUTH_URL": self.emulator.oauth_url}
        if self.table:
            env.update({"B24_STORE": "dynamodb", "B24_TABLE": self.table})
        env.update(overrides)
        return env

    def put_declared(self, handlers: Iterable[Mapping[str, Any]] | str | None) -> None:
        """Store the declared set (a list of entries, raw text, or None to delete it)."""
        name = f"{self.prefix}/app/handlers"
        client = self.store.client
        if handlers is None:
            with suppress(client.exceptions.ParameterNotFound):
                client.delete_parameter(Name=name)
            return
        text = handlers if isinstance(handlers, str) else json.dumps({"handlers": list(handlers)})
        client.put_parameter(Name=name, Value=text, Type="String", Overwrite=True)

    def add_portal(
        self,
        domain: str,
        *,
        member_id: str | None = None,
        handlers: Iterable[Mapping[str, Any]] = (),
        expired: bool = False,
        store: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> SeededPortal:
        """Install the app on a new emulated portal, bind `handlers`, store its record in SSM.

        Each handler is `{"event", "handler"?, "user_id"?, "offline"?, "connector_id"?}`.
        """
        portal = self.emulator.add_portal(domain, member_id)
        installation = self.emulator.install(portal, self.app)
        for row in handlers:
            portal.bind(
                self.app,
                row["event"],
                row.get("handler"),
                user_id=int(row.get("user_id", 0)),
                offline=bool(row.get("offline", False)),
                connector_id=str(row.get("connector_id", "")),
            )
        record = PortalRecord(self.emulator.record_for(installation))
        if expired:
            record.data["expires"] = 1  # long past: the first call must refresh
        record.data.update(extra or {})
        if store:
            self.store.put(portal.member_id, record)
        return SeededPortal(portal, installation)

    def record(self, member_id: str) -> PortalRecord | None:
        return self.store.get(member_id)


@contextmanager
def patched_environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the block, then restore them exactly.

    The process's runtime is reset on the way in and out: settings and clients are read once per
    process, so the block's handlers see the block's environment and nothing of it outlives it.
    """
    from .. import runtime

    saved = {key: os.environ.get(key) for key in values}
    try:
        _apply_environ(values)
        runtime.reset()
        yield
    finally:
        _apply_environ(saved)
        runtime.reset()


def _apply_environ(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextmanager
def sandbox(
    *,
    prefix: str = DEFAULT_PREFIX,
    declared: Iterable[Mapping[str, Any]] | str | None = None,
    emulator: Emulator | None = None,
    ssm_quotas: SsmQuotas | None = None,
    store: str = "ssm",
    **emulator_options: Any,
) -> Iterator[Sandbox]:
    """Start moto and the emulator, seed the app's credentials and declared set, yield a Sandbox.

    `store` is where portal records live, as `B24_STORE` says: `ssm` or `dynamodb` (a table
    `DEFAULT_TABLE` is created; `box.env()` then carries B24_STORE and B24_TABLE).

    `ssm_quotas` meters every SSM client created inside the block at real SSM's rates
    (ops/quota.py; `box.quota` reports what was admitted and throttled). Off by default.
    """
    import boto3
    from moto import mock_aws  # dev dependency, imported only here

    from .atomic import atomic_moto

    atomic_moto()  # writes are one step in AWS, not in moto (ops/atomic.py)
    with patched_environ(FAKE_AWS_ENV), mock_aws():
        ssm = boto3.client("ssm", region_name=REGION, config=BOTO_CONFIG)
        sqs = boto3.client("sqs", region_name=REGION)
        dlq_url = sqs.create_queue(QueueName="b24-cleanup-dlq.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        queue_url = sqs.create_queue(
            QueueName="b24-cleanup-jobs.fifo",
            Attributes={
                "FifoQueue": "true",
                "VisibilityTimeout": "0",
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
            },
        )["QueueUrl"]
        emu = emulator or Emulator(**emulator_options)
        with emu:
            app = emu.add_app()
            if store == "dynamodb":
                dynamodb = boto3.client("dynamodb", region_name=REGION, config=BOTO_CONFIG)
                create_table(dynamodb, DEFAULT_TABLE)
                records: PortalStore = DynamoPortalStore(prefix, DEFAULT_TABLE, dynamodb, ssm=ssm)
            elif store == "ssm":
                records = PortalStore(prefix, client=ssm)
            else:
                raise ValueError(f"unknown store {store!r}: ssm or dynamodb")
            ssm.put_parameter(
                Name=f"{prefix}/app/credentials",
                Value=json.dumps({"client_id": app.client_id, "client_secret": app.client_secret}),
                Type="SecureString",
            )
            box = Sandbox(emu, records, app, queue_url, dlq_url)
            if declared is not None:
                box.put_declared(declared)
            if ssm_quotas is None:
                yield box
                return
            from .quota import ssm_quotas as metered  # imports this module: not at the top

            with metered(ssm_quotas) as quota:
                box.quota = quota
                yield box


def sqs_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The event the SQS event source hands to the worker for received messages."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": {},
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            }
            for m in messages
        ]
    }


def drain(
    sqs: Any,
    queue_url: str,
    handler: Callable[[dict[str, Any], Any], dict[str, Any]],
    context: Any,
    *,
    max_rounds: int = 100,
) -> int:
    """Deliver the queue to `handler` as the SQS event source would, until it is empty.

    Failed records stay on the queue and come back (moto moves them to the DLQ after
    maxReceiveCount receives). Returns the number of handler invocations.
    """
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    rounds = 0
    while rounds < max_rounds:
        got = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, AttributeNames=["All"])
        messages = got.get("Messages", [])
        if not messages:
            break
        rounds += 1
        answer = handler(sqs_event(messages, arn), context)
        failed = {item["itemIdentifier"] for item in answer.get("batchItemFailures", [])}
        done = [m for m in messages if m["MessageId"] not in failed]
        for i in range(0, len(done), 10):
            sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(done[i : i + 10])],
            )
    return rounds


class ResultLog(logging.Handler):
    """Collects the engine's per-job summaries (its log records carry `job`)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.jobs: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        job = getattr(record, "job", None)
        if isinstance(job, dict):
            self.jobs.append(dict(job))


@contextmanager
def collect_results() -> Iterator[ResultLog]:
    log = logging.getLogger("b24_cleanup.engine")
    handler = ResultLog()
    log.addHandler(handler)
    previous = log.level
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(previous)
