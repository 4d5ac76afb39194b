"""The portal job queue (SQS FIFO): every job is sent from here, as every SSM call is made in store.py.

Two paths (design §5): the endpoint's one uninstall job (`SendMessage`, deduplicated by member_id
and `ts`, so the same event delivered twice is queued once) and the scheduler's fan-out of sweep
jobs (`SendMessageBatch`, ten a call, deduplicated by member_id and the run's scheduled time, so a
retried run queues no portal twice). Both put a portal's jobs in its own FIFO message group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from .errors import EnqueueFailedError
from .jobs import Action, Job

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.type_defs import SendMessageBatchRequestEntryTypeDef

log = logging.getLogger(__name__)

BATCH_SIZE = 10  # SendMessageBatch's maximum
MAX_SEND_ATTEMPTS = 5  # per batch, for the entries SQS reports as Failed (call-level errors: botocore)


def uninstall_dedup_id(member_id: str, ts: str | None, *, now: Callable[[], float] | None = None) -> str:
    """FIFO deduplication id of an uninstall: the same event delivered twice is queued once."""
    # Bitrix24 always sends `ts`; should it be missing, the current second stands in for it, so
    # that only a repeat within the same second is merged (rather than every later uninstall of
    # the portal within SQS's five-minute window).
    stamp = ts if ts is not None else str(int((now or time.time)()))
    return hashlib.sha256(f"uninstall:{member_id}:{stamp}".encode()).hexdigest()


def sweep_dedup_id(member_id: str, scheduled_time: str) -> str:
    """FIFO deduplication id of one portal's sweep job in one run."""
    return hashlib.sha256(f"sweep:{member_id}:{scheduled_time}".encode()).hexdigest()


def _body(job: Job) -> str:
    return json.dumps(job.to_message(), separators=(",", ":"))


class JobQueue:
    """Sends portal jobs to one FIFO queue."""

    def __init__(
        self,
        sqs: SQSClient,
        queue_url: str,
        *,
        max_attempts: int = MAX_SEND_ATTEMPTS,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.max_attempts = max_attempts
        self.sleep = sleep
        self.now = now

    def send_uninstall(self, job: Job) -> None:
        """One SendMessage: the uninstall job of design §5 on the portal's FIFO group.

        Raises EnqueueFailedError when SQS (after botocore's own retries) did not take it.
        """
        try:
            self.sqs.send_message(
                QueueUrl=self.queue_url,
                MessageBody=_body(job),
                MessageGroupId=job.member_id,
                MessageDeduplicationId=uninstall_dedup_id(job.member_id, job.ts, now=self.now),
            )
        except (ClientError, BotoCoreError) as exc:
            raise EnqueueFailedError(f"sending the uninstall job failed: {type(exc).__name__}") from None

    def send_sweeps(self, member_ids: Iterable[str], scheduled_time: str) -> int:
        """Queue one sweep job per member id, ten per SendMessageBatch; return how many SQS accepted.

        Consumes `member_ids` lazily and holds at most one batch: memory does not grow with the
        number of portals. "Accepted" includes jobs SQS deduplicated against an earlier attempt.
        Raises EnqueueFailedError carrying `sent`, the jobs accepted before it stopped (they stay
        queued; a retried run with the same scheduled time is deduplicated by SQS).
        """
        sent = 0
        buffer: list[SendMessageBatchRequestEntryTypeDef] = []
        try:
            for member_id in member_ids:
                buffer.append(_sweep_entry(len(buffer), member_id, scheduled_time))
                if len(buffer) == BATCH_SIZE:
                    self._send_batch(buffer)
                    sent += len(buffer)
                    buffer = []
            if buffer:
                self._send_batch(buffer)
                sent += len(buffer)
        except EnqueueFailedError as exc:
            raise EnqueueFailedError(str(exc), sent) from None
        except Exception as exc:
            # Listing (SSM) or sending (SQS, after botocore's own retries) failed: keep the count of
            # what was queued for the metric, and the original error as the cause.
            raise EnqueueFailedError(f"sweep fan-out stopped: {type(exc).__name__}: {exc}", sent) from exc
        return sent

    def _send_batch(self, entries: list[SendMessageBatchRequestEntryTypeDef]) -> None:
        """Send up to ten entries, resending only those SQS reports as `Failed` (bounded, with jitter)."""
        pending = entries
        for attempt in range(1, self.max_attempts + 1):
            answer = self.sqs.send_message_batch(QueueUrl=self.queue_url, Entries=pending)
            failed = answer.get("Failed") or []
            if not failed:
                return
            codes = sorted({str(item.get("Code", "")) for item in failed})
            if any(item.get("SenderFault") for item in failed):
                # The request itself is wrong (a bug or a misconfigured queue): resending cannot help.
                raise EnqueueFailedError(f"SQS refused {len(failed)} sweep job(s) as sender faults: {codes}")
            by_id = {entry["Id"]: entry for entry in pending}
            pending = [by_id[item["Id"]] for item in failed if item.get("Id") in by_id]
            if not pending:
                return
            log.warning("sweep jobs not accepted, retrying", extra={"failed": len(pending), "codes": codes})
            if attempt < self.max_attempts:
                self.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + random.random()))  # jitter
        raise EnqueueFailedError(f"{len(pending)} sweep job(s) still not accepted after {self.max_attempts} attempts")


def _sweep_entry(index: int, member_id: str, scheduled_time: str) -> SendMessageBatchRequestEntryTypeDef:
    return {
        "Id": str(index),
        "MessageBody": _body(Job(Action.SWEEP, member_id)),
        "MessageGroupId": member_id,
        "MessageDeduplicationId": sweep_dedup_id(member_id, scheduled_time),
    }
