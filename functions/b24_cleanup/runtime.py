"""The one owner of what a process keeps between requests: settings, clients, the engine, chain state.

Nothing here runs at import, and each part is built on first use: a request rejected before
verification creates no client, and a cold start pays only for what its first request uses. On
Lambda the environment never changes, so everything is read once per process; a process that
drives the handlers with other settings (tests, the demo, a harness) calls :func:`reset` after
changing them. The per-portal token-chain state is the exception: it is one object for the life
of the process, so every engine and TokenAccess of the process shares it; `reset` empties it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .config import Settings
from .tokens import ChainState

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

    from .engine import Engine
    from .queue import JobQueue
    from .store import PortalStore

_lock = threading.RLock()
_chains = ChainState()
_settings: Settings | None = None
_store: PortalStore | None = None
_sqs: SQSClient | None = None
_engine: Engine | None = None
# The endpoint's own clients: bounded tries, so that it answers inside its timeout (store.ENDPOINT_BOTO_CONFIG).
_endpoint_store: PortalStore | None = None
_endpoint_sqs: SQSClient | None = None


def settings() -> Settings:
    """The settings of this process, read from the environment on first use (ConfigError if broken)."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = Settings.from_env()
        return _settings


def store() -> PortalStore:
    """The SSM store the settings name."""
    global _store
    with _lock:
        if _store is None:
            _store = settings().store()
        return _store


def sqs() -> SQSClient:
    global _sqs
    with _lock:
        if _sqs is None:
            import boto3

            from .store import BOTO_CONFIG

            _sqs = boto3.client("sqs", config=BOTO_CONFIG)
        return _sqs


# The endpoint answers inside its timeout (25 s in template.yaml): its AWS calls start no attempt
# later than ENDPOINT_MARGIN_SECONDS before it (one attempt, at most 3 s, and the answer fit), nor
# more than ENDPOINT_TRYING_SECONDS into the request: a flood that throttles SSM costs quick 503s.
ENDPOINT_MARGIN_SECONDS = 4.0
ENDPOINT_TRYING_SECONDS = 18.0
_request = threading.local()


@contextmanager
def endpoint_request(context: object) -> Iterator[float | None]:
    """The endpoint's request on this thread: its deadline (time.monotonic, None without a Lambda context)."""
    try:
        remaining = context.get_remaining_time_in_millis() / 1000.0  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        remaining = None
    _request.deadline = (
        None
        if remaining is None
        else time.monotonic() + min(ENDPOINT_TRYING_SECONDS, max(0.0, remaining - ENDPOINT_MARGIN_SECONDS))
    )
    try:
        yield _request.deadline
    finally:
        _request.deadline = None


def endpoint_deadline() -> float | None:
    """By when the endpoint's request on this thread must stop trying AWS (and start no OAuth call)."""
    return getattr(_request, "deadline", None)


def endpoint_store() -> PortalStore:
    """The store the uninstall endpoint reads (and registration writes) through: bounded tries."""
    global _endpoint_store
    with _lock:
        if _endpoint_store is None:
            from .store import ENDPOINT_BOTO_CONFIG, stop_at

            _endpoint_store = settings().store(ENDPOINT_BOTO_CONFIG)
            for client in _endpoint_store.clients():  # the reader and the writer
                stop_at(client, endpoint_deadline)
            records = getattr(_endpoint_store, "dynamodb", None)  # B24_STORE=dynamodb: its other client
            if records is not None:
                stop_at(records, endpoint_deadline)
        return _endpoint_store


def endpoint_sqs() -> SQSClient:
    """The SQS client the uninstall endpoint sends its one message with: bounded tries."""
    global _endpoint_sqs
    with _lock:
        if _endpoint_sqs is None:
            import boto3

            from .store import ENDPOINT_BOTO_CONFIG, stop_at

            _endpoint_sqs = stop_at(boto3.client("sqs", config=ENDPOINT_BOTO_CONFIG), endpoint_deadline)
        return _endpoint_sqs


def endpoint_queue() -> JobQueue:
    """The job queue as the endpoint sends to it (ConfigError when B24_QUEUE_URL is not set)."""
    from .queue import JobQueue

    with _lock:
        return JobQueue(endpoint_sqs(), settings().require_queue())


def queue() -> JobQueue:
    """The portal job queue (ConfigError when B24_QUEUE_URL is not set)."""
    from .queue import JobQueue

    with _lock:
        return JobQueue(sqs(), settings().require_queue())


def chains() -> ChainState:
    """The per-portal token-chain state of this process."""
    return _chains


def engine() -> Engine:
    """One engine per warm container: its HTTP pool and per-portal pacing outlive an invocation."""
    global _engine
    with _lock:
        if _engine is None:
            from .engine import Engine

            _engine = Engine.from_settings(settings(), chains=_chains)
        return _engine


def use_engine(engine: Engine) -> None:
    """Hand the handlers this engine until the next reset (tests and benchmarks tune its options)."""
    global _engine
    with _lock:
        _engine = engine


def created() -> int:
    """How many stores and SQS clients exist (a request rejected before verification must create none)."""
    with _lock:
        return sum(client is not None for client in (_store, _sqs, _endpoint_store, _endpoint_sqs))


def reset() -> None:
    """Forget settings, clients and engine, and empty the token-chain state (tests, the demo)."""
    global _settings, _store, _sqs, _engine, _endpoint_store, _endpoint_sqs
    with _lock:
        _settings = _store = _sqs = _engine = _endpoint_store = _endpoint_sqs = None
        _chains.reset()
