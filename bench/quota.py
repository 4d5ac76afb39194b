"""Sweeps at the AWS limit (issue 15): a night's refreshes through the real handlers, SSM at its quota.

Every other table runs on moto, which has no quotas. Here SSM answers as real SSM does beyond
`write_rate` writes/s and 40 reads/s (ops/quota.py: ThrottlingException "Rate exceeded" on the
real wire, so botocore's retries and the workers' write pacing meet what production meets).
N portals with expired access tokens (each must refresh: one OAuth call and one record write)
and one orphan each go scheduler → SQS FIFO → worker. The worker runs as Lambda runs it:
`containers` spawned processes (MaximumConcurrency = B24_WORKER_CONCURRENCY), each with its own
runtime, clients and write pacer at its share of the rate, each taking the next batch of 10 when
it is free from an event source in this process. Every process reaches AWS over loopback: SSM
through the quota (this process's moto), SQS and DynamoDB on moto servers of their own
(`_moto_apart`). The clock starts once the night is queued and received: moto's FIFO costs
O(queued) per call, SQS's does not (the `fan-out` figure). Then, per store:

    quota: store=ssm portals=N write_rate=Q/s achieved=W/s ratio=W/Q lost=L failed=F dlq=D wall=Ts bound=Bs

`achieved` = portals refreshed and stored ÷ wall; `lost` = stored refresh tokens that no longer
refresh (checked at the OAuth server afterwards); `failed` = jobs that ended `failed` (each is
retried); `dlq` = jobs in the dead-letter queue; `bound` = N ÷ Q. For store=dynamodb the records
have no write quota: `write_rate` is what the Bitrix24 side allows (portals in flight ÷ the
per-portal latency bound, 3 requests at the emulator's latency), `bound` = N ÷ that rate. `ratio`
is bound ÷ wall either way. Goal: ratio ≥ 0.9, lost = 0, dlq = 0. A `quota-cost:` line per store
gives the measured AWS calls per portal that the README's 1k/10k/100k arithmetic uses; a
`quota-time:` line where the time went (seconds per invocation, CPU of this process and of the
containers, requests per portal as the emulator counted them).

    .venv/bin/python -m bench.quota                                  # ~5 minutes, both stores
    .venv/bin/python -m bench.quota --store ssm --write-rate 10 --portals 600
    .venv/bin/python -m bench.quota --quick                          # seconds
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
from collections import Counter, defaultdict
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


# SSM at its default PutParameter quota (3/s, B24_SSM_WRITE_RATE's default) over the template's
# five containers; DynamoDB, with no write quota, as many portals as the Bitrix24 side allows in
# about the same minute of wall and bench time. `--portals`, `--write-rate`, ... measure others.
FULL: dict[str, Sizes] = {
    "ssm": Sizes(portals=200, write_rate=3, latency=0.5, containers=5),
    "dynamodb": Sizes(portals=600, write_rate=3, latency=0.5, containers=5),
}
QUICK: dict[str, Sizes] = {
    store: dataclasses.replace(sizes, portals=40, latency=0.05, containers=2, write_rate=10)
    for store, sizes in FULL.items()
}


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
    requests: dict[str, float] = dataclasses.field(default_factory=dict)  # per portal, by kind (rest, oauth)

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
        per = " ".join(f"{part}={self.spent.get(part, 0.0) / invocations:.2f}s" for part in ("handler",))
        cpu = " ".join(f"{part}={seconds:.1f}s" for part, seconds in self.cpu.items())
        return (
            f"quota-time: store={self.store} fan-out={self.fan_out:.1f}s invocations={int(invocations)} "
            f"requests/portal {' '.join(f'{k}={n:.2f}' for k, n in sorted(self.requests.items()))} "
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


def _depth(sqs: Any, queue_url: str) -> int:
    attrs = sqs.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


@dataclass(frozen=True)
class _Shared:
    """What the event source (this process) and the container processes share."""

    ready: Any  # Semaphore: each container releases it once it is warm
    go: Any  # Event: the clock has started
    stop: Any  # Event
    batches: Any  # Queue: received batches, each taken by the next free container
    settled: Any  # Queue: (batch, failed message ids) after each invocation
    reports: Any  # Queue: each container's job outcomes, AWS calls, CPU and seconds at the end


def _container(env: dict[str, str], arn: str, shared: _Shared) -> None:
    """One worker container (a spawned process): its own runtime, pacer and clients, as in Lambda.

    It takes the next received batch when it is free, invokes the worker with it, and hands the
    answer back to the event source, one invocation at a time.
    """
    os.environ.update(env)
    from b24_cleanup.handlers import worker
    from b24_cleanup.ops.functionurl import FakeContext
    from b24_cleanup.ops.sandbox import collect_results, sqs_event

    context = FakeContext("b24-cleanup-worker")
    spent: dict[str, float] = defaultdict(float)
    with _quiet(), collect_results() as results:
        counter = _AwsCalls()  # first: clients copy the session's hooks when they are made
        _warm()
        shared.ready.release()
        shared.go.wait()
        cpu_at_start = time.process_time()
        try:
            while not shared.stop.is_set():
                try:
                    messages = shared.batches.get(timeout=0.2)
                except queue.Empty:
                    continue
                invoked = time.monotonic()
                answer = worker.lambda_handler(sqs_event(messages, arn), context)
                spent["invocations"] += 1
                spent["handler"] += time.monotonic() - invoked
                shared.settled.put((messages, {item["itemIdentifier"] for item in answer.get("batchItemFailures", [])}))
        finally:
            counter.close()
            outcomes = Counter(str(job.get("outcome")) for job in results.jobs)
            cpu = time.process_time() - cpu_at_start
            shared.reports.put({"outcomes": outcomes, "calls": counter.calls, "cpu": cpu, "spent": dict(spent)})


def _warm() -> None:
    """Make what a container's first invocation makes (its runtime and AWS clients: botocore loads
    each service's model, a fraction of a CPU second): a warm container, as after its first batch
    of a night. The cold start is the cold-start table's subject."""
    from b24_cleanup import runtime

    runtime.engine()
    store = runtime.store()
    store.clients()  # the SSM read and write clients
    getattr(store, "dynamodb", None)  # the DynamoDB store's client


class _EventSource:
    """The SQS event source, as Lambda runs it: pollers apart from the function containers.

    The night's batches are received before the clock starts and each goes to the next container
    that comes free; a poller then receives what comes back (a failed job made visible again),
    and a settler deletes what each invocation did or makes the rest visible. SQS answers a
    receive in milliseconds; moto's FIFO scans every queued message several times per call (about
    a second per receive at 600 queued here), a cost that is not what this bench measures.
    """

    def __init__(self, sqs: Any, queue_url: str, shared: _Shared) -> None:
        self.sqs, self.queue_url, self.shared = sqs, queue_url, shared
        self.done = 0
        self.last_done = 0.0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._poll, self._settle)]

    def _receive(self) -> bool:
        got = self.sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=SQS_BATCH, AttributeNames=["All"], VisibilityTimeout=300
        )
        messages = got.get("Messages", [])
        if messages:
            self.shared.batches.put(messages)
        return bool(messages)

    def start(self) -> None:
        """Receive everything queued, then poll for what comes back and settle what is done."""
        while self._receive():
            pass
        for thread in self._threads:
            thread.start()

    def _poll(self) -> None:
        while not self.shared.stop.is_set():
            if not self._receive():
                time.sleep(0.2)

    def _settle(self) -> None:
        while not self.shared.stop.is_set():
            try:
                messages, failed = self.shared.settled.get(timeout=0.1)
            except queue.Empty:
                continue
            done = [m for m in messages if m["MessageId"] not in failed]
            if done:
                self.sqs.delete_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=[{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(done)],
                )
            back = [m for m in messages if m["MessageId"] in failed]
            if back:  # the event source makes them visible again after the visibility timeout
                self.sqs.change_message_visibility_batch(
                    QueueUrl=self.queue_url,
                    Entries=[
                        {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                        for n, m in enumerate(back)
                    ],
                )
            with self._lock:
                self.done += len(done)
                if done:
                    self.last_done = time.monotonic()

    def close(self) -> None:
        for thread in self._threads:
            thread.join(30)


@contextlib.contextmanager
def _containers(count: int, env: dict[str, str], arn: str) -> Iterator[_Shared]:
    """Start `count` warm container processes; yield once all are ready; stop and join them after."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # the bench process runs threads: no fork
    shared = _Shared(
        ready=ctx.Semaphore(0),
        go=ctx.Event(),
        stop=ctx.Event(),
        batches=ctx.Queue(),
        settled=ctx.Queue(),
        reports=ctx.Queue(),
    )
    processes = [
        ctx.Process(target=_container, args=(env, arn, shared), daemon=True, name=f"container-{n}")
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


@contextlib.contextmanager
def _moto_apart() -> Iterator[str]:
    """A moto server in a process of its own on loopback; yields its endpoint URL.

    The sandbox's moto serves SSM through the quota in this process, beside the emulator. moto's
    FIFO SQS scans every queued message on each call and its DynamoDB parses and copies each item
    (milliseconds a call, where the services answer in a few): sharing one interpreter lock with
    the emulator, that would be what the sweep waits on. Each service apart, as each is in AWS.
    """
    import socket
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "b24_cleanup.ops.atomic", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("a moto server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@dataclass
class _Sweep:
    """What the containers and this process saw during the timed sweep."""

    wall: float = 0.0
    fan_out: float = 0.0
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    calls: Counter[str] = dataclasses.field(default_factory=Counter)
    spent: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    cpu: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))

    def add(self, report: dict[str, Any]) -> None:
        self.outcomes.update(report["outcomes"])
        self.calls.update(report["calls"])
        self.cpu["containers"] += report["cpu"]
        for part, seconds in report["spent"].items():
            self.spent[part] += seconds


def _sweep(box: Any, sizes: Sizes, env: dict[str, str], aws: dict[str, str]) -> _Sweep:
    """Queue the night (the scheduler, in this process), then time the containers working it off."""
    import boto3

    from b24_cleanup.handlers import scheduler
    from b24_cleanup.ops.functionurl import FakeContext
    from b24_cleanup.ops.sandbox import REGION, patched_environ

    sqs = boto3.client("sqs", region_name=REGION)
    arn = sqs.get_queue_attributes(QueueUrl=box.queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    seen = _Sweep()
    with _containers(sizes.containers, {**HANDLER_ENV, **env, **aws}, arn) as shared:
        box.quota.reset_stats()
        box.emulator.clear_log()
        counter = _AwsCalls()
        source = _EventSource(sqs, box.queue_url, shared)
        try:
            with patched_environ({**HANDLER_ENV, **env}), _quiet():
                # The clock starts once the night is queued and received: moto's FIFO checks each
                # message's dedup id against every queued one (quadratic in N) and scans them all on
                # each receive, which is not SQS's cost; the scheduler table measures the fan-out.
                queueing = time.monotonic()
                scheduler.lambda_handler({"scheduled_time": SCHEDULED}, FakeContext("b24-cleanup-scheduler"))
                source.start()
                started, cpu_at_start = time.monotonic(), time.process_time()
                seen.fan_out = started - queueing
                shared.go.set()
                while source.done + _depth(sqs, box.dlq_url) < sizes.portals:
                    time.sleep(0.5)
                seen.wall = source.last_done - started
                seen.cpu["aws+emulator"] = time.process_time() - cpu_at_start
        finally:
            counter.close()
            shared.stop.set()
            source.close()
        seen.calls.update(counter.calls)
        for _ in range(sizes.containers):
            seen.add(shared.reports.get(timeout=60))
    return seen


def run_once(store: str, sizes: Sizes) -> QuotaRun:
    import boto3

    from b24_cleanup.oauth import OAuthClient
    from b24_cleanup.ops.quota import SsmQuotas
    from b24_cleanup.ops.sandbox import FAKE_AWS_ENV, REGION, patched_environ, sandbox

    quotas = SsmQuotas(read=sizes.read_rate, write=sizes.write_rate)
    with contextlib.ExitStack() as stack:
        # SQS and DynamoDB each on a moto of its own (see _moto_apart); SSM is the sandbox's, metered.
        apart = {"AWS_ENDPOINT_URL_SQS": stack.enter_context(_moto_apart())}
        if store == "dynamodb":
            apart["AWS_ENDPOINT_URL_DYNAMODB"] = stack.enter_context(_moto_apart())
        stack.enter_context(patched_environ(apart))
        box = stack.enter_context(sandbox(declared=DECLARED, store=store, ssm_quotas=quotas, latency=sizes.latency))
        box.emulator.latency = 0.0  # seeding is not what is measured
        seeded = [box.add_portal(f"p{i:05d}.bitrix24.test", handlers=ROWS, expired=True) for i in range(sizes.portals)]
        seeded_tokens = {s.member_id: box.record(s.member_id).refresh_token for s in seeded}
        box.emulator.latency = sizes.latency
        env = box.env(
            B24_SSM_WRITE_RATE=f"{sizes.write_rate:g}",
            B24_WORKER_CONCURRENCY=str(sizes.containers),  # one share of the rate per container
            # Tonight's orphan is unbound tonight: one batch, the night's whole work (held orphans
            # and their ledger are bench/ledger.py's subject).
            B24_ORPHAN_GRACE_DAYS="0",
        )
        # Every process reaches AWS over loopback: SSM through the quota, the rest on their own.
        seen = _sweep(box, sizes, env, {**FAKE_AWS_ENV, **apart, "AWS_ENDPOINT_URL_SSM": box.quota.endpoint_url})

        box.emulator.latency = 0.0
        sent = Counter(entry.kind for entry in box.emulator.requests_log())
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
        throttled = {kind: box.quota.throttled(kind) for kind in ("read", "write", "describe")}
        dlq = _depth(boto3.client("sqs", region_name=REGION), box.dlq_url)

    if store == "ssm":
        rate = sizes.write_rate
    else:
        in_flight = min(sizes.portals, sizes.containers * SQS_BATCH)
        rate = in_flight / (REQUESTS_PER_PORTAL * sizes.latency)
    return QuotaRun(
        store=store,
        portals=sizes.portals,
        write_rate=rate,
        achieved=refreshed / seen.wall,
        lost=lost,
        failed=seen.outcomes["failed"],
        dlq=dlq,
        wall=seen.wall,
        bound=sizes.portals / rate,
        refreshed=refreshed,
        calls=seen.calls,
        throttled=throttled,
        cpu=dict(seen.cpu),
        spent=dict(seen.spent),
        requests={kind: n / sizes.portals for kind, n in sent.items()},
        fan_out=seen.fan_out,
    )


def measure(sizes: dict[str, Sizes], runs: int) -> None:
    """One run per store (`runs` is ignored: each run is a minute of a night at the limit)."""
    del runs
    print(f"\n{TITLE}")
    for store, size in sizes.items():
        print(
            f"  {store}: {size.portals} portals, expired tokens, one orphan each; SSM {size.write_rate:g} writes/s, "
            f"{size.read_rate:g} reads/s; {size.containers} containers x {SQS_BATCH}; "
            f"emulator latency {size.latency} s"
        )
        result = run_once(store, size)
        print(result.line())
        print(result.cost_line())
        print(result.time_line())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quota", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes: seconds instead of a minute")
    parser.add_argument("--store", choices=["ssm", "dynamodb"], action="append", help="only this store (repeatable)")
    parser.add_argument("--portals", type=int, help="portals in the sweep")
    parser.add_argument("--write-rate", type=float, help="SSM's PutParameter quota and B24_SSM_WRITE_RATE, writes/s")
    parser.add_argument("--latency", type=float, help="the emulator's latency per request, seconds")
    parser.add_argument("--containers", type=int, help="worker containers (B24_WORKER_CONCURRENCY)")
    args = parser.parse_args(argv)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SSM", "AWS_ENDPOINT_URL_SQS", "AWS_PROFILE"):
        os.environ.pop(key, None)  # the sandbox's moto must intercept every call
    chosen = {
        name: value
        for name, value in (
            ("portals", args.portals),
            ("write_rate", args.write_rate),
            ("latency", args.latency),
            ("containers", args.containers),
        )
        if value is not None
    }
    base = QUICK if args.quick else FULL
    sizes = {store: dataclasses.replace(base[store], **chosen) for store in (args.store or base)}
    measure(sizes, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
