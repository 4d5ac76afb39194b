"""Table 7, racing writers: changes to one record at the same moment, and how many are lost, per store.

Each round puts a fresh record, then W threads (each with its own store and boto3 client, as
separate containers have) start together and each makes C changes, one key each. A round loses
an update when a key is missing afterwards. The SSM store has no conditional write; it mends a
write that replaced another by the version SSM gave it (design §3). The DynamoDB store swaps on
`version`. moto's writes are made atomic, as AWS's are (b24_cleanup.ops.atomic). One line a shape:

    races: store=ssm writers=W changes=C rounds=R lost=L mended=M

`mended` counts the SSM store's mends (writes put back), so that a reader sees the race happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from b24_cleanup.store import PortalStore

NAME = "races"
TITLE = "7. Racing writers"
SHAPES = ((2, 1), (3, 1), (2, 3))  # (writers, changes each)


@dataclass(frozen=True)
class Sizes:
    rounds: int


FULL = Sizes(rounds=200)
QUICK = dataclasses.replace(FULL, rounds=10)


class _Mends(logging.Handler):
    """Counts the SSM store's "putting it back" warnings (one per mend)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "putting it back" in record.getMessage():
            self.count += 1


def _round(make: Callable[[], PortalStore], writers: int, changes: int) -> bool:
    """One round; True when an update was lost. `make` gives a fresh store with its own client."""
    from b24_cleanup.errors import TransientError
    from b24_cleanup.record import PortalRecord

    make().put("m1", PortalRecord({"member_id": "m1", "refresh_token": "r"}))
    barrier = threading.Barrier(writers, timeout=30)

    def write(w: int) -> None:
        mine = make()
        barrier.wait()
        for c in range(changes):
            with contextlib.suppress(TransientError):  # a writer storm: that change is lost, and counted so
                mine.modify("m1", lambda r, key=f"w{w}c{c}": r.data.update({key: 1}) is None)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    final = make().get("m1")
    wanted = {f"w{w}c{c}" for w in range(writers) for c in range(changes)}
    return final is None or not wanted <= set(final.data)


def measure(sizes: Sizes, runs: int) -> None:
    import boto3
    from moto import mock_aws

    from b24_cleanup.dynamostore import DynamoPortalStore, create_table
    from b24_cleanup.ops.atomic import atomic_moto
    from b24_cleanup.ops.sandbox import FAKE_AWS_ENV, REGION, patched_environ
    from b24_cleanup.store import PortalStore

    atomic_moto()
    mends = _Mends()
    store_log = logging.getLogger("b24_cleanup.store")
    store_log.addHandler(mends)
    store_log.propagate, was = False, store_log.propagate  # one warning a mend would drown the table
    print(f"\n{TITLE}: {sizes.rounds} rounds a shape; W threads with stores of their own, C changes each")
    try:
        with patched_environ(FAKE_AWS_ENV), mock_aws():
            create_table(boto3.client("dynamodb", region_name=REGION), "portals")

            def ssm_store() -> PortalStore:
                return PortalStore("/bench/races", client=boto3.client("ssm", region_name=REGION))

            def table_store() -> PortalStore:
                return DynamoPortalStore(
                    "/bench/races", "portals", boto3.client("dynamodb", region_name=REGION), ssm=ssm_store().client
                )

            for store, make in (("ssm", ssm_store), ("dynamodb", table_store)):
                for writers, changes in SHAPES:
                    mends.count = 0
                    lost = sum(_round(make, writers, changes) for _ in range(sizes.rounds))
                    shown = mends.count if store == "ssm" else "-"
                    print(
                        f"races: store={store} writers={writers} changes={changes} rounds={sizes.rounds} "
                        f"lost={lost} mended={shown}"
                    )
    finally:
        store_log.removeHandler(mends)
        store_log.propagate = was
