"""Sweeps at the AWS limit (issue 15): a night's refreshes through the real handlers, SSM at its quota.

Every other table runs on moto, which has no quotas. Here SSM answers as real SSM does beyond
`write_rate` writes/s and 40 reads/s (ops/quota.py: ThrottlingException "Rate exceeded" on the
real wire, so botocore's adaptive retries and the workers' write pacing meet what production
meets). N portals with expired access tokens (each must refresh: one OAuth call and one record
write) and one orphan each go scheduler → SQS FIFO → worker. The worker runs as production runs
it: `containers` processes (the event source's MaximumConcurrency, B24_WORKER_CONCURRENCY), each a
container of its own with its own runtime and write pacer at its share of the rate, each polling
10 messages at a time; AWS is one moto on loopback that every process reaches over HTTP. Then,
per store:

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
import queue
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
    # SSM calls the quota answered ThrottlingException (botocore retried them), per class
    throttled: dict[str, int] = dataclasses.field(default_factory=dict)
    # CPU seconds during the sweep: the process serving moto and the emulator, and all containers
    cpu: dict[str, float] = dataclasses.field(default_factory=dict)
    # the containers' wall seconds: invocations, in the handler, waiting for a batch
    spent: dict[str, float] = dataclasses.field(default_factory=dict)
    fan_out: float = 0.0  # the scheduler's queueing of the night, before the clock starts

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
        throttled = " ".join(f"{kind}={n}" for kind, n in self.throttled.items())
        return f"quota-cost: store={self.store} per-portal {text} ssm-throttled: {throttled}"

    def time_line(self) -> str:
        invocations = self.spent.get("invocations", 0) or 1
        per = " ".join(f"{part}={self.spent.get(part, 0.0) / invocations:.2f}s" for part in ("handler", "waiting"))
        cpu = " ".join(f"{part}={seconds:.1f}s" for part, seconds in self.cpu.items())
        return (
            f"quota-time: store={self.store} fan-out={self.fan_out:.1f}s invocations={int(invocations)} "
            f"per invocation {per} cpu {cpu}"
        )


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


class _EventSource:
    """One container's event source, as Lambda's pollers are: apart from the function.

    A receiver keeps the next batch ready while the function runs the current one, and a settler
    deletes what succeeded (or makes the rest visible again) after it returns, so the function
    waits on neither. SQS answers in milliseconds; moto on loopback scans every queued message per
    call, a cost that would otherwise sit between every two invocations.
    """

    def __init__(self, sqs: Any, queue_url: str, stop: Any, on_done: Any) -> None:
        self.sqs, self.queue_url, self.stop, self.on_done = sqs, queue_url, stop, on_done
        self._ready: queue.Queue[list[dict[str, Any]]] = queue.Queue(maxsize=1)
        self._settle: queue.Queue[tuple[list[dict[str, Any]], set[str]]] = queue.Queue()
        self._wanted = threading.Event()
        self._wanted.set()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._receive, self._settler)]
        for thread in self._threads:
            thread.start()

    def _receive(self) -> None:
        while not self.stop.is_set():
            if not self._wanted.wait(0.1):
                continue
            got = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=SQS_BATCH, AttributeNames=["All"], VisibilityTimeout=300
            )
            messages = got.get("Messages", [])
            if not messages:
                time.sleep(0.1)
                continue
            self._wanted.clear()
            self._ready.put(messages)

    def next_batch(self) -> list[dict[str, Any]] | None:
        """The next batch (and the receiving of the one after starts), or None after 0.2 s without one."""
        try:
            messages = self._ready.get(timeout=0.2)
        except queue.Empty:
            return None
        self._wanted.set()
        return messages

    def settle(self, messages: list[dict[str, Any]], failed: set[str]) -> None:
        self._settle.put((messages, failed))

    def _settler(self) -> None:
        while not (self.stop.is_set() and self._settle.empty()):
            try:
                messages, failed = self._settle.get(timeout=0.1)
            except queue.Empty:
                continue
            done = [m for m in messages if m["MessageId"] not in failed]
            if done:
                self.sqs.delete_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=[{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(done)],
                )
                self.on_done(len(done))
            back = [m for m in messages if m["MessageId"] in failed]
            if back:  # the event source makes them visible again after the visibility timeout
                self.sqs.change_message_visibility_batch(
                    QueueUrl=self.queue_url,
                    Entries=[
                        {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                        for n, m in enumerate(back)
                    ],
                )

    def close(self) -> None:
        for thread in self._threads:
            thread.join(30)


def _pump(source: _EventSource, arn: str, handler: Any, context: Any, stop: Any, spent: Counter[str]) -> None:
    """Invoke the worker with each batch the event source has ready, one at a time (one container).

    `spent` adds up the invocations, the seconds in the handler and the seconds waited for a batch."""
    from b24_cleanup.ops.sandbox import sqs_event

    while not stop.is_set():
        began = time.monotonic()
        messages = source.next_batch()
        if messages is None:
            continue
        invoked = time.monotonic()
        answer = handler(sqs_event(messages, arn), context)
        spent["invocations"] += 1
        spent["handler"] += time.monotonic() - invoked
        spent["waiting"] += invoked - began
        source.settle(messages, {item["itemIdentifier"] for item in answer.get("batchItemFailures", [])})


def _depth(sqs: Any, queue_url: str) -> int:
    attrs = sqs.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


@dataclass(frozen=True)
class _Shared:
    """What the container processes and the bench share: start and stop, and the deletes so far."""

    ready: Any  # a Semaphore each container releases once it is warm
    go: Any
    stop: Any
    deleted: Any  # Value("i"): messages deleted (jobs done)
    last_done: Any  # Value("d"): time.monotonic() of the latest delete (system-wide on Linux)
    out: Any  # Queue: each container's job outcomes and AWS calls


def _container(env: dict[str, str], queue_url: str, arn: str, shared: _Shared) -> None:
    """One worker container (a spawned process): its own runtime, pacer and clients, as in Lambda."""
    os.environ.update(env)
    import boto3

    from b24_cleanup.handlers import worker
    from b24_cleanup.ops.functionurl import FakeContext
    from b24_cleanup.ops.sandbox import collect_results

    sqs = boto3.client("sqs")  # the event source's own client: made before the counter, not counted
    context = FakeContext("b24-cleanup-worker")

    def on_done(count: int) -> None:
        with shared.deleted.get_lock():
            shared.deleted.value += count
            shared.last_done.value = time.monotonic()

    spent: Counter[str] = Counter()
    with _quiet(), collect_results() as results:
        counter = _AwsCalls()
        shared.ready.release()
        shared.go.wait()
        cpu_at_go = time.process_time()
        source = _EventSource(sqs, queue_url, shared.stop, on_done)
        try:
            _pump(source, arn, worker.lambda_handler, context, shared.stop, spent)
        finally:
            source.close()
            counter.close()
            shared.out.put(
                {
                    "outcomes": Counter(str(job.get("outcome")) for job in results.jobs),
                    "calls": counter.calls,
                    "cpu": time.process_time() - cpu_at_go,
                    "spent": spent,
                }
            )


@contextlib.contextmanager
def _containers(count: int, env: dict[str, str], queue_url: str, arn: str) -> Iterator[_Shared]:
    """Start `count` warm container processes; yield once all are ready; stop and join them after."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # the bench process runs threads: no fork
    shared = _Shared(
        ready=ctx.Semaphore(0),
        go=ctx.Event(),
        stop=ctx.Event(),
        deleted=ctx.Value("i", 0),
        last_done=ctx.Value("d", 0.0),
        out=ctx.Queue(),
    )
    processes = [
        ctx.Process(target=_container, args=(env, queue_url, arn, shared), daemon=True, name=f"container-{n}")
        for n in range(count)
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            if not shared.ready.acquire(timeout=120):
                raise RuntimeError("a container process did not start")
        yield shared
    finally:
        shared.stop.set()
        shared.go.set()
        for process in processes:
            process.join(60)
            if process.is_alive():
                process.terminate()


def run_once(store: str, sizes: Sizes) -> QuotaRun:
    import boto3

    from b24_cleanup.handlers import scheduler
    from b24_cleanup.oauth import OAuthClient
    from b24_cleanup.ops.functionurl import FakeContext
    from b24_cleanup.ops.quota import SsmQuotas
    from b24_cleanup.ops.sandbox import FAKE_AWS_ENV, REGION, patched_environ, sandbox

    quotas = SsmQuotas(read=sizes.read_rate, write=sizes.write_rate)
    with sandbox(declared=DECLARED, store=store, ssm_quotas=quotas, latency=sizes.latency) as box:
        box.emulator.latency = 0.0  # seeding is not what is measured
        seeded = [box.add_portal(f"p{i:05d}.bitrix24.test", handlers=ROWS, expired=True) for i in range(sizes.portals)]
        seeded_tokens = {s.member_id: box.record(s.member_id).refresh_token for s in seeded}  # type: ignore[union-attr]
        box.emulator.latency = sizes.latency
        assert box.quota is not None
        env = box.env(
            B24_SSM_WRITE_RATE=f"{sizes.write_rate:g}",
            B24_WORKER_CONCURRENCY=str(sizes.containers),  # one share of the rate per container
        )
        # Every process reaches the one moto over loopback: SSM through the quota, the rest beside it.
        aws = {
            **FAKE_AWS_ENV,
            "AWS_ENDPOINT_URL": box.quota.endpoint_url,
            "AWS_ENDPOINT_URL_SSM": box.quota.endpoint_url,
        }
        sqs = boto3.client("sqs", region_name=REGION)
        arn = sqs.get_queue_attributes(QueueUrl=box.queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        context = FakeContext("b24-cleanup-scheduler")
        outcomes: Counter[str] = Counter()
        calls: Counter[str] = Counter()
        spent: Counter[str] = Counter()  # the containers' seconds: in the handler, waiting for a batch
        cpu: Counter[str] = Counter()  # CPU seconds of the sweep: the harness process and the containers
        with _containers(sizes.containers, {**HANDLER_ENV, **env, **aws}, box.queue_url, arn) as shared:
            box.quota.reset_stats()
            counter = _AwsCalls()
            try:
                with patched_environ({**HANDLER_ENV, **env}), _quiet():
                    # The clock starts once the night is queued: moto's FIFO checks each message's
                    # dedup id against every queued one (quadratic in N), which is not SQS's cost;
                    # the scheduler table measures the fan-out.
                    fan_out = time.monotonic()
                    scheduler.lambda_handler({"scheduled_time": SCHEDULED}, context)
                    started, cpu_at_start = time.monotonic(), time.process_time()
                    fanned = started - fan_out
                    shared.go.set()
                    while shared.deleted.value + _depth(sqs, box.dlq_url) < sizes.portals:
                        time.sleep(0.5)  # moto's SQS scans every message per call: not too often
                    wall = shared.last_done.value - started
                    cpu["aws+emulator"] = time.process_time() - cpu_at_start
            finally:
                counter.close()
            calls.update(counter.calls)
            shared.stop.set()
            for _ in range(sizes.containers):
                report = shared.out.get(timeout=60)
                outcomes.update(report["outcomes"])
                calls.update(report["calls"])
                cpu["containers"] += report["cpu"]
                spent.update(report["spent"])

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
        dlq = _depth(sqs, box.dlq_url)
        throttled = {kind: box.quota.throttled(kind) for kind in ("read", "write", "describe")}

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
        failed=outcomes["failed"],
        dlq=dlq,
        wall=wall,
        bound=sizes.portals / rate,
        refreshed=refreshed,
        calls=calls,
        throttled=throttled,
        cpu=dict(cpu),
        spent=dict(spent),
        fan_out=fanned,
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
        print(result.time_line())


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
