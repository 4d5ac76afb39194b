"""DynamoDB's writes are atomic; moto's are not across threads. This makes them so, for tests.

A conditional PutItem is one step in DynamoDB: the condition is checked and the item written
under the same lock, so of two writers on the same version one wins and the other gets
ConditionalCheckFailedException. moto checks the condition in Python and then writes, without a
lock: two threads can both pass the check, and one update is silently lost. The DynamoDB store's
compare-and-swap is only as good as that step, so a test world that races there would show lost
updates the service never makes (or hide our own). :func:`atomic_dynamodb` puts moto's item
writes under one lock; reads stay unlocked, as they see whole items either way.

    python -m b24_cleanup.ops.atomic -H 127.0.0.1 -p PORT    # moto's server, atomic writes
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

_LOCK = threading.RLock()
_WRITES = ("put_item", "update_item", "delete_item", "batch_write_item", "transact_write_items")


def atomic_dynamodb() -> None:
    """Serialise moto's DynamoDB item writes (idempotent; process-wide)."""
    from moto.dynamodb.models import DynamoDBBackend  # dev dependency, imported only here

    for name in _WRITES:
        method = getattr(DynamoDBBackend, name, None)
        if method is None or getattr(method, "_b24_atomic", False):
            continue
        setattr(DynamoDBBackend, name, _locked(method))


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return method(*args, **kwargs)

    locked._b24_atomic = True  # type: ignore[attr-defined]
    return locked


def main(argv: Sequence[str] | None = None) -> None:
    """moto's own server (same options), with atomic DynamoDB writes."""
    from moto.server import main as moto_server

    atomic_dynamodb()
    moto_server(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
