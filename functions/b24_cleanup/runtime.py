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
        return (_store is not None) + (_sqs is not None)


def reset() -> None:
    """Forget settings, clients and engine, and empty the token-chain state (tests, the demo)."""
    global _settings, _store, _sqs, _engine
    with _lock:
        _settings = _store = _sqs = _engine = None
        _chains.reset()
