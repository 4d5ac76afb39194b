"""The sweep fan-out (handlers/scheduler.py): one deduplicated job per portal, constant memory."""

from __future__ import annotations

import gc
import hashlib
import json
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fixtures.aws import MEMBER_ID, AwsAccount, Stdout, load_event

from b24_cleanup import runtime
from b24_cleanup.errors import EnqueueFailedError
from b24_cleanup.handlers import scheduler
from b24_cleanup.handlers.scheduler import scheduled_time_of
from b24_cleanup.queue import BATCH_SIZE, JobQueue

SCHEDULED = "2026-11-25T02:00:00Z"


@pytest.fixture(autouse=True)
def _fresh_scheduler() -> Iterator[None]:
    runtime.reset()
    yield
    runtime.reset()


def member_ids(n: int) -> list[str]:
    """n member ids, the sample events' portal first."""
    # (Not md5 of the bare number: md5("1367") is the sample portal's member id.)
    return [MEMBER_ID] + [hashlib.sha256(f"portal-{i}".encode()).hexdigest()[:32] for i in range(1, n)]


def seed(aws: AwsAccount, n: int) -> list[str]:
    ids = member_ids(n)
    for member_id in ids[1:]:
        aws.put_portal(member_id, "token-" + member_id)
    return ids


def sweep_dedup(member_id: str, scheduled_time: str = SCHEDULED) -> str:
    return hashlib.sha256(f"sweep:{member_id}:{scheduled_time}".encode()).hexdigest()


def scheduler_metrics(stdout: Stdout) -> dict[str, float]:
    for blob in stdout.emf():
        (directive,) = blob["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "B24Cleanup"
        assert directive["Dimensions"] == [["action"]]
        assert blob["action"] == "scheduler"
    return stdout.metric_values()


class BatchSizes(list):
    """The number of entries of every SendMessageBatch call made by a client."""

    def watch(self, client: Any) -> BatchSizes:
        client.meta.events.register(
            "before-parameter-build.sqs.SendMessageBatch", lambda params, **_: self.append(len(params["Entries"]))
        )
        return self


# -- the real handler on moto --------------------------------------------------------------------


@pytest.mark.slow
def test_2500_portals_one_job_each_in_batches_of_ten_and_a_retried_run_adds_nothing(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, api_calls: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = seed(mock_aws, 2_500)
    calls = api_calls.watch(runtime.store().client)
    fifo = FakeSqs()
    monkeypatch.setattr(runtime, "sqs", lambda: fifo)

    result = scheduler.lambda_handler(load_event("scheduler.json"), lambda_context)

    assert result == {"enqueued": 2_500, "scheduled_time": SCHEDULED}
    assert fifo.call_count == 250
    assert {len(call) for call in fifo.calls} == {BATCH_SIZE}
    # One read of the declared set; portals are listed (paginated), never read or decrypted one by one.
    assert calls.count("ssm.GetParameter") == 1
    assert calls.count("ssm.DescribeParameters") >= 2_500 // 50
    assert set(calls) == {"ssm.GetParameter", "ssm.DescribeParameters"}
    assert scheduler_metrics(stdout) == {"PortalsEnqueued": 2_500}

    assert len(fifo.messages) == 2_500
    assert sorted(fifo.accepted_ids) == sorted(ids)
    for dedup_id, entry in fifo.messages.items():
        member_id = entry["MessageGroupId"]
        assert json.loads(entry["MessageBody"]) == {"action": "sweep", "member_id": member_id}
        assert dedup_id == sweep_dedup(member_id)

    # A retried run of the same schedule sends the same deduplication ids: nothing new is queued.
    again = scheduler.lambda_handler(load_event("scheduler.json"), lambda_context)
    assert again == result
    assert fifo.accepted == 5_000
    assert len(fifo.messages) == 2_500


def test_on_moto_sqs_one_message_per_portal_and_fifo_dedup_on_a_retried_run(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, api_calls: Any
) -> None:
    ids = seed(mock_aws, 57)
    calls = api_calls.watch(runtime.store().client, runtime.sqs())
    sizes = BatchSizes().watch(runtime.sqs())

    assert scheduler.lambda_handler(load_event("scheduler.json"), lambda_context)["enqueued"] == 57
    assert sizes == [10] * 5 + [7]
    assert calls.count("sqs.SendMessageBatch") == 6
    # moto implements FIFO deduplication ids (five minutes): a retried run queues nothing new.
    assert scheduler.lambda_handler(load_event("scheduler.json"), lambda_context)["enqueued"] == 57
    assert mock_aws.queue_depth() == 57

    messages = mock_aws.receive_all()
    assert sorted(json.loads(m["Body"])["member_id"] for m in messages) == sorted(ids)
    for message in messages:
        member_id = json.loads(message["Body"])["member_id"]
        assert json.loads(message["Body"]) == {"action": "sweep", "member_id": member_id}
        assert message["Attributes"]["MessageGroupId"] == member_id
        assert message["Attributes"]["MessageDeduplicationId"] == sweep_dedup(member_id)
    assert scheduler_metrics(stdout) == {"PortalsEnqueued": 114}


def test_another_schedule_is_a_new_run(mock_aws: AwsAccount, lambda_context: Any) -> None:
    seed(mock_aws, 25)
    scheduler.lambda_handler({"scheduled_time": SCHEDULED}, lambda_context)
    scheduler.lambda_handler({"scheduled_time": "2026-11-26T02:00:00Z"}, lambda_context)
    assert mock_aws.queue_depth() == 50


def test_manual_invoke_uses_the_current_minute(
    mock_aws: AwsAccount, lambda_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:
            return datetime(2026, 11, 25, 9, 41, 59, 987654, tzinfo=UTC)

    monkeypatch.setattr(scheduler, "datetime", FrozenClock)
    seed(mock_aws, 3)
    result = scheduler.lambda_handler({}, lambda_context)
    assert result == {"enqueued": 3, "scheduled_time": "2026-11-25T09:41:00Z"}
    for message in mock_aws.receive_all():
        member_id = json.loads(message["Body"])["member_id"]
        assert message["Attributes"]["MessageDeduplicationId"] == sweep_dedup(member_id, "2026-11-25T09:41:00Z")
    # A second manual invoke within the same minute is the same run.
    scheduler.lambda_handler({}, lambda_context)
    assert mock_aws.queue_depth() == 3


def test_no_portals_enqueues_nothing(mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout) -> None:
    mock_aws.ssm.delete_parameter(Name=mock_aws.portal_name(MEMBER_ID))
    assert scheduler.lambda_handler(load_event("scheduler.json"), lambda_context)["enqueued"] == 0
    assert mock_aws.queue_depth() == 0
    # A run over no portals still reports that it ran (design §6: every invocation that did work
    # emits at least one metric).
    assert scheduler_metrics(stdout) == {"PortalsEnqueued": 0.0}


@pytest.mark.parametrize(
    "declared",
    [
        None,  # missing
        "  ",  # SSM refuses an empty value; blank is the closest
        "not json",
        "{}",
        '{"handlers": []}',
        json.dumps(
            {
                "handlers": [
                    {"event": "ONCRMLEADADD", "handler": "https://app.example.com/b24/events"},
                    {"event": "ONCRMDEALUPDATE", "event_type": "offline", "handler": "https://x.example/"},
                ]
            }
        ),
        json.dumps({"handlers": [{"event": "ONCRMLEADADD", "handler": "ftp://app.example.com/"}]}),
    ],
)
def test_invalid_declared_set_enqueues_nothing(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, api_calls: Any, declared: str | None
) -> None:
    seed(mock_aws, 5)
    mock_aws.put_declared(declared)
    calls = api_calls.watch(runtime.store().client, runtime.sqs())

    result = scheduler.lambda_handler(load_event("scheduler.json"), lambda_context)

    assert result["enqueued"] == 0
    assert result["declared_set_invalid"] is True
    assert result["scheduled_time"] == SCHEDULED
    assert mock_aws.queue_depth() == 0
    assert calls == ["ssm.GetParameter"]  # not even the listing
    assert scheduler_metrics(stdout) == {"DeclaredSetInvalid": 1}
    (line,) = [log for log in stdout.logs() if log["level"] == "ERROR"]
    assert line["reason"]
    assert "declared" in line["message"]


def test_a_listing_failure_fails_the_run_loudly(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(mock_aws, 120)
    store = runtime.store()
    real = store.iter_member_ids

    def broken_after_60() -> Iterator[str]:
        for index, member_id in enumerate(real()):
            if index == 60:
                raise RuntimeError("listing broke")
            yield member_id

    monkeypatch.setattr(store, "iter_member_ids", broken_after_60)
    with pytest.raises(EnqueueFailedError) as caught:
        scheduler.lambda_handler(load_event("scheduler.json"), lambda_context)
    assert caught.value.sent == 60
    assert mock_aws.queue_depth() == 60
    assert scheduler_metrics(stdout) == {"PortalsEnqueued": 60}


# -- the fan-out core with a fake SQS ------------------------------------------------------------------


class FakeSqs:
    """An in-memory FIFO queue's SendMessageBatch: deduplicates like SQS, can report entries as Failed.

    moto's SQS recomputes queue attributes over every stored message for every message sent, so
    2,500 messages take minutes there; the scale test uses this stand-in (with moto's SSM for the
    listing) and a smaller test checks the same on moto's SQS.
    """

    def __init__(self, fail: dict[int, int] | None = None, sender_fault: bool = False, keep: bool = True) -> None:
        self.fail = dict(fail or {})  # call number → how many entries to fail in that call
        self.sender_fault = sender_fault
        self.keep = keep  # False: remember nothing per message (memory measurements)
        self.call_count = 0
        self.calls: list[list[str]] = []  # the member ids of every call (when keeping)
        self.accepted = 0  # entries reported successful, duplicates included
        self.messages: dict[str, dict[str, str]] = {}  # deduplication id → first entry

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict[str, Any]:
        assert 1 <= len(Entries) <= BATCH_SIZE
        assert len({entry["Id"] for entry in Entries}) == len(Entries)
        number = self.call_count
        self.call_count += 1
        if self.keep:
            self.calls.append([entry["MessageGroupId"] for entry in Entries])
        failing = Entries[: self.fail.get(number, 0)]
        failed = [{"Id": entry["Id"], "SenderFault": self.sender_fault, "Code": "InternalError"} for entry in failing]
        ok = Entries[len(failing) :]
        self.accepted += len(ok)
        if self.keep:
            for entry in ok:
                self.messages.setdefault(entry["MessageDeduplicationId"], entry)
        return {"Successful": [{"Id": entry["Id"]} for entry in ok], "Failed": failed}

    @property
    def accepted_ids(self) -> list[str]:
        return [entry["MessageGroupId"] for entry in self.messages.values()]


def no_sleep(_: float) -> None:
    return None


def test_failed_entries_are_resent_and_only_they() -> None:
    sqs = FakeSqs(fail={0: 3, 1: 1})
    ids = member_ids(25)
    sent = JobQueue(sqs, "queue", sleep=no_sleep).send_sweeps(iter(ids), SCHEDULED)
    assert sent == 25
    assert sorted(sqs.accepted_ids) == sorted(ids)
    assert sqs.calls[0] == ids[:10]
    assert sqs.calls[1] == ids[:3]  # the three failed ones again
    assert sqs.calls[2] == ids[:1]  # ... and the one that failed a second time
    assert sqs.calls[3] == ids[10:20]


def test_entries_that_keep_failing_fail_the_run_after_bounded_retries() -> None:
    sqs = FakeSqs(fail=dict.fromkeys(range(1, 100), 2))
    slept: list[float] = []
    with pytest.raises(EnqueueFailedError, match="after 5 attempts") as caught:
        JobQueue(sqs, "queue", sleep=slept.append).send_sweeps(iter(member_ids(40)), SCHEDULED)
    assert caught.value.sent == 10  # the first batch went through
    assert len(sqs.calls) == 1 + 5
    assert len(slept) == 4
    assert all(0 < pause <= 3 for pause in slept)


def test_sender_faults_are_not_retried() -> None:
    sqs = FakeSqs(fail={0: 1}, sender_fault=True)
    with pytest.raises(EnqueueFailedError, match="sender"):
        JobQueue(sqs, "queue", sleep=no_sleep).send_sweeps(iter(member_ids(5)), SCHEDULED)
    assert len(sqs.calls) == 1


def test_at_most_one_batch_is_held() -> None:
    sqs = FakeSqs()
    drawn = 0

    def listing() -> Iterator[str]:
        nonlocal drawn
        for member_id in member_ids(1_003):
            # Every id drawn beyond one batch ahead of what was sent would be buffered memory.
            assert drawn - sqs.accepted <= BATCH_SIZE
            drawn += 1
            yield member_id

    assert JobQueue(sqs, "queue").send_sweeps(listing(), SCHEDULED) == 1_003
    assert [len(call) for call in sqs.calls] == [10] * 100 + [3]


def _peak_bytes(n: int) -> int:
    sqs = FakeSqs(keep=False)

    def listing() -> Iterator[str]:
        for i in range(n):
            yield f"{i:032x}"

    gc.collect()
    tracemalloc.start()
    try:
        assert JobQueue(sqs, "queue").send_sweeps(listing(), SCHEDULED) == n
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_portals() -> None:
    small, large = _peak_bytes(500), _peak_bytes(2_500)
    huge = _peak_bytes(25_000)
    # Proportional growth would be 5x and 50x; a buffer of ten entries stays put. The slack absorbs
    # allocator noise without letting a list of ids (25,000 x ~100 bytes) through.
    assert large < 2 * small + 64 * 1024
    assert huge < 2 * small + 64 * 1024


# -- the scheduled time ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"scheduled_time": "2026-11-25T02:00:00Z"}, "2026-11-25T02:00:00Z"),
        ({"scheduled_time": "2026-11-25T02:00:00+00:00"}, "2026-11-25T02:00:00Z"),
        ({"scheduled_time": "2026-11-25T05:00:00+03:00"}, "2026-11-25T02:00:00Z"),
        ({"scheduled_time": "2026-11-25T02:00:00.250Z"}, "2026-11-25T02:00:00Z"),
        ({"scheduled_time": "2026-11-25T02:00:00"}, "2026-11-25T02:00:00Z"),  # naive: UTC
        ({}, "2026-11-25T09:41:00Z"),
        ({"scheduled_time": None}, "2026-11-25T09:41:00Z"),
        ({"scheduled_time": ""}, "2026-11-25T09:41:00Z"),
        (None, "2026-11-25T09:41:00Z"),
    ],
)
def test_scheduled_time(event: Any, expected: str) -> None:
    now = datetime(2026, 11, 25, 9, 41, 59, 999999, tzinfo=UTC)
    assert scheduled_time_of(event, now=now) == expected


@pytest.mark.parametrize("event", [{"scheduled_time": "yesterday"}, {"scheduled_time": 1795572000}, ["x"]])
def test_a_broken_scheduled_time_fails_loudly(event: Any) -> None:
    with pytest.raises(ValueError, match=r"scheduled_time|scheduler event"):
        scheduled_time_of(event)


def test_sweep_every_n_nights_queues_each_portal_once_in_n_nights(
    mock_aws: AwsAccount, lambda_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B24_SWEEP_EVERY_NIGHTS=7: each night queues exactly design §4's shard; seven nights queue everyone once."""
    from b24_cleanup.sharding import due_tonight

    ids = seed(mock_aws, 70)
    monkeypatch.setenv("B24_SWEEP_EVERY_NIGHTS", "7")
    runtime.reset()
    queued: list[str] = []
    for night in range(7):
        scheduled = f"2026-12-{1 + night:02d}T02:00:00Z"
        before = len(queued)
        result = scheduler.lambda_handler({"scheduled_time": scheduled}, lambda_context)
        tonight_ids = [json.loads(m["Body"])["member_id"] for m in mock_aws.receive_all()]
        queued += tonight_ids
        assert result["enqueued"] == len(tonight_ids) == len(queued) - before
        assert sorted(tonight_ids) == sorted(m for m in ids if due_tonight(m, scheduled, 7))
    assert sorted(queued) == sorted(ids)
