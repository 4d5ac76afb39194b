"""Sweeps at the AWS limit (issue 15): a night's refreshes through the real handlers, SSM at its quota.

Every other table runs on moto, which has no quotas. Here SSM answers as real SSM does beyond
`write_rate` writes/s and 40 reads/s (ops/quota.py: ThrottlingException "Rate exceeded" on the
real wire, so botocore's adaptive retries and the workers' write pacing meet what production
meets). N portals with expired access tokens (each must refresh: one OAuth call and one record
write) and one orphan each go scheduler → SQS FIFO → worker, the worker fed by `containers`
pollers of 10 messages like the event source's MaximumConcurrency. Then, per store:

    quota: store=ssm portals=N write_rate=Q/s achieved=W/s ratio=W/Q lost=L failed=F dlq=D wall=Ts bound=Bs

`achieved` = portals refreshed and stored ÷ wall; `lost` = stored refresh tokens that no longer
refresh (checked at the OAuth server afterwards); `failed` = jobs that ended `failed` (each is
retried); `dlq` = jobs in the dead-letter queue; `bound` = N ÷ Q. For store=dynamodb the records
have no write quota: `write_rate` is what the Bitrix24 side allows (portals in flight ÷ the
per-portal latency bound, 3 requests at the emulator's latency), `bound` = N ÷ that rate. `ratio`
is bound ÷ wall either way. Goal: ratio ≥ 0.9, lost = 0, dlq = 0. A `quota-cost:` line per store
gives the measured AWS calls per portal that the README's 1k/10k/100k arithmetic uses.

    .venv/bin/python -m bench.quota            # ~1.5 minutes
    .venv/bin/python -m bench.quota --quick    # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

NAME = "quota"
TITLE = "Sweeps at the AWS limit: SSM quota vs the DynamoDB store (issue 15)"

APP_URL = "https://app.example.com/b24/events"
OLD_URL = "https://old-deploy.example.com/b24/events"
DECLARED = [{"event": "ONCRMLEADADD", "handler": APP_URL}]
ROWS = [{"event": "ONCRMLEADADD", "handler": APP_URL}, {"event": "ONCRMLEADADD", "handler": OLD_URL}]
REQUESTS_PER_PORTAL = 3  # OAuth refresh, event.get, one batch: design §5's budget for one orphan pair
SQS_BATCH = 10
SCHEDULED = "2026-12-01T02:00:00Z"
HANDLER_ENV = {
    "POWERTOOLS_SERVICE_NAME": "b24-cleanup",
    "POWERTOOLS_METRICS_NAMESPACE": "B24Cleanup",
    "POWERTOOLS_TRACE_DISABLED": "1",
}


@dataclass(frozen=True)
class Sizes:
    portals: int
    write_rate: float  # SSM PutParameter quota, writes/s (B24_SSM_WRITE_RATE)
    latency: float  # the emulator's latency per request, seconds
    containers: int  # pollers of 10 messages, like MaximumConcurrency
    read_rate: float = 40.0


FULL = Sizes(portals=600, write_rate=10, latency=0.5, containers=5)
QUICK = dataclasses.replace(FULL, portals=40, latency=0.05, containers=2)


@dataclass
class QuotaRun:
    store: str
    portals: int
    write_rate: float
    achieved: float
    lost: int
    failed: int
    dlq: int
    wall: float
    bound: float
    refreshed: int
    calls: Counter[str]
    throttled: int = 0  # SSM calls the quota answered ThrottlingException (botocore retried them)

    @property
    def ratio(self) -> float:
        return self.bound / self.wall if self.wall else 0.0

    def line(self) -> str:
        return (
            f"quota: store={self.store} portals={self.portals} write_rate={self.write_rate:.3g}/s "
            f"achieved={self.achieved:.1f}/s ratio={self.ratio:.2f} lost={self.lost} failed={self.failed} "
            f"dlq={self.dlq} wall={self.wall:.1f}s bound={self.bound:.1f}s"
        )

    def cost_line(self) -> str:
        per = {op: n / self.portals for op, n in sorted(self.calls.items())}
        text = " ".join(f"{op}={n:.2f}" for op, n in per.items())
        return f"quota-cost: store={self.store} per-portal {text} ssm-throttled={self.throttled}"


class _AwsCalls:
    """Counts every AWS call of clients the default boto3 session creates (the handlers')."""

    def __init__(self) -> None:
        import boto3

        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._session = boto3._get_default_session()
        self._session.events.register("before-call.*.*", self._count, unique_id="bench-quota-calls")

    def _count(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.calls[f"{model.service_model.service_name}.{model.name}"] += 1

    def close(self) -> None:
        self._session.events.unregister("before-call.*.*", unique_id="bench-quota-calls")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The handlers print a JSON log line per job and EMF per invocation: not to the terminal."""
    from b24_cleanup.handlers.observability import logger

    sink = open(os.devnull, "w")  # noqa: SIM115 - closed below
    saved = [(h, h.stream) for h in logger.handlers if hasattr(h, "stream")]
    for handler, _ in saved:
        handler.stream = sink  # type: ignore[attr-defined]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for handler, stream in saved:
            handler.stream = stream  # type: ignore[attr-defined]
        sink.close()


def _pump(sqs: Any, queue_url: str, arn: str, handler: Any, context: Any, stop: threading.Event) -> None:
    """One event-source poller: receive up to 10, invoke the worker, delete what succeeded."""
    from b24_cleanup.ops.sandbox import sqs_event

    while not stop.is_set():
        got = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=SQS_BATCH, AttributeNames=["All"], VisibilityTimeout=300
        )
        messages = got.get("Messages", [])
        if not messages:
            time.sleep(0.05)
            continue
        answer = handler(sqs_event(messages, arn), context)
        failed = {item["itemIdentifier"] for item in answer.get("batchItemFailures", [])}
        done = [m for m in messages if m["MessageId"] not in failed]
        if done:
            sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(done)],
            )
        back = [m for m in messages if m["MessageId"] in failed]
        if back:  # the event source makes them visible again after the visibility timeout
            sqs.change_message_visibility_batch(
                QueueUrl=queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                    for n, m in enumerate(back)
                ],
            )


def _depth(sqs: Any, queue_url: str) -> int:
    attrs = sqs.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def run_once(store: str, sizes: Sizes) -> QuotaRun:
    import boto3

    from b24_cleanup.handlers import scheduler, worker
    from b24_cleanup.oauth import OAuthClient
    from b24_cleanup.ops.functionurl import FakeContext
    from b24_cleanup.ops.quota import SsmQuotas
    from b24_cleanup.ops.sandbox import REGION, collect_results, patched_environ, sandbox

    quotas = SsmQuotas(read=sizes.read_rate, write=sizes.write_rate)
    with sandbox(declared=DECLARED, store=store, ssm_quotas=quotas, latency=sizes.latency) as box:
        box.emulator.latency = 0.0  # seeding is not what is measured
        seeded = [box.add_portal(f"p{i:05d}.bitrix24.test", handlers=ROWS, expired=True) for i in range(sizes.portals)]
        seeded_tokens = {s.member_id: box.record(s.member_id).refresh_token for s in seeded}  # type: ignore[union-attr]
        box.emulator.latency = sizes.latency
        env = box.env(
            B24_SSM_WRITE_RATE=f"{sizes.write_rate:g}",
            # One process drives every poller, so it is one container holding the whole budget.
            B24_WORKER_CONCURRENCY="1",
        )
        sqs = boto3.client("sqs", region_name=REGION)
        arn = sqs.get_queue_attributes(QueueUrl=box.queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        context = FakeContext("b24-cleanup-worker")
        assert box.quota is not None
        box.quota.reset_stats()
        counter = _AwsCalls()
        stop = threading.Event()
        try:
            with patched_environ({**HANDLER_ENV, **env}), _quiet(), collect_results() as results:
                started = time.perf_counter()
                scheduler.lambda_handler({"scheduled_time": SCHEDULED}, context)
                pollers = [
                    threading.Thread(
                        target=_pump, args=(sqs, box.queue_url, arn, worker.lambda_handler, context, stop), daemon=True
                    )
                    for _ in range(sizes.containers)
                ]
                for poller in pollers:
                    poller.start()
                while _depth(sqs, box.queue_url) > 0:
                    time.sleep(0.2)
                wall = time.perf_counter() - started
                stop.set()
                for poller in pollers:
                    poller.join(60)
        finally:
            counter.close()

        box.emulator.latency = 0.0
        records = {s.member_id: box.record(s.member_id) for s in seeded}
        refreshed = sum(1 for m, r in records.items() if r is not None and r.refresh_token != seeded_tokens[m])
        credentials = box.store.app_credentials()

        def alive(member_id: str) -> bool:
            record = records[member_id]
            if record is None:
                return False
            try:
                OAuthClient(credentials).refresh(box.emulator.oauth_url, record.refresh_token)
            except Exception:
                return False
            return True

        with ThreadPoolExecutor(8) as pool:
            lost = sum(1 for ok in pool.map(alive, list(records)) if not ok)
        dlq = int(
            sqs.get_queue_attributes(QueueUrl=box.dlq_url, AttributeNames=["ApproximateNumberOfMessages"])[
                "Attributes"
            ]["ApproximateNumberOfMessages"]
        )
        failed = sum(1 for job in results.jobs if job.get("outcome") == "failed")
        throttled = sum(box.quota.throttled(kind) for kind in ("read", "write", "describe"))

    if store == "ssm":
        rate = sizes.write_rate
    else:
        in_flight = min(sizes.portals, sizes.containers * SQS_BATCH)
        rate = in_flight / (REQUESTS_PER_PORTAL * sizes.latency)
    return QuotaRun(
        store=store,
        portals=sizes.portals,
        write_rate=rate,
        achieved=refreshed / wall,
        lost=lost,
        failed=failed,
        dlq=dlq,
        wall=wall,
        bound=sizes.portals / rate,
        refreshed=refreshed,
        calls=counter.calls,
        throttled=throttled,
    )


def measure(sizes: Sizes, runs: int) -> None:
    """One run per store (`runs` is ignored: each run is a minute of a night at the limit)."""
    del runs
    print(f"\n{TITLE}")
    print(
        f"  {sizes.portals} portals, expired tokens, one orphan each; SSM {sizes.write_rate:g} writes/s, "
        f"{sizes.read_rate:g} reads/s; {sizes.containers} pollers x {SQS_BATCH}; emulator latency {sizes.latency} s"
    )
    for store in ("ssm", "dynamodb"):
        result = run_once(store, sizes)
        print(result.line())
        print(result.cost_line())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quota", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes: seconds instead of a minute")
    args = parser.parse_args(argv)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SSM", "AWS_ENDPOINT_URL_SQS", "AWS_PROFILE"):
        os.environ.pop(key, None)  # the sandbox's moto must intercept every call
    measure(QUICK if args.quick else FULL, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
