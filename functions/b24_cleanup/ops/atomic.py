"""AWS's writes are atomic; moto's are not across threads. This makes them so, for tests.

A conditional PutItem is one step in DynamoDB: the condition is checked and the item written
under the same lock, so of two writers on the same version one wins and the other gets
ConditionalCheckFailedException. moto checks the condition in Python and then writes, without a
lock: two threads can both pass the check, and one update is silently lost. SSM's PutParameter
is one step too, each write getting the next version; moto reads the last version and appends
the next one later, so two threads can both write "version 5". The DynamoDB store's
compare-and-swap and the SSM store's version check (store.PortalStore._mend) are only as good
as those steps, so a test world that races there would show lost updates the service never
makes (or hide our own). :func:`atomic_moto` puts moto's DynamoDB item writes and SSM parameter
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
_DYNAMODB_WRITES = ("put_item", "update_item", "delete_item", "batch_write_item", "transact_write_items")
_SSM_WRITES = ("put_parameter", "delete_parameter", "delete_parameters", "label_parameter_version")


def atomic_moto() -> None:
    """Serialise moto's DynamoDB item writes and SSM parameter writes (idempotent; process-wide)."""
    from moto.dynamodb.models import DynamoDBBackend  # dev dependency, imported only here
    from moto.ssm.models import SimpleSystemManagerBackend

    for backend, names in ((DynamoDBBackend, _DYNAMODB_WRITES), (SimpleSystemManagerBackend, _SSM_WRITES)):
        for name in names:
            method = getattr(backend, name, None)
            if method is None or getattr(method, "_b24_atomic", False):
                continue
            setattr(backend, name, _locked(method))


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return method(*args, **kwargs)

    locked._b24_atomic = True  # type: ignore[attr-defined]
    return locked


def main(argv: Sequence[str] | None = None) -> None:
    """moto's own server (same options), with atomic writes."""
    from moto.server import main as moto_server

    atomic_moto()
    moto_server(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
