"""The job queue (queue.py) on moto's SQS FIFO: dedup ids, message groups, partial-failure retry."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from b24_cleanup.errors import EnqueueFailedError
from b24_cleanup.jobs import Action, Job
from b24_cleanup.queue import JobQueue, sweep_dedup_id, uninstall_dedup_id

MEMBER = "a223c6b3710f85df22e9377d6c4f7553"
SCHEDULED = "2026-11-25T02:00:00Z"


@pytest.fixture
def sqs() -> Iterator[Any]:
    # Fake credentials and region come from the autouse fixture in tests/fixtures/aws.py.
    with mock_aws():
        yield boto3.client("sqs", region_name="us-east-1")


@pytest.fixture
def queue_url(sqs: Any) -> str:
    attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "false"}
    return sqs.create_queue(QueueName="jobs.fifo", Attributes=attributes)["QueueUrl"]


def received(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while batch := sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=600, MessageSystemAttributeNames=["All"]
    ).get("Messages", []):
        messages.extend(batch)
    return messages


class FlakySqs:
    """The real (moto) client, except that chosen SendMessageBatch calls report their first entries
    as Failed without sending them, as SQS does for entries it could not take."""

    def __init__(self, sqs: Any, fail: dict[int, int], sender_fault: bool = False) -> None:
        self.sqs, self.fail, self.sender_fault = sqs, fail, sender_fault
        self.calls: list[list[str]] = []

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict[str, Any]:
        failing = Entries[: self.fail.get(len(self.calls), 0)]
        self.calls.append([entry["MessageGroupId"] for entry in Entries])
        rest = Entries[len(failing) :]
        answer = dict(self.sqs.send_message_batch(QueueUrl=QueueUrl, Entries=rest)) if rest else {"Successful": []}
        failed = [{"Id": e["Id"], "SenderFault": self.sender_fault, "Code": "InternalError"} for e in failing]
        return {**answer, "Failed": failed}


def ids(n: int) -> list[str]:
    return [hashlib.sha256(f"portal-{i}".encode()).hexdigest()[:32] for i in range(n)]


def test_uninstall_dedup_id_is_member_and_ts() -> None:
    expected = hashlib.sha256(f"uninstall:{MEMBER}:1795172400".encode()).hexdigest()
    assert uninstall_dedup_id(MEMBER, "1795172400") == expected
    assert uninstall_dedup_id(MEMBER, None, now=lambda: 1795172400.9) == expected  # the current second


def test_sweep_dedup_id_is_member_and_scheduled_time() -> None:
    assert sweep_dedup_id(MEMBER, SCHEDULED) == hashlib.sha256(f"sweep:{MEMBER}:{SCHEDULED}".encode()).hexdigest()


def test_an_uninstall_delivered_twice_is_queued_once(sqs: Any, queue_url: str) -> None:
    queue = JobQueue(sqs, queue_url)
    job = Job(Action.UNINSTALL, MEMBER, "app-token", True, "1795172400")
    queue.send_uninstall(job)
    queue.send_uninstall(job)
    queue.send_uninstall(Job(Action.UNINSTALL, MEMBER, "app-token", True, "1795172401"))  # a later event

    messages = received(sqs, queue_url)
    assert len(messages) == 2
    first = messages[0]
    assert json.loads(first["Body"]) == job.to_message()
    assert first["Attributes"]["MessageGroupId"] == MEMBER
    assert first["Attributes"]["MessageDeduplicationId"] == uninstall_dedup_id(MEMBER, "1795172400")


def test_an_uninstall_sqs_does_not_take_is_enqueue_failed(sqs: Any) -> None:
    queue = JobQueue(sqs, "https://sqs.us-east-1.amazonaws.com/123456789012/missing.fifo")
    with pytest.raises(EnqueueFailedError, match="sending the uninstall job failed"):
        queue.send_uninstall(Job(Action.UNINSTALL, MEMBER, "app-token"))


def test_sweeps_go_ten_a_call_one_group_each_and_a_retried_run_adds_nothing(sqs: Any, queue_url: str) -> None:
    members = ids(23)
    flaky = FlakySqs(sqs, fail={})
    queue = JobQueue(flaky, queue_url)  # type: ignore[arg-type]
    assert queue.send_sweeps(iter(members), SCHEDULED) == 23
    assert [len(call) for call in flaky.calls] == [10, 10, 3]
    assert queue.send_sweeps(iter(members), SCHEDULED) == 23  # accepted again, deduplicated by SQS

    messages = received(sqs, queue_url)
    assert sorted(json.loads(m["Body"])["member_id"] for m in messages) == sorted(members)
    for message in messages:
        member_id = json.loads(message["Body"])["member_id"]
        assert json.loads(message["Body"]) == {"action": "sweep", "member_id": member_id}
        assert message["Attributes"]["MessageGroupId"] == member_id
        assert message["Attributes"]["MessageDeduplicationId"] == sweep_dedup_id(member_id, SCHEDULED)


def test_failed_entries_are_resent_with_jitter_and_only_they(sqs: Any, queue_url: str) -> None:
    members = ids(15)
    flaky = FlakySqs(sqs, fail={0: 4, 1: 1})
    slept: list[float] = []
    assert JobQueue(flaky, queue_url, sleep=slept.append).send_sweeps(iter(members), SCHEDULED) == 15  # type: ignore[arg-type]

    assert flaky.calls == [members[:10], members[:4], members[:1], members[10:]]
    assert len(slept) == 2 and all(0 < pause <= 3 for pause in slept)
    assert sorted(json.loads(m["Body"])["member_id"] for m in received(sqs, queue_url)) == sorted(members)


def test_sender_faults_are_not_retried(sqs: Any, queue_url: str) -> None:
    flaky = FlakySqs(sqs, fail={1: 2}, sender_fault=True)
    with pytest.raises(EnqueueFailedError, match="sender faults") as caught:
        JobQueue(flaky, queue_url, sleep=lambda _: None).send_sweeps(iter(ids(25)), SCHEDULED)  # type: ignore[arg-type]
    assert caught.value.sent == 10  # the first batch stays queued
    assert len(flaky.calls) == 2


def test_entries_that_keep_failing_stop_after_bounded_attempts(sqs: Any, queue_url: str) -> None:
    flaky = FlakySqs(sqs, fail=dict.fromkeys(range(10), 1))
    with pytest.raises(EnqueueFailedError, match="after 3 attempts") as caught:
        JobQueue(flaky, queue_url, max_attempts=3, sleep=lambda _: None).send_sweeps(iter(ids(5)), SCHEDULED)  # type: ignore[arg-type]
    assert caught.value.sent == 0
    assert len(flaky.calls) == 3
