"""The nightly sweep's fan-out: one `sweep` job per stored portal (SPEC §5 "Sweep").

EventBridge Scheduler invokes this with the target's `Input`, `{"scheduled_time":
"<aws.scheduler.scheduled-time>"}`, or with `{}` on a manual invoke. The run's scheduled time goes
into every job's deduplication id, so a retried run (same scheduled time, within SQS's five-minute
deduplication window) does not queue a portal twice.

The declared set is checked first: a broken config must never reach the workers' unbind step, and
an invalid set enqueues nothing at all (SPEC §3). Portals are streamed from DescribeParameters
page by page and sent ten at a time, so memory stays constant in the number of portals.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..errors import InvalidDeclaredSet
from ..jobs import Action, Job
from ..planner import DeclaredSet
from .deps import reset as reset_clients  # noqa: F401 - public: tests and the demo reset the handler
from .deps import settings as _settings
from .deps import sqs as _sqs
from .deps import store as _store
from .observability import logger, publish

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.type_defs import SendMessageBatchRequestEntryTypeDef

ACTION = "scheduler"
BATCH_SIZE = 10  # SendMessageBatch's maximum
MAX_SEND_ATTEMPTS = 5  # per batch, for the entries SQS reports as Failed (call-level errors: botocore)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class EnqueueFailed(RuntimeError):
    """The fan-out stopped: some sweep jobs could not be queued, and the run fails loudly.

    `sent` jobs were accepted before it stopped; they stay queued, and a retried run with the
    same scheduled time is deduplicated by SQS (within its five-minute window).
    """

    def __init__(self, message: str, sent: int = 0) -> None:
        super().__init__(message)
        self.sent = sent


def scheduled_time_of(event: object, now: datetime | None = None) -> str:
    """The run's scheduled time as `YYYY-MM-DDTHH:MM:SSZ` (UTC).

    Normalised so that the same instant always yields the same deduplication ids, however the
    Input spelled it. Without one (a manual invoke) it is the current minute: two manual invokes
    within the same minute are then one run.
    """
    if event is None:
        event = {}
    if not isinstance(event, dict):
        raise ValueError("the scheduler event must be a JSON object")
    value = event.get("scheduled_time")
    if value is None or value == "":
        moment = (now or datetime.now(UTC)).astimezone(UTC).replace(second=0, microsecond=0)
        return moment.strftime(TIME_FORMAT)
    if not isinstance(value, str):
        raise ValueError("scheduled_time must be an ISO-8601 string")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"scheduled_time is not an ISO-8601 time: {value[:64]!r}") from None
    if moment.tzinfo is None:  # the scheduler's placeholder always carries Z; naive means UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def sweep_dedup_id(member_id: str, scheduled_time: str) -> str:
    """FIFO deduplication id of one portal's sweep job in one run."""
    return hashlib.sha256(f"sweep:{member_id}:{scheduled_time}".encode()).hexdigest()


def _entry(index: int, member_id: str, scheduled_time: str) -> SendMessageBatchRequestEntryTypeDef:
    return {
        "Id": str(index),
        "MessageBody": json.dumps(Job(Action.SWEEP, member_id).to_message(), separators=(",", ":")),
        "MessageGroupId": member_id,
        "MessageDeduplicationId": sweep_dedup_id(member_id, scheduled_time),
    }


def _send_batch(
    sqs: SQSClient,
    queue_url: str,
    entries: list[SendMessageBatchRequestEntryTypeDef],
    *,
    max_attempts: int,
    sleep: Callable[[float], None],
) -> None:
    """Send up to ten entries, resending only those SQS reports as `Failed` (bounded)."""
    pending = entries
    for attempt in range(1, max_attempts + 1):
        answer = sqs.send_message_batch(QueueUrl=queue_url, Entries=pending)
        failed = answer.get("Failed") or []
        if not failed:
            return
        codes = sorted({str(item.get("Code", "")) for item in failed})
        by_id = {entry["Id"]: entry for entry in pending}
        if any(item.get("SenderFault") for item in failed):
            # The request itself is wrong (a bug or a misconfigured queue): resending cannot help.
            raise EnqueueFailed(f"SQS refused {len(failed)} sweep job(s) as sender faults: {codes}")
        pending = [by_id[item["Id"]] for item in failed if item.get("Id") in by_id]
        if not pending:
            return
        logger.warning("sweep jobs not accepted, retrying", extra={"failed": len(pending), "codes": codes})
        if attempt < max_attempts:
            sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + random.random()))  # jitter
    raise EnqueueFailed(f"{len(pending)} sweep job(s) still not accepted after {max_attempts} attempts")


def enqueue_sweeps(
    member_ids: Iterable[str],
    sqs: SQSClient,
    queue_url: str,
    scheduled_time: str,
    *,
    max_attempts: int = MAX_SEND_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Queue one sweep job per member id, ten per SendMessageBatch; return how many SQS accepted.

    Consumes `member_ids` lazily and holds at most one batch: memory does not grow with the
    number of portals. "Accepted" includes jobs SQS deduplicated against an earlier attempt.
    """
    sent = 0
    buffer: list[SendMessageBatchRequestEntryTypeDef] = []
    try:
        for member_id in member_ids:
            buffer.append(_entry(len(buffer), member_id, scheduled_time))
            if len(buffer) == BATCH_SIZE:
                _send_batch(sqs, queue_url, buffer, max_attempts=max_attempts, sleep=sleep)
                sent += len(buffer)
                buffer = []
        if buffer:
            _send_batch(sqs, queue_url, buffer, max_attempts=max_attempts, sleep=sleep)
            sent += len(buffer)
    except EnqueueFailed as exc:
        raise EnqueueFailed(str(exc), sent) from None
    except Exception as exc:
        # Listing (SSM) or sending (SQS, after botocore's own retries) failed: keep the count of
        # what was queued for the metric, and the original error as the cause.
        raise EnqueueFailed(f"sweep fan-out stopped: {type(exc).__name__}: {exc}", sent) from exc
    return sent


@logger.inject_lambda_context(log_event=False, clear_state=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Check the declared set, then fan out one sweep job per stored portal."""
    scheduled_time = scheduled_time_of(event)
    logger.append_keys(scheduled_time=scheduled_time)
    settings = _settings()
    store = _store()

    try:
        DeclaredSet.parse(store.declared_set_text())
    except InvalidDeclaredSet as exc:
        # Never half-used: no portal is queued, so no worker can unbind anything on its strength.
        logger.error("declared handler set is invalid: no sweep job enqueued", extra={"reason": str(exc)})
        publish(ACTION, {"DeclaredSetInvalid": 1})
        return {"enqueued": 0, "scheduled_time": scheduled_time, "declared_set_invalid": True, "reason": str(exc)}

    queue_url = settings.require_queue()
    try:
        enqueued = enqueue_sweeps(store.iter_member_ids(), _sqs(), queue_url, scheduled_time)
    except EnqueueFailed as exc:
        # Report what did get queued, then fail the run: it is retried, and SQS deduplicates.
        publish(ACTION, {"PortalsEnqueued": exc.sent})
        logger.error("sweep fan-out failed", extra={"enqueued": exc.sent, "reason": str(exc)})
        raise
    publish(ACTION, {"PortalsEnqueued": enqueued})
    logger.info("sweep jobs enqueued", extra={"enqueued": enqueued})
    return {"enqueued": enqueued, "scheduled_time": scheduled_time}
