"""A quota-faithful SSM for tests and benchmarks: moto behind real SSM's request rates.

moto answers every call at once, so a sweep on it never meets the limit that decides production:
SSM Parameter Store takes about 40 reads/s (GetParameter, GetParameters and GetParametersByPath
share one bucket per account and region) and about 3 writes/s, and holds 10,000 standard
parameters (design §11.4). This module puts those limits back, on the real wire: a
loopback HTTP server runs moto's own WSGI app behind a middleware that meters each SSM call by its
``X-Amz-Target`` header and, beyond the rate, answers exactly as SSM does::

    HTTP/1.1 400 Bad Request
    Content-Type: application/x-amz-json-1.1
    {"__type": "ThrottlingException", "message": "Rate exceeded"}

so botocore's real retry logic (adaptive mode, as store.py configures it: retries, backoff and its
client-side rate limiter) sees what production sees. Nothing in the code under test is patched:
``AWS_ENDPOINT_URL_SSM`` points every SSM client created inside the block at the server, which
shares moto's in-process state (a client made outside the block, e.g. a sandbox's seeding client,
still reaches the same parameters with no quota, which is how tests seed and inspect cheaply).

API (used by the sandbox, the benchmarks, the campaign and the throttling tests)::

    from b24_cleanup.ops.quota import SsmQuotas, ssm_quotas

    with mock_aws():                                    # or inside ops.sandbox.sandbox(...)
        with ssm_quotas(SsmQuotas(write=3)) as quota:   # AWS_ENDPOINT_URL_SSM set for the block
            ...                                         # every SSM client made here is metered
            quota.stats()           # {"PutParameter": {"admitted": 31, "throttled": 12}, ...}
            quota.admitted("write") # admitted calls of one class (read | write | describe)
            quota.set_quotas(SsmQuotas(write=0.5))      # change the rates mid-test
            quota.client()          # an adaptive-retry SSM client through the quotas

or ``sandbox(ssm_quotas=SsmQuotas(...))``, which does the same and exposes it as ``box.quota``.

`SsmQuotas` fields: ``read`` (default 40/s), ``write`` (3/s: PutParameter, DeleteParameter,
DeleteParameters, LabelParameterVersion), ``describe`` (DescribeParameters, its own bucket; AWS
publishes no figure for it, so it is unlimited unless set), ``burst_seconds`` (bucket depth in
seconds of rate, default 1: a burst of ``rate`` calls, then ``rate`` per second), and
``parameter_limit`` (None, or e.g. 10,000: a PutParameter creating a Standard parameter beyond it
answers ``ParameterLimitExceeded`` as SSM does). A rate of None means not limited. Every other
operation (GetParameterHistory, tagging, ...) passes unmetered.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..store import BOTO_CONFIG
from .sandbox import REGION, patched_environ

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

READ_OPERATIONS = frozenset({"GetParameter", "GetParameters", "GetParametersByPath"})
WRITE_OPERATIONS = frozenset({"PutParameter", "DeleteParameter", "DeleteParameters", "LabelParameterVersion"})
DESCRIBE_OPERATIONS = frozenset({"DescribeParameters"})
CLASSES = ("read", "write", "describe")

THROTTLED_BODY = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}).encode()
LIMIT_BODY = json.dumps(
    {
        "__type": "ParameterLimitExceeded",
        "message": "You have exceeded the number of parameters for this AWS account. "
        "Delete unnecessary parameters and try again.",
    }
).encode()


@dataclass(frozen=True)
class SsmQuotas:
    """Requests per second per class of SSM call (None = not limited) and the parameter cap."""

    read: float | None = 40.0
    write: float | None = 3.0
    describe: float | None = None
    burst_seconds: float = 1.0
    parameter_limit: int | None = None

    def rate(self, kind: str) -> float | None:
        value: float | None = getattr(self, kind)
        return value

    def with_rates(self, **rates: float | None) -> SsmQuotas:
        return replace(self, **rates)  # type: ignore[arg-type]


def operation_class(operation: str) -> str | None:
    """`read`, `write`, `describe`, or None for an operation no quota here meters."""
    if operation in READ_OPERATIONS:
        return "read"
    if operation in WRITE_OPERATIONS:
        return "write"
    if operation in DESCRIBE_OPERATIONS:
        return "describe"
    return None


class TokenBucket:
    """`rate` tokens a second, at most `capacity` banked; `take()` spends one if there is one.

    Real SSM's limiter is not public; a token bucket one second deep is the usual model of "N per
    second" quotas and what botocore's adaptive limiter is built to track.
    """

    def __init__(self, rate: float, capacity: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or capacity < 1:
            raise ValueError("a token bucket needs rate > 0 and capacity >= 1")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False


def _bucket(rate: float | None, burst_seconds: float) -> TokenBucket | None:
    return None if rate is None else TokenBucket(rate, max(1.0, rate * burst_seconds))


class QuotaMeter:
    """The quota state: one bucket per class, and counts of what was admitted and throttled."""

    def __init__(self, quotas: SsmQuotas) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self.set_quotas(quotas)

    def set_quotas(self, quotas: SsmQuotas) -> None:
        buckets = {kind: _bucket(quotas.rate(kind), quotas.burst_seconds) for kind in CLASSES}
        with self._lock:
            self.quotas = quotas
            self._buckets = buckets

    def admit(self, operation: str) -> bool:
        kind = operation_class(operation)
        bucket = self._buckets.get(kind) if kind else None
        admitted = bucket is None or bucket.take()
        with self._lock:
            self._counts[(operation, "admitted" if admitted else "throttled")] += 1
        return admitted

    def record(self, operation: str, verdict: str) -> None:
        with self._lock:
            self._counts[(operation, verdict)] += 1

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            counts = dict(self._counts)
        out: dict[str, dict[str, int]] = {}
        for (operation, verdict), n in counts.items():
            out.setdefault(operation, {"admitted": 0, "throttled": 0})[verdict] = n
        return out

    def total(self, kind: str, verdict: str) -> int:
        with self._lock:
            return sum(n for (op, v), n in self._counts.items() if v == verdict and operation_class(op) == kind)

    def reset_stats(self) -> None:
        with self._lock:
            self._counts.clear()


def _standard_parameters(account_id: str, region: str) -> tuple[int, Callable[[str], bool]]:
    """How many Standard parameters moto holds, and a test for whether a name exists."""
    from moto.ssm.models import ssm_backends  # dev dependency, as everything in this module

    params = ssm_backends[account_id][region]._parameters  # moto keeps no public count

    def exists(name: str) -> bool:
        return bool(params.get(name))

    count = sum(1 for versions in list(params.values()) if versions and versions[-1].tier != "Advanced")
    return count, exists


class _QuotaMiddleware:
    """WSGI middleware in front of moto's app: throttle or refuse SSM calls as real SSM would."""

    def __init__(self, app: Any, meter: QuotaMeter) -> None:
        self.app = app
        self.meter = meter
        self._cap_lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        service, _, operation = str(environ.get("HTTP_X_AMZ_TARGET", "")).partition(".")
        if service != "AmazonSSM":
            return self.app(environ, start_response)
        if not self.meter.admit(operation):
            return self._error(start_response, THROTTLED_BODY)
        limit = self.meter.quotas.parameter_limit
        if operation == "PutParameter" and limit is not None:
            # Serialised so that two creations cannot both take the last free slot.
            with self._cap_lock:
                body = self._body(environ)
                if self._over_cap(environ, body, limit):
                    self.meter.record(operation, "limited")
                    return self._error(start_response, LIMIT_BODY)
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)

    @staticmethod
    def _body(environ: dict[str, Any]) -> bytes:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body: bytes = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)  # moto reads it again
        return body

    @staticmethod
    def _over_cap(environ: dict[str, Any], body: bytes, limit: int) -> bool:
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            return False  # let moto answer the malformed request
        if request.get("Tier") in {"Advanced", "Intelligent-Tiering"}:
            return False  # the 10,000 cap is the Standard tier's
        region = _region_of(str(environ.get("HTTP_AUTHORIZATION", ""))) or REGION
        from moto.core import DEFAULT_ACCOUNT_ID

        count, exists = _standard_parameters(DEFAULT_ACCOUNT_ID, region)
        return not exists(str(request.get("Name", ""))) and count >= limit

    @staticmethod
    def _error(start_response: Callable[..., Any], body: bytes) -> list[bytes]:
        start_response(
            "400 Bad Request",
            [
                ("Content-Type", "application/x-amz-json-1.1"),
                ("Content-Length", str(len(body))),
                ("x-amzn-RequestId", str(uuid.uuid4())),
            ],
        )
        return [body]


def _region_of(authorization: str) -> str | None:
    """The region of a SigV4 `Credential=AKID/date/region/service/aws4_request` scope."""
    marker = "Credential="
    if marker not in authorization:
        return None
    scope = authorization.split(marker, 1)[1].split(",", 1)[0].split("/")
    return scope[2] if len(scope) >= 5 else None


def _quiet_handler() -> type:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class QuietHandler(MotoRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass  # one line per call would drown a benchmark's output

    return QuietHandler


class QuotaServer:
    """moto's WSGI app on 127.0.0.1 behind the quota middleware, in a daemon thread."""

    def __init__(self, quotas: SsmQuotas) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        from .atomic import atomic_moto

        atomic_moto()  # a threaded server: writes one step at a time, as AWS's are
        self.meter = QuotaMeter(quotas)
        app = _QuotaMiddleware(DomainDispatcherApplication(create_backend_app), self.meter)
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_quiet_handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="ssm-quota", daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class QuotaAws:
    """What `ssm_quotas` yields: the endpoint, the rates (changeable) and what they did."""

    def __init__(self, server: QuotaServer) -> None:
        self._server = server

    @property
    def endpoint_url(self) -> str:
        return self._server.endpoint_url

    @property
    def quotas(self) -> SsmQuotas:
        return self._server.meter.quotas

    def set_quotas(self, quotas: SsmQuotas) -> None:
        """New rates from now on (fresh buckets, full); counts are kept."""
        self._server.meter.set_quotas(quotas)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per SSM operation: calls admitted, throttled (and `limited` by the parameter cap)."""
        return self._server.meter.stats()

    def admitted(self, kind: str) -> int:
        return self._server.meter.total(kind, "admitted")

    def throttled(self, kind: str) -> int:
        return self._server.meter.total(kind, "throttled")

    def reset_stats(self) -> None:
        self._server.meter.reset_stats()

    def client(self, **config: Any) -> SSMClient:
        """An SSM client through the quotas: store.py's adaptive config unless `config` overrides it."""
        import boto3
        from botocore.config import Config

        merged = BOTO_CONFIG.merge(Config(**config)) if config else BOTO_CONFIG
        return boto3.client("ssm", region_name=REGION, endpoint_url=self.endpoint_url, config=merged)


@contextmanager
def ssm_quotas(quotas: SsmQuotas | None = None) -> Iterator[QuotaAws]:
    """Meter SSM for the block (see the module docstring); must run inside moto's mock_aws.

    Sets ``AWS_ENDPOINT_URL_SSM`` for the block and restores it after: clients created inside
    go through the quotas. Stops the server on exit.
    """
    server = QuotaServer(quotas or SsmQuotas())
    server.start()
    try:
        with patched_environ({"AWS_ENDPOINT_URL_SSM": server.endpoint_url}):
            yield QuotaAws(server)
    finally:
        server.stop()
