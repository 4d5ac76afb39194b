"""Table 5, scheduler at scale: handlers.scheduler.lambda_handler against a moto server in a child process,
its AWS calls counted on the handler's own clients and its memory peak traced, for growing portal counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from b24_cleanup.ops.sandbox import patched_environ
from bench.common import DECLARED, FAKE_AWS, median, print_table

NAME = "scheduler"
TITLE = "5. Scheduler at scale"


@dataclass(frozen=True)
class Sizes:
    portals: tuple[int, ...]  # portal counts, one row each (seeded cumulatively)


FULL = Sizes(portals=(1000, 10000))
QUICK = dataclasses.replace(FULL, portals=(50, 200))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto server in a child process on loopback (its memory and CPU are not ours)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(FAKE_AWS)
    # Purging the queue after every batch of sends (see bench_scheduler) needs moto's 60-s rule off.
    env["MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR"] = "false"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _seed_parameters(ssm: Any, prefix: str, start: int, stop: int) -> None:
    def put(i: int) -> None:
        member_id = f"{i:032x}"
        record = {
            "member_id": member_id,
            "domain": f"p{i}.bitrix24.test",
            "client_endpoint": f"https://p{i}.bitrix24.test/rest/",
            "server_endpoint": "https://oauth.bitrix.info/rest/",
            "access_token": f"access-{i}",
            "refresh_token": f"refresh-{i}",
            "expires": 1795172400,
            "application_token": f"app-{i}",
            "scope": "crm",
        }
        ssm.put_parameter(
            Name=f"{prefix}/portals/{member_id}", Value=json.dumps(record), Type="SecureString", Overwrite=True
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(put, range(start, stop)))


@dataclass
class SchedulerCall:
    wall: float
    peak: int  # tracemalloc peak in bytes
    calls: Counter[str]  # AWS calls by "service.Operation"
    seconds: dict[str, float]  # time spent in each operation (client side, moto included)
    max_results: Any
    enqueued: int


def _invoke_scheduler(scheduled_time: str, *, cold: bool, purge: Callable[[], None]) -> SchedulerCall:
    """One traced lambda_handler call, its AWS calls counted on the handler's own clients.

    `purge` empties the queue after each SendMessageBatch (moto's FIFO send is O(queue), see the
    notes); its time is measured and taken out of the wall time.
    """
    import boto3

    from b24_cleanup import runtime
    from b24_cleanup.handlers import scheduler
    from b24_cleanup.ops.functionurl import FakeContext

    if cold:
        runtime.reset()
        boto3.setup_default_session()  # the handler's clients come from here, created inside the call
    calls: Counter[str] = Counter()
    seconds: dict[str, float] = {}
    observed: dict[str, Any] = {}

    def before(model: Any, **_: Any) -> None:
        observed["started"] = time.perf_counter()  # the scheduler makes one call at a time
        calls[f"{model.service_model.service_name}.{model.name}"] += 1

    def after(model: Any, **_: Any) -> None:
        name = f"{model.service_model.service_name}.{model.name}"
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - observed.pop("started", time.perf_counter())
        if name == "sqs.SendMessageBatch":
            started = time.perf_counter()
            purge()
            seconds["purge"] = seconds.get("purge", 0.0) + time.perf_counter() - started

    def page_size(params: dict[str, Any], **_: Any) -> None:
        observed["max_results"] = params.get("MaxResults")

    hooks = [
        ("before-call.*.*", before),
        ("after-call.*.*", after),
        ("before-parameter-build.ssm.DescribeParameters", page_size),
    ]
    if boto3.DEFAULT_SESSION is None:
        boto3.setup_default_session()
    session_events = boto3.DEFAULT_SESSION.events  # type: ignore[union-attr]
    # A client copies the session's handlers when it is created: a cold call's clients (created
    # inside the call) inherit these; a warm call's clients exist already and are watched directly.
    emitters = [session_events] if cold else [runtime.store().client.meta.events, runtime.sqs().meta.events]
    for emitter in emitters:
        for event, hook in hooks:
            emitter.register(event, hook, unique_id=f"bench-{event}")
    context = FakeContext("b24-cleanup-scheduler")
    tracemalloc.start()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the EMF blob
            started = time.perf_counter()
            answer = scheduler.lambda_handler({"scheduled_time": scheduled_time}, context)
            wall = time.perf_counter() - started - seconds.pop("purge", 0.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        for emitter in [session_events, runtime.store().client.meta.events, runtime.sqs().meta.events]:
            for event, _hook in hooks:
                emitter.unregister(event, unique_id=f"bench-{event}")
    return SchedulerCall(wall, peak, calls, seconds, observed.get("max_results"), int(answer["enqueued"]))


def measure(sizes: Sizes, runs: int) -> None:
    import boto3

    from b24_cleanup import runtime

    prefix = "/b24-cleanup/bench-scheduler"
    rows: list[list[Any]] = []
    notes: list[str] = []
    max_results = None
    with (
        moto_server() as url,
        patched_environ({**FAKE_AWS, "AWS_ENDPOINT_URL": url, "AWS_PROFILE": None, "B24_SSM_PREFIX": prefix}),
    ):
        admin = boto3.session.Session()  # not the default session: its calls are not counted
        ssm, sqs = admin.client("ssm"), admin.client("sqs")
        queue_url = sqs.create_queue(QueueName="b24-cleanup-jobs.fifo", Attributes={"FifoQueue": "true"})["QueueUrl"]
        ssm.put_parameter(
            Name=f"{prefix}/app/credentials",
            Type="SecureString",
            Value=json.dumps({"client_id": "app.bench", "client_secret": "bench-secret"}),
        )
        ssm.put_parameter(Name=f"{prefix}/app/handlers", Type="String", Value=json.dumps({"handlers": DECLARED}))
        seeded = 0
        stamp = 0

        def purge() -> None:
            sqs.purge_queue(QueueUrl=queue_url)

        with patched_environ({"B24_QUEUE_URL": queue_url}):
            try:
                for n in sizes.portals:
                    seed_start = time.perf_counter()
                    _seed_parameters(ssm, prefix, seeded, n)
                    seed_seconds = time.perf_counter() - seed_start
                    seeded = n
                    # One cold call (clients created inside it), then warm ones; moto makes the big
                    # size slow (see the notes), so it gets one warm run only.
                    warm_runs = runs if n <= 1000 else 1
                    results: list[SchedulerCall] = []
                    for index in range(1 + warm_runs):
                        stamp += 1
                        call = _invoke_scheduler(
                            f"2026-11-25T02:{stamp // 60:02d}:{stamp % 60:02d}Z", cold=index == 0, purge=purge
                        )
                        if call.enqueued != n:
                            raise RuntimeError(f"scheduler enqueued {call.enqueued} of {n} portals")
                        if results and call.calls != results[0].calls:
                            raise RuntimeError(f"AWS calls differ between runs: {call.calls} != {results[0].calls}")
                        max_results = call.max_results
                        results.append(call)
                    cold, warm = results[0], results[1:]
                    calls = cold.calls
                    # moto pages DescribeParameters by 10 whatever MaxResults says, and hands out a
                    # NextToken after every full page; AWS honours MaxResults (the handler asks for 50).
                    on_moto = 1 + (n // 10 + 1) + math.ceil(n / 10)
                    on_aws = 1 + math.ceil(n / 50) + math.ceil(n / 10)
                    total = sum(calls.values())
                    wall = median([c.wall for c in warm])
                    rows.append(
                        [
                            n,
                            total,
                            on_moto,
                            "yes" if total == on_moto else "NO",
                            on_aws,
                            calls.get("ssm.GetParameter", 0),
                            calls.get("ssm.DescribeParameters", 0),
                            calls.get("sqs.SendMessageBatch", 0),
                            wall,
                            n / wall,
                            cold.peak / 2**20,
                            max(c.peak for c in warm) / 2**20,
                        ]
                    )
                    spent = {name: median([c.seconds.get(name, 0.0) for c in warm]) for name in calls}
                    split = ", ".join(
                        f"{name.split('.')[1]} {spent[name]:.1f} s ({spent[name] / calls[name] * 1000:.1f} ms a call)"
                        for name in sorted(calls, key=lambda name: -spent[name])
                    )
                    notes.append(f"{n:,} portals (seeded in {seed_seconds:.1f} s; {warm_runs} warm run(s)): {split}.")
            finally:
                runtime.reset()
                boto3.setup_default_session()
    print_table(
        TITLE,
        "handlers.scheduler.lambda_handler against a moto server (child process), tracemalloc on, "
        "wall = median of the warm runs",
        [
            "portals",
            "AWS calls",
            "expected on moto",
            "as expected",
            "same on AWS",
            "GetParameter",
            "DescribeParameters",
            "SendMessageBatch",
            "wall s",
            "portals/s",
            "peak MiB cold",
            "peak MiB warm",
        ],
        rows,
        [
            "AWS calls counted with botocore before-call.*.* hooks on the handler's own clients (the same in every "
            "run, checked). Expected on AWS = 1 GetParameter (declared set) + ceil(n/50) DescribeParameters pages "
            f"(the handler asks for MaxResults={max_results}) + ceil(n/10) SendMessageBatch; moto ignores MaxResults "
            "and pages by 10 (plus an empty page after a full last one), hence floor(n/10)+1 pages here.",
            "peak = tracemalloc peak of this process during one invocation: cold = fresh clients created inside the "
            "call (botocore loads its service models), warm = clients cached (what the portals add).",
            "time per operation, client side (moto server included):",
            *[f"  {note}" for note in notes],
            "moto's DescribeParameters filters every stored parameter on every page (O(n) a page, O(n^2/10) a "
            "run): that, not the handler, is what grows with n here. Its FIFO SendMessage recounts the whole queue "
            "(Queue.attributes, unix_time per message) several times per message, O(queue) a send: a hook purged "
            "the queue (uncounted admin client) after every SendMessageBatch and its time is left out of the wall. "
            "The moto server runs in its own process: neither its CPU nor its memory is counted in the peaks.",
        ],
    )
