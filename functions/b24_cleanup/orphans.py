"""The SSM side of held orphans (design §3): the declared set's history and the orphan ledger.

One :class:`OrphanRecords` per engine. It reads `GetParameterHistory` of `{prefix}/app/handlers`
and the ledger `{prefix}/app/orphans` at most once per worker invocation (like the declared set),
and only when a job of the invocation has an orphan at all: on a night without orphans the rules
cost no SSM call. The ledger is written only when a key is seen for the first time, as a
read-modify-write under a lock, so the portals of one batch that meet the same new orphan write
it once. SSM has no conditional write: two workers writing at once lose one update, and the lost
key is simply added again, later, by whoever sees it next: an orphan waits longer, never shorter.

Every failure here holds: a history or ledger that cannot be read holds every orphan of the
invocation; a ledger write that fails leaves the keys unrecorded (first seen again next time).
None of it fails the job: a sweep that holds its orphans is still a sweep that did its work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from .errors import ConfigError, TransientError
from .held import DeclaredHistory, Evidence, Ledger, Split, Version, split
from .planner import DeclaredSet, HandlerRow

if TYPE_CHECKING:
    from .store import PortalStore

log = logging.getLogger(__name__)

# Long runs (the CLI's `plan --all`, a sweep of everything) re-read at most this often, like the
# declared set; a Lambda invocation is shorter than this, so there it is once per invocation.
EVIDENCE_TTL = 60.0
HISTORY_PAGE = 50  # GetParameterHistory's maximum; SSM keeps 100 versions, so at most 2 pages


@dataclass
class _Loaded:
    at: float  # time.monotonic() of the read
    history: DeclaredHistory | None
    history_problem: str
    ledger: Ledger


class OrphanRecords:
    """Reads the evidence for the time rules once per invocation and records first-seen orphans."""

    def __init__(
        self,
        store: PortalStore,
        grace_days: int,
        *,
        clock: Callable[[], float] = time.time,
        ttl: float = EVIDENCE_TTL,
    ) -> None:
        # Reads go to the store's read client; the ledger write goes through the store, so that it
        # is paced and bounded like every other SSM write of the worker (design §5 step 3).
        self._store = store
        self.handlers_name = f"{store.prefix}/app/handlers"
        self.ledger_name = f"{store.prefix}/app/orphans"
        self.grace_days = grace_days
        self.clock = clock
        self.ttl = ttl
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._seen: set[str] = set()  # every orphan key of this invocation: never pruned by our own write
        self.calls: Counter[str] = Counter()  # SSM calls made, by operation (measured in tests and the bench)

    def new_invocation(self) -> None:
        """A new worker invocation: the next orphan re-reads the history and the ledger."""
        with self._lock:
            self._loaded = None
            self._seen = set()

    # -- reading -------------------------------------------------------------------------------
    def evidence(self) -> Evidence:
        """What the time rules need, for a decision now. Reads SSM only on the first call."""
        now = self.clock()
        if self.grace_days <= 0:
            return Evidence(grace_days=0, now=now)  # grace off: neither history nor ledger matters
        with self._lock:
            loaded = self._load()
        return Evidence(self.grace_days, now, loaded.history, loaded.ledger, loaded.history_problem)

    def _load(self) -> _Loaded:
        stamp = time.monotonic()
        if self._loaded is not None and stamp - self._loaded.at <= self.ttl:
            return self._loaded
        history, problem = self._read_history()
        self._loaded = _Loaded(stamp, history, problem, self._read_ledger())
        return self._loaded

    def _read_history(self) -> tuple[DeclaredHistory | None, str]:
        versions: list[Version] = []
        token: str | None = None
        try:
            while True:
                args: dict[str, object] = {"Name": self.handlers_name, "WithDecryption": False}
                args["MaxResults"] = HISTORY_PAGE
                if token:
                    args["NextToken"] = token
                self.calls["GetParameterHistory"] += 1
                page = self._store.client.get_parameter_history(**args)  # type: ignore[arg-type]
                for item in page.get("Parameters", []):
                    modified = item.get("LastModifiedDate")
                    versions.append(
                        Version(
                            int(item.get("Version", 0)),
                            modified.timestamp() if modified is not None else 0.0,
                            str(item.get("Value", "")),
                        )
                    )
                token = page.get("NextToken")
                if not token:
                    break
        except (ClientError, BotoCoreError) as exc:
            # AccessDenied here is a template without ssm:GetParameterHistory: loud, but safe.
            log.error(
                "the declared set's history %s could not be read (%s): every orphan is held until it can be",
                self.handlers_name,
                _code(exc),
            )
            return None, "the declared set's history could not be read"
        if not versions:
            return None, "the declared set's history is empty"
        return DeclaredHistory.from_versions(versions), ""

    def _read_ledger(self) -> Ledger:
        self.calls["GetParameter"] += 1
        try:
            answer = self._store.client.get_parameter(Name=self.ledger_name, WithDecryption=False)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ParameterNotFound":
                return Ledger.parse(None)
            log.warning("orphan ledger %s could not be read (%s): every orphan is held", self.ledger_name, _code(exc))
            return Ledger.unreadable("the orphan ledger could not be read")
        except BotoCoreError as exc:
            log.warning("orphan ledger %s could not be read (%s): every orphan is held", self.ledger_name, _code(exc))
            return Ledger.unreadable("the orphan ledger could not be read")
        ledger = Ledger.parse(answer["Parameter"]["Value"])
        if ledger.broken:
            log.warning("%s (%s): every orphan is held, a fresh ledger replaces it", ledger.problem, self.ledger_name)
        return ledger

    # -- recording -----------------------------------------------------------------------------
    def record(self, keys: Iterable[str]) -> int:
        """Add the keys seen for the first time to the ledger; returns the writes made (0 or 1).

        Read-modify-write on a fresh read: a key another worker stored meanwhile keeps its time.
        """
        keys = set(keys)
        if self.grace_days <= 0 or not keys:
            return 0
        with self._lock:
            self._seen |= keys
            loaded = self._load()
            if not loaded.ledger.new_keys(keys):
                return 0  # nothing first seen: the common case costs nothing
            fresh = self._read_ledger()
            if fresh.unknown:
                return 0  # unknown content: never overwrite what may be a good ledger
            if not fresh.broken and not fresh.new_keys(keys):
                loaded.ledger = fresh  # another worker recorded them
                return 0
            try:
                merged = fresh.merged(self._seen, self.clock(), keep_days=max(60, self.grace_days))
            except ValueError as exc:
                log.error("orphan ledger not written: %s; the new orphans stay held", exc)
                return 0
            self.calls["PutParameter"] += 1
            try:
                # Intelligent-Tiering: Standard (free) while it fits 4 KB, Advanced up to 8 KB.
                self._store.put_text(self.ledger_name, merged.to_text(), tier="Intelligent-Tiering")
            except (TransientError, ConfigError) as exc:  # the store's SSM failures, code and name in the text
                log.warning("orphan ledger not written (%s): the new orphans stay held", exc)
                return 0
            loaded.ledger = merged
            log.info(
                "orphan ledger: %d key(s) first seen, %d in all", len(fresh.new_keys(keys)), len(merged.first_seen)
            )
            return 1


def _code(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "error"))
    return type(exc).__name__


def hold_orphans(
    records: OrphanRecords,
    declared: DeclaredSet,
    orphans: Sequence[HandlerRow],
    member_id: str,
    *,
    record: bool = True,
) -> Split:
    """Split one portal's orphans into the rows to unbind now and the held ones (design §3).

    Reads nothing when there is no orphan. Records the first-seen keys unless `record` is False
    (a dry run or `plan` writes no ledger: they report what a sweep would hold, and a sweep
    would record these keys as first seen tonight). Logs one line per portal with held rows:
    every held pair's event, URL, reason and until when.
    """
    if not orphans:
        return Split((), (), frozenset())
    result = split(orphans, declared, records.evidence())
    if record:
        records.record(result.seen_keys)
    if result.held:
        pairs = result.held_pairs()
        described = "; ".join(f"{p['event']} {p['handler'] or '(offline)'} x{p['rows']}: {p['detail']}" for p in pairs)
        log.warning(
            "%d orphan row(s) of %s held, not unbound: %s",
            sum(p["rows"] for p in pairs),
            member_id,
            described,
            extra={"held": pairs, "member_id": member_id},
        )
    return result
