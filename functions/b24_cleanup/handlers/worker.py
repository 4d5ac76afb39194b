"""Worker: SQS FIFO event source, one portal job per record (design §5 "Worker").

Records of one message group (one portal) run in order through Powertools'
SqsFifoPartialProcessor with `skip_group_on_error`: after a failed job, the later jobs of that
portal are handed back unprocessed. Different portals of a batch run concurrently.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aws_lambda_powertools.utilities.batch import SqsFifoPartialProcessor, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from .. import runtime
from ..errors import JobFailedError
from ..jobs import Job, JobResult
from .observability import logger, metrics, publish

MAX_PARALLEL_PORTALS = 10
# Stop starting portal requests this long before the invocation times out (one REST request's
# own timeout plus room to write the results): a job cut short fails cleanly and is retried.
DEADLINE_MARGIN_SECONDS = 35.0


class _Totals:
    """Metric values per action, added up across the batch's threads."""

    def __init__(self) -> None:
        self.by_action: dict[str, Counter[str]] = defaultdict(Counter)
        self._lock = threading.Lock()

    def add(self, result: JobResult) -> None:
        with self._lock:
            self.by_action[result.action.value].update(result.metrics())


def _run_group(records: list[dict[str, Any]], totals: _Totals, context: LambdaContext | None) -> list[str]:
    """Run one portal's records in order; return the message ids to hand back."""
    deadline, ends_at = _deadline(context), _ends_at(context)

    def record_handler(record: SQSRecord) -> str:
        try:
            job = Job.parse(record.body)
        except ValueError as exc:
            logger.error(
                "bad job body; the record fails and ends in the DLQ",
                extra={"message_id": record.message_id, "reason": str(exc)},
            )
            raise
        try:
            result = runtime.engine().run(job, deadline=deadline, ends_at=ends_at)
        except JobFailedError as failed:
            totals.add(failed.result)
            raise
        totals.add(result)
        return result.outcome.value

    processor = SqsFifoPartialProcessor(skip_group_on_error=True)
    processor.raise_on_entire_batch_failure = False
    response = process_partial_response(
        event={"Records": records}, record_handler=record_handler, processor=processor, context=context
    )
    return [str(item["itemIdentifier"]) for item in response.get("batchItemFailures", [])]


def _ends_at(context: LambdaContext | None) -> float | None:
    """When the invocation times out (time.monotonic()), or None without a Lambda context."""
    try:
        remaining = context.get_remaining_time_in_millis() / 1000.0  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        return None
    return time.monotonic() + max(0.0, remaining)


def _deadline(context: LambdaContext | None) -> float | None:
    try:
        remaining = context.get_remaining_time_in_millis() / 1000.0  # type: ignore[union-attr]
    except (AttributeError, TypeError):
        return None  # no Lambda context (CLI, tests): no deadline
    return time.monotonic() + max(0.0, remaining - DEADLINE_MARGIN_SECONDS)


def process(event: dict[str, Any], context: LambdaContext | None = None) -> dict[str, Any]:
    """Process an SQS FIFO batch; the answer lists the records to hand back."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in event.get("Records", []):
        groups[record.get("attributes", {}).get("MessageGroupId", record.get("messageId", ""))].append(record)
    totals = _Totals()
    failed: set[str] = set()
    if groups:
        runtime.engine().new_invocation()  # a declared set fixed (or broken) since the last batch applies now
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_PORTALS, len(groups))) as pool:
            for ids in pool.map(lambda recs: _run_group(recs, totals, context), groups.values()):
                failed.update(ids)
    for action, values in totals.by_action.items():
        publish(action, values)
    # Keep the batch's order in the answer: it reads better in logs and tests.
    ordered = [r["messageId"] for r in event.get("Records", []) if r.get("messageId") in failed]
    return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in ordered]}


# log_event=False whatever POWERTOOLS_LOGGER_LOG_EVENT says: an uninstall job carries the portal's
# application_token, which must never reach a log line (design §7); the endpoint and scheduler do the same.
@logger.inject_lambda_context(log_event=False, clear_state=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return process(event, context)
