"""Table 2, sweep throughput: many portals through handlers.worker.process in SQS-sized batches, against
the latency bound and the naive way (one event.unbind per orphan, one portal after another).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from b24_cleanup.ops.sandbox import patched_environ
from bench.common import (
    DECLARED,
    KEPT_ROWS,
    SQS_BATCH,
    median,
    orphan_rows,
    percentile,
    print_table,
    rebind,
    request_bound,
)

QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:b24-cleanup-jobs.fifo"

NAME = "sweep"
TITLE = "2. Sweep throughput"


@dataclass(frozen=True)
class Sizes:
    portals: int
    orphans: int
    declared_rows: int
    latency: float  # emulator latency per request, seconds
    baseline_portals: int  # portals the naive way is measured on (extrapolated to `portals`)


FULL = Sizes(portals=1000, orphans=20, declared_rows=5, latency=0.05, baseline_portals=50)
QUICK = dataclasses.replace(FULL, portals=20, baseline_portals=1)


class _SsmTimer:
    """Time and count every SSM API call of a boto3 client (per call, across threads)."""

    def __init__(self, client: Any) -> None:
        self.calls = 0
        self.seconds = 0.0
        self._local = threading.local()
        self._lock = threading.Lock()
        client.meta.events.register("before-call.ssm.*", self._before, unique_id="bench-ssm-before")
        client.meta.events.register("after-call.ssm.*", self._after, unique_id="bench-ssm-after")

    def _before(self, **_: Any) -> None:
        self._local.started = time.perf_counter()

    def _after(self, **_: Any) -> None:
        spent = time.perf_counter() - getattr(self._local, "started", time.perf_counter())
        with self._lock:
            self.calls += 1
            self.seconds += spent

    def reset(self) -> None:
        with self._lock:
            self.calls, self.seconds = 0, 0.0


@dataclass
class SweepRun:
    wall: float
    cpu: float
    requests: int
    oauth: int
    latencies: list[float]
    job_times: list[float]
    batch_times: list[float]
    ssm_calls: int
    ssm_seconds: float
    round_trips: list[float]
    outcomes: Counter[str]


def _sqs_batch(seeded: Sequence[Any], offset: int) -> dict[str, Any]:
    from b24_cleanup.ops.sandbox import sqs_event

    messages = [
        {
            "MessageId": f"m-{offset + i}",
            "ReceiptHandle": f"r-{offset + i}",
            "Body": json.dumps({"action": "sweep", "member_id": s.member_id}),
            "Attributes": {"MessageGroupId": s.member_id, "ApproximateReceiveCount": "1"},
        }
        for i, s in enumerate(seeded)
    ]
    return sqs_event(messages, QUEUE_ARN)


def _run_worker_sweep(box: Any, seeded: Sequence[Any]) -> SweepRun:
    """Deliver one sweep job per portal to worker.process in SQS-sized batches, as Lambda would."""
    from b24_cleanup import runtime
    from b24_cleanup.handlers import worker

    runtime.reset()
    engine = runtime.engine()
    ssm = _SsmTimer(engine.store.client)  # created here, before the clock starts
    round_trips: list[float] = []
    engine.session.hooks["response"].append(lambda r, *a, **kw: round_trips.append(r.elapsed.total_seconds()))
    job_times: list[float] = []
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()  # the jobs of a batch run in the worker's threads
    run_job = engine.run

    def timed_run(job: Any, *args: Any, **kwargs: Any) -> Any:
        started, outcome = time.perf_counter(), "failed"
        try:
            result = run_job(job, *args, **kwargs)
            outcome = result.outcome.value
            return result
        finally:
            with lock:
                outcomes[outcome] += 1
                job_times.append(time.perf_counter() - started)

    engine.run = timed_run  # type: ignore[method-assign]
    events = [_sqs_batch(seeded[i : i + SQS_BATCH], i) for i in range(0, len(seeded), SQS_BATCH)]
    box.emulator.clear_log()
    batch_times: list[float] = []
    failures = 0
    with contextlib.redirect_stdout(io.StringIO()):  # the EMF blobs of every invocation
        cpu0, started = time.process_time(), time.perf_counter()
        for event in events:
            t0 = time.perf_counter()
            answer = worker.process(event, None)
            batch_times.append(time.perf_counter() - t0)
            failures += len(answer["batchItemFailures"])
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    log = box.emulator.requests_log(kind="rest")
    if failures or outcomes != Counter({"cleaned": len(seeded)}):
        raise RuntimeError(f"the sweep did not clean every portal: {dict(outcomes)}, {failures} handed back")
    return SweepRun(
        wall=wall,
        cpu=cpu,
        requests=len(log),
        oauth=len(box.emulator.requests_log(kind="oauth")),
        latencies=[e.duration for e in log],
        job_times=job_times,
        batch_times=batch_times,
        ssm_calls=ssm.calls,
        ssm_seconds=ssm.seconds,
        round_trips=round_trips,
        outcomes=outcomes,
    )


def _run_naive(box: Any, seeded: Sequence[Any]) -> tuple[list[float], int, list[float]]:
    """The naive way: per portal, read the record, event.get, then one event.unbind per orphan row,
    one request after another and one portal after another (plain `requests`)."""
    import requests

    declared = {(d["event"].upper(), d.get("handler")) for d in DECLARED if "handler" in d}
    session = requests.Session()
    box.emulator.clear_log()
    per_portal: list[float] = []
    for s in seeded:
        started = time.perf_counter()
        record = box.store.get(s.member_id)
        endpoint, token = record.client_endpoint, record.access_token
        answer = session.post(f"{endpoint}event.get", json={"auth": token}, timeout=30).json()
        for row in answer["result"]:
            if row.get("offline") in (1, "1", True) or (row["event"].upper(), row["handler"]) in declared:
                continue
            params = {"event": row["event"], "handler": row["handler"], "auth_type": row["auth_type"], "auth": token}
            session.post(f"{endpoint}event.unbind", json=params, timeout=30).raise_for_status()
        per_portal.append(time.perf_counter() - started)
        if len(s.portal.handlers(box.app)) != len(KEPT_ROWS):
            raise RuntimeError("the naive baseline left orphans behind")
    log = box.emulator.requests_log(kind="rest")
    return per_portal, len(log), [e.duration for e in log]


def measure(sizes: Sizes, runs: int) -> None:
    from b24_cleanup.ops.sandbox import sandbox

    n, k, latency = sizes.portals, sizes.orphans, sizes.latency
    handlers = KEPT_ROWS[: sizes.declared_rows] + orphan_rows(k)
    per_portal_requests = request_bound(k)
    with sandbox(prefix="/b24-cleanup/bench-sweep", declared=DECLARED, latency=latency) as box:
        seed_start = time.perf_counter()
        portals = [box.add_portal(f"sweep-{i}.bitrix24.test", handlers=handlers) for i in range(n)]
        baseline = [
            box.add_portal(f"naive-{i}.bitrix24.test", handlers=handlers) for i in range(sizes.baseline_portals)
        ]
        seed_seconds = time.perf_counter() - seed_start
        results: list[SweepRun] = []
        # The benchmark's orphans stand for long-known ones: unbound at once (grace over).
        with patched_environ(box.env(B24_ORPHAN_GRACE_DAYS="0")):
            for run in range(runs):
                if run:
                    for s in portals:
                        rebind(box, s, orphan_rows(k))
                results.append(_run_worker_sweep(box, portals))
            box.emulator.latency = 0.0
            for s in portals:
                rebind(box, s, orphan_rows(k))
            floor = _run_worker_sweep(box, portals)
            box.emulator.latency = latency
        naive_times, naive_requests, naive_latencies = _run_naive(box, baseline)

    walls = [r.wall for r in results]
    wall = median(walls)
    bound = n * per_portal_requests * latency / SQS_BATCH
    p50 = median([median(r.latencies) for r in results]) * 1000
    p95 = median([percentile(r.latencies, 0.95) for r in results]) * 1000
    requests_made = int(median([r.requests for r in results]))
    naive_per_portal = median(naive_times)
    naive_wall = naive_per_portal * n
    naive_req_per_portal = naive_requests / len(baseline)
    naive_bound = n * naive_req_per_portal * latency
    outcomes = Counter[str]()
    for r in results:
        outcomes.update(r.outcomes)
    rows = [
        [
            f"worker.process, {SQS_BATCH}/batch, {runs} run(s)",
            n,
            wall,
            n / wall,
            requests_made,
            requests_made / n,
            p50,
            p95,
            bound,
            wall / bound,
        ],
        [
            "same, emulator latency 0 (overhead floor), 1 run",
            n,
            floor.wall,
            n / floor.wall,
            floor.requests,
            floor.requests / n,
            median(floor.latencies) * 1000,
            percentile(floor.latencies, 0.95) * 1000,
            "-",
            "-",
        ],
        [
            f"naive sequential: {len(baseline)} measured, x{n / len(baseline):g}",
            n,
            naive_wall,
            n / naive_wall,
            round(naive_req_per_portal * n),
            naive_req_per_portal,
            median(naive_latencies) * 1000,
            percentile(naive_latencies, 0.95) * 1000,
            naive_bound,
            naive_wall / naive_bound,
        ],
    ]
    # Where the time goes, per job and per batch (medians over the runs).
    job_ms = median([median(r.job_times) for r in results]) * 1000
    job_p95 = median([percentile(r.job_times, 0.95) for r in results]) * 1000
    batch_ms = median([median(r.batch_times) for r in results]) * 1000
    ssm_per_job = median([r.ssm_seconds / n for r in results]) * 1000
    ssm_calls = median([r.ssm_calls / n for r in results])
    rtt_ms = median([median(r.round_trips) for r in results]) * 1000
    server_ms = p50
    cpu = median([r.cpu for r in results])
    floor_job = median(floor.job_times) * 1000
    floor_ssm = floor.ssm_seconds / n * 1000
    rest_ms = per_portal_requests * rtt_ms
    notes = [
        f"portals: {n} x {len(handlers)} handlers ({k} orphans on distinct URLs, {len(handlers) - k} declared), "
        f"emulator latency {latency * 1000:g} ms, rate limiting on (own bucket per portal); seeding took "
        f"{seed_seconds:.1f} s (not timed).",
        f"latency bound = portals x {per_portal_requests} requests x {latency * 1000:g} ms / {SQS_BATCH} concurrent "
        f"portals; naive bound = portals x {naive_req_per_portal:g} requests x {latency * 1000:g} ms (sequential).",
        f"speed-up over the naive way: {naive_wall / wall:.0f}x in wall time ({naive_per_portal * 1000:.0f} ms per "
        f"portal sequentially, extrapolated from {len(baseline)} portals), "
        f"{naive_req_per_portal / (requests_made / n):.1f}x fewer requests.",
        f"where the time goes, per portal job (median): {job_ms:.0f} ms (p95 {job_p95:.0f}) = "
        f"{per_portal_requests} REST round trips x {rtt_ms:.0f} ms (server side {server_ms:.0f} ms incl. the "
        f"latency) + SSM via moto {ssm_calls:.2f} calls {ssm_per_job:.1f} ms + the rest "
        f"{max(0.0, job_ms - rest_ms - ssm_per_job):.0f} ms (client, planning, logging, GIL waits).",
        f"a batch of {SQS_BATCH} takes {batch_ms:.0f} ms median: the slowest of its {SQS_BATCH} jobs plus the thread "
        f"pool; the next batch waits for it (per-batch barrier). CPU {cpu:.1f} s over {wall:.1f} s wall "
        f"({cpu / wall * 100:.0f}% of one core, shared with the in-process emulator and moto).",
        f"overhead floor (latency 0): {floor_job:.0f} ms per job of which SSM via moto {floor_ssm:.1f} ms; "
        f"outcomes {dict(outcomes)}; OAuth calls {sum(r.oauth for r in results)}.",
    ]
    print_table(
        TITLE,
        f"{n} portals through handlers.worker.process, median of {runs} run(s)",
        [
            "path",
            "portals",
            "wall s",
            "portals/s",
            "requests",
            "req/portal",
            "p50 ms",
            "p95 ms",
            "bound s",
            "wall/bound",
        ],
        rows,
        notes,
    )
