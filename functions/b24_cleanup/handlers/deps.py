"""What the handlers need from outside, created on first use and kept for the warm container.

Nothing here runs at import: a request rejected before verification creates no client, and a
cold start pays only for what its first request uses. Everything is keyed by the environment it
was built from: on Lambda that never changes, but a process that drives the handlers with other
settings (tests, the demo, a harness) gets settings and clients that match them.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import boto3

from b24_cleanup.config import Settings
from b24_cleanup.store import BOTO_CONFIG, PortalStore

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

_ENV_PREFIXES = ("B24_", "AWS_")
EnvKey = tuple[tuple[str, str], ...]


def _env_key() -> EnvKey:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))


@functools.lru_cache(maxsize=8)
def _settings(key: EnvKey) -> Settings:
    return Settings.from_env(dict(key))


@functools.lru_cache(maxsize=8)
def _store(key: EnvKey) -> PortalStore:
    return _settings(key).store()


@functools.lru_cache(maxsize=8)
def _sqs(key: EnvKey) -> SQSClient:
    return boto3.client("sqs", config=BOTO_CONFIG)


def settings() -> Settings:
    return _settings(_env_key())


def store() -> PortalStore:
    return _store(_env_key())


def sqs() -> SQSClient:
    return _sqs(_env_key())


def created() -> int:
    """How many stores and SQS clients exist (a rejected request must have created none)."""
    return _store.cache_info().currsize + _sqs.cache_info().currsize


def reset() -> None:
    """Forget the cached settings and clients."""
    for cached in (_settings, _store, _sqs):
        cached.cache_clear()
