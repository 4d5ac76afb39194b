"""What the handlers need from outside, created on first use and kept for the warm container.

Nothing here runs at import: a request rejected before verification creates no client, and a
cold start pays only for what its first request uses.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import boto3

from b24_cleanup.config import Settings
from b24_cleanup.store import BOTO_CONFIG, PortalStore

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


@functools.cache
def store() -> PortalStore:
    return settings().store()


@functools.cache
def sqs() -> SQSClient:
    return boto3.client("sqs", config=BOTO_CONFIG)


def reset() -> None:
    """Forget the cached settings and clients (tests, or after the environment changed)."""
    for cached in (settings, store, sqs):
        cached.cache_clear()
