"""`b24-cleanup migrate --to dynamodb` (design §3a): move portal records from SSM to the table, never branching a chain.

Per portal: copy the record into the table with a conditional put (absent only), then overwrite
the SSM parameter with the tombstone ``{"moved_to": "dynamodb", "table": "<name>"}`` (no tokens
left in it). From then on any SSM-store reader fails loudly on it (store.MovedRecordError, a
ConfigError naming the table) and never uses or refreshes its tokens.

SSM has no conditional write, so a writer that is refreshing the portal on the SSM store while it
moves could land its new pair between the copy and the tombstone, or (having read before the
tombstone) after it. Neither may lose the pair, which is the only live end of the chain:

- right before the tombstone the parameter is read again; if it changed since the copy, the
  table item (still at the version this run wrote) is updated by compare-and-swap and the check
  repeats;
- right after it, the version just before the tombstone's is what the tombstone replaced: if that
  is not what was copied, a write slipped in between, and its content goes to the table the same way;
- a final pass, after a settle time longer than a writer's read-to-write window, finds any
  tombstone that a late writer overwrote, moves that content and writes the tombstone again.

A table item that someone else changed meanwhile (the functions already on B24_STORE=dynamodb)
is never overwritten: the portal counts as failed for an operator to look at, and its SSM
parameter is left as it is. The command is resumable: a record already in the table (a run that
stopped between copy and tombstone) is tombstoned and counted "already moved".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..dynamostore import DynamoPortalStore
from ..errors import ConfigError, RecordChangedError, TransientError
from ..record import PortalRecord
from ..store import PortalStore, is_tombstone, tombstone

log = logging.getLogger(__name__)

DEFAULT_SETTLE_SECONDS = (
    130.0  # the worker's timeout (120 s) and then some: every invocation that read before a tombstone has ended
)
_MAX_CHASES = 5


@dataclass
class MigrateCounts:
    moved: int = 0
    already_moved: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # member_id → reason (no tokens in it)

    @property
    def total(self) -> int:
        return self.moved + self.already_moved + self.failed


class _Lost(Exception):
    """The table item changed under this run: the portal needs an operator."""


class Migration:
    def __init__(
        self,
        source: PortalStore,
        target: DynamoPortalStore,
        *,
        dry_run: bool = False,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
        progress: Callable[[int, int | None, str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if isinstance(source, DynamoPortalStore):
            raise ConfigError("migrate reads portal records from SSM: run it with B24_STORE=ssm (the default)")
        self.source = source
        self.target = target
        self.dry_run = dry_run
        self.settle_seconds = settle_seconds
        self.progress = progress or (lambda done, total, member_id: None)
        self.sleep = sleep
        self.counts = MigrateCounts()
        # member_id → (table version this run wrote, SSM text it copied), for the final pass.
        self._moved: dict[str, tuple[int, str]] = {}

    # -- SSM raw access ------------------------------------------------------------------
    def _raw(self, member_id: str) -> str | None:
        return self.source._get(self.source.portal_name(member_id), decrypt=True)

    def _write_tombstone(self, member_id: str) -> int:
        """Overwrite the parameter with the tombstone; returns the version SSM gave it."""
        name = self.source.portal_name(member_id)
        return self.source._put(name, tombstone(self.target.table), self.source._meta(name))

    # -- one portal ----------------------------------------------------------------------
    def _adopt(self, member_id: str, text: str, version: int, copied: str) -> int:
        """Put newer SSM content (a pair rotated on the SSM side) into the table.

        Over the version this run wrote, or over a later one whose writer did not move the chain
        on (it still holds the refresh token that was copied: a mark or an address changed, on
        evidence that the newer pair makes stale). A table item with another refresh token means
        both sides rotated: that is for an operator, never overwritten here.
        """
        try:
            record = PortalRecord.from_json(text)
            copied_refresh = PortalRecord.from_json(copied).refresh_token
        except ValueError:
            raise _Lost("a writer stored something that is not a record") from None
        for _ in range(_MAX_CHASES):
            try:
                return self.target.write(member_id, record, version)
            except RecordChangedError:
                current, version = self.target.read(member_id)
                if current is None or current.refresh_token != copied_refresh:
                    raise _Lost("the table item changed while the record moved; left for an operator") from None
        raise _Lost("the table item kept changing while the record moved; left for an operator")

    def move(self, member_id: str) -> str:
        """Move one portal; returns `moved`, `already moved` or raises _Lost / a store error."""
        text = self._raw(member_id)
        if text is None:
            raise _Lost("the parameter disappeared while listing")
        if is_tombstone(text):
            if self.target.read(member_id)[0] is None:
                raise _Lost("tombstone in SSM but no item in the table")
            return "already moved"
        try:
            record = PortalRecord.from_json(text)
        except ValueError:
            raise _Lost("the SSM record is not a JSON object") from None
        if self.dry_run:
            return "already moved" if self.target.read(member_id)[0] is not None else "moved"
        outcome = "moved"
        if not self.target.create(member_id, record):
            outcome = "already moved"  # an earlier run copied it; the table is the record now
            self._write_tombstone(member_id)
            return outcome
        version = 1
        for _ in range(_MAX_CHASES):
            now = self._raw(member_id)
            if now == text:
                break
            if now is None or is_tombstone(now):
                raise _Lost("the parameter changed under the move")
            text, version = now, self._adopt(member_id, now, version, text)
        else:
            raise _Lost("the SSM record kept changing while it moved")
        replaced = self.source._replaced(self.source.portal_name(member_id), self._write_tombstone(member_id))
        if replaced is not None and replaced != text:
            log.warning("portal %s: a write landed just before the tombstone; moving its content", member_id)
            text, version = replaced, self._adopt(member_id, replaced, version, text)
        self._moved[member_id] = (version, text)
        return outcome

    def _final_pass(self) -> None:
        """Tombstones a late writer overwrote: move what it wrote, tombstone again."""
        if not self._moved:
            return
        self.sleep(self.settle_seconds)
        for member_id, (version, copied) in sorted(self._moved.items()):
            try:
                for _ in range(_MAX_CHASES):
                    now = self._raw(member_id)
                    if now is None or is_tombstone(now):
                        break
                    log.warning("portal %s: a writer overwrote the tombstone; moving its content", member_id)
                    version = self._adopt(member_id, now, version, copied)
                    copied = now
                    self._write_tombstone(member_id)
            except _Lost as lost:
                self._fail(member_id, str(lost), moved=True)

    def _fail(self, member_id: str, reason: str, *, moved: bool = False) -> None:
        if moved:
            self.counts.moved -= 1
        self.counts.failed += 1
        self.counts.failures[member_id] = reason
        log.error("portal %s: not moved: %s", member_id, reason)

    def run(self, member_ids: list[str] | None = None) -> MigrateCounts:
        ids = member_ids if member_ids is not None else list(self.source.iter_member_ids())
        for done, member_id in enumerate(ids, 1):
            try:
                outcome = self.move(member_id)
            except _Lost as lost:
                self._fail(member_id, str(lost))
            except (TransientError, ConfigError) as exc:
                self._fail(member_id, f"{type(exc).__name__}: {exc}")
            else:
                if outcome == "moved":
                    self.counts.moved += 1
                else:
                    self.counts.already_moved += 1
            self.progress(done, len(ids), member_id)
        if not self.dry_run:
            self._final_pass()
        return self.counts
