"""Held orphans (design §3 "Held orphans"): which orphans a sweep must not unbind yet, why, until when.

Pure functions and values, no I/O: the caller hands in the declared set, the versions of the
declared set's parameter history, the orphan ledger's text and the time; it gets back, per orphan
row, either "unbind" or a :class:`Hold` with its reason and the time it ends. `orphans.py` does
the SSM side (reads once per invocation, the ledger's read-modify-write).

Why these rules exist: a well-formed but *wrong* declared set (a trailing slash typed into a URL,
an entry edited away, a URL the app bound before anyone declared it) would otherwise unbind a live
handler on every portal in one night, and Bitrix24 never re-sends an event that found no handler.
Every rule here errs towards holding: anything unknown (a ledger that cannot be read, a history
that cannot be read or does not reach back far enough) holds, so a broken input delays an unbind,
never releases one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import InvalidDeclaredSetError
from .planner import DeclaredHandler, DeclaredSet, HandlerRow

DAY = 86400
# design §3: keys not seen for 60 days may be dropped. The ledger only stores first-seen times, so
# "not seen" is judged by one writer: a key older than this that the writer did not see itself.
# Dropping a key that is still an orphan somewhere only makes it wait one more grace (it is
# re-added as first seen then): a delay, never an early release.
LEDGER_KEEP_DAYS = 60
# An SSM String parameter holds 4 KB in the Standard tier, 8 KB in Advanced (the ledger is written
# with Intelligent-Tiering, so it moves up only if it must). ~30 bytes a key: ~270 keys.
LEDGER_MAX_BYTES = 8192

_DEFAULT_PORTS = {"http": 80, "https": 443}
_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


# --------------------------------------------------------------------------------------------
# Near misses: URL normalisation
# --------------------------------------------------------------------------------------------


def normalise_url(url: str) -> str:
    """The form two URLs are compared in for a near miss (design §3).

    Scheme and host lower-cased, the scheme's default port dropped, trailing `/` of the path
    dropped, percent-escapes upper-cased (`%2f` and `%2F` are the same escape). Everything else
    (user info, path case, query, fragment) is kept as written: those are different URLs to any
    web server, and a near miss is about the differences that are not. A URL that does not
    parse is returned unchanged (it can only equal itself).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return url
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal: urlsplit dropped its brackets
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    netloc = f"{userinfo}@{host}" if userinfo else host
    path = _escapes_upper(parts.path).rstrip("/")
    return urlunsplit((scheme, netloc, path, _escapes_upper(parts.query), _escapes_upper(parts.fragment)))


def _escapes_upper(text: str) -> str:
    return _ESCAPE.sub(lambda m: m.group().upper(), text)


def near_miss_of(row: HandlerRow, declared: DeclaredSet) -> str | None:
    """The declared URL that an online orphan row nearly matches, or None.

    Only online rows of an event that the set declares online can be near misses; the caller
    passes orphans only, so an exact match never gets here.
    """
    if row.offline or row.handler is None:
        return None
    event = row.event.strip().upper()
    wanted = normalise_url(row.handler)
    for entry in declared.handlers:
        if entry.offline or entry.event != event or entry.handler is None:
            continue
        if entry.handler != row.handler and normalise_url(entry.handler) == wanted:
            return entry.handler
    return None


# --------------------------------------------------------------------------------------------
# The orphan ledger `{prefix}/app/orphans`
# --------------------------------------------------------------------------------------------


def ledger_key(event: str, handler: str | None) -> str:
    """`<key>` of design §3: sha256 of "<EVENT>\\n<url>" (or "<EVENT>\\noffline"), first 16 hex digits."""
    text = f"{event.strip().upper()}\n{'offline' if handler is None else handler}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def row_key(row: HandlerRow) -> str:
    """The ledger key of a row: online rows by (event, URL), offline rows by event alone."""
    return ledger_key(row.event, None if row.offline else row.handler)


_KEY = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class Ledger:
    """The orphan ledger: key → unix time the orphan was first seen on any portal.

    `broken` is True when the parameter was missing or unreadable: then every orphan counts as
    first seen now (design §3), and the first writer replaces it with a fresh one.
    """

    first_seen: Mapping[str, int] = field(default_factory=dict)
    broken: bool = False
    problem: str = ""  # why it is broken, for the log (never the content)
    unknown: bool = False  # the read failed: the stored ledger may be fine, so it is never replaced

    @classmethod
    def parse(cls, text: str | None) -> Ledger:
        """Parse the parameter's text; anything but the exact format of design §3 is `broken`."""
        if text is None:
            return cls(broken=True, problem="the orphan ledger is missing")
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            return cls(broken=True, problem="the orphan ledger is not parseable JSON")
        orphans = document.get("orphans") if isinstance(document, dict) else None
        if not isinstance(orphans, dict):
            return cls(broken=True, problem="the orphan ledger has no 'orphans' object")
        entries: dict[str, int] = {}
        for key, value in orphans.items():
            # bool is an int to Python; a first-seen time of `true` is not a time.
            if not _KEY.fullmatch(key) or isinstance(value, bool) or not isinstance(value, int | float):
                return cls(broken=True, problem="the orphan ledger has a malformed entry")
            if not math.isfinite(value) or value < 0:
                return cls(broken=True, problem="the orphan ledger has a malformed entry")
            entries[key] = int(value)
        return cls(first_seen=entries)

    @classmethod
    def unreadable(cls, problem: str) -> Ledger:
        """A ledger whose read failed: holds everything, like a broken one, but is not replaced."""
        return cls(broken=True, problem=problem, unknown=True)

    def to_text(self) -> str:
        """The parameter value, compact and sorted (a stable text: equal ledgers, equal values)."""
        return json.dumps({"orphans": dict(sorted(self.first_seen.items()))}, separators=(",", ":"))

    def seen_at(self, key: str, now: float) -> float:
        """When `key` was first seen; `now` for a key not in it, or for any key of a broken ledger."""
        if self.broken:
            return now
        return self.first_seen.get(key, now)

    def new_keys(self, keys: Iterable[str]) -> frozenset[str]:
        """The keys this ledger does not hold yet (all of them, when it is broken)."""
        if self.broken:
            return frozenset(keys)
        return frozenset(k for k in keys if k not in self.first_seen)

    def merged(
        self,
        seen: Iterable[str],
        now: float,
        *,
        keep_days: int = LEDGER_KEEP_DAYS,
        max_bytes: int = LEDGER_MAX_BYTES,
    ) -> Ledger:
        """This ledger with the `seen` keys added as first seen `now` (existing times are kept).

        A broken ledger is replaced by a fresh one holding only `seen`. Keys first seen more than
        `keep_days` ago that are not in `seen` are dropped, and when the text would still not fit
        in `max_bytes` the oldest such keys go first: a dropped key that is still an orphan
        somewhere is re-added as first seen then, so dropping only ever delays. Keys in `seen` are
        never dropped; a merge that cannot fit even them raises ValueError (nothing is written).
        """
        seen = set(seen)
        stamp = int(now)
        entries: dict[str, int] = {} if self.broken else dict(self.first_seen)
        for key in seen:
            entries.setdefault(key, stamp)
        cutoff = now - keep_days * DAY
        entries = {k: v for k, v in entries.items() if k in seen or v >= cutoff}
        ledger = Ledger(entries)
        if len(ledger.to_text().encode()) <= max_bytes:
            return ledger
        droppable = sorted((v, k) for k, v in entries.items() if k not in seen)
        for _, key in droppable:
            del entries[key]
            ledger = Ledger(entries)
            if len(ledger.to_text().encode()) <= max_bytes:
                return ledger
        raise ValueError(f"the orphan ledger cannot hold {len(seen)} keys within {max_bytes} bytes")


# --------------------------------------------------------------------------------------------
# The declared set's own history (SSM parameter history of `{prefix}/app/handlers`)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """One version of the declared set's parameter, as GetParameterHistory gives it."""

    version: int
    modified: float  # LastModifiedDate, unix seconds
    text: str


@dataclass(frozen=True)
class _Window:
    start: float
    end: float | None  # None: the current version, current until now
    online: frozenset[tuple[str, str]]
    offline: frozenset[str]


def declared_entries(text: str) -> tuple[DeclaredHandler, ...]:
    """What one version of the set declared, also for a version that was invalid as a whole.

    An invalid version unbound nothing while it was current, but the entries an operator meant
    are still the best evidence of which handlers are live: every entry that is well-formed on
    its own counts (holding more is the safe side).
    """
    try:
        return DeclaredSet.parse(text).handlers
    except InvalidDeclaredSetError:
        pass
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return ()
    entries = document.get("handlers") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        return ()
    found: list[DeclaredHandler] = []
    for entry in entries:
        try:
            found.extend(DeclaredSet.parse(json.dumps({"handlers": [entry]})).handlers)
        except (InvalidDeclaredSetError, TypeError, ValueError):
            continue
    return tuple(found)


@dataclass(frozen=True)
class DeclaredHistory:
    """When the declared set named what: each version current from its LastModifiedDate until the next's.

    `earliest` is the time before which nothing is known: SSM keeps the last 100 versions, so
    when version 1 is gone the history starts at the oldest version kept. A grace reaching back
    past `earliest` cannot be judged, and then every orphan is held.
    """

    windows: tuple[_Window, ...]
    earliest: float | None  # None: the history goes back to version 1

    @classmethod
    def from_versions(cls, versions: Sequence[Version]) -> DeclaredHistory:
        ordered = sorted(versions, key=lambda v: v.version)
        windows: list[_Window] = []
        for i, version in enumerate(ordered):
            end = ordered[i + 1].modified if i + 1 < len(ordered) else None
            entries = declared_entries(version.text)
            online = frozenset((e.event, e.handler) for e in entries if not e.offline and e.handler is not None)
            offline = frozenset(e.event for e in entries if e.offline)
            windows.append(_Window(version.modified, end, online, offline))
        earliest = None if not ordered or ordered[0].version <= 1 else ordered[0].modified
        return cls(tuple(windows), earliest)

    def declared_until(self, row: HandlerRow, since: float, now: float) -> float | None:
        """The latest time after `since` at which a version named the row's pair, or None.

        Online rows match by event (any case) and exact URL, offline rows by event. A version
        still current names it until `now`.
        """
        event = row.event.strip().upper()
        latest: float | None = None
        for window in self.windows:
            end = now if window.end is None else window.end
            if end <= since:
                continue
            named = event in window.offline if row.offline else (event, row.handler) in window.online
            if named and (latest is None or end > latest):
                latest = end
        return latest

    def covers(self, since: float) -> bool:
        """True when the history reaches back to `since` (nothing unknown after it)."""
        return self.earliest is None or self.earliest <= since


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


class HoldReason(StrEnum):
    NEAR_MISS = "near_miss"
    DECLARED_WITHIN_GRACE = "declared_within_grace"
    FIRST_SEEN_WITHIN_GRACE = "first_seen_within_grace"
    HISTORY_UNKNOWN = "history_unknown"


@dataclass(frozen=True)
class Hold:
    """Why one orphan pair is held and until when (`until` None: until the cause is fixed)."""

    reason: HoldReason
    until: float | None
    near_miss_of: str | None = None
    declared_until: float | None = None
    first_seen: float | None = None
    note: str = ""  # e.g. "the orphan ledger is missing" (never a value from the ledger)
    grace_days: int = 0

    def status(self) -> str:
        """The short form of the fleet table: `held: near miss of …`, `held: declared until …`."""
        if self.reason is HoldReason.NEAR_MISS:
            return f"held: near miss of {self.near_miss_of}"
        if self.reason is HoldReason.DECLARED_WITHIN_GRACE:
            return f"held: declared until {stamp(self.declared_until)}, grace until {stamp(self.until)}"
        if self.reason is HoldReason.FIRST_SEEN_WITHIN_GRACE:
            if self.note:  # first seen by this very decision: no time of its own to show yet
                return f"held: first seen now ({self.note}; grace {self.grace_days} days)"
            return f"held: first seen {stamp(self.first_seen)}, grace until {stamp(self.until)}"
        return f"held: {self.note or 'the declared set history is unknown'}"

    def describe(self) -> str:
        """One sentence for a log line: the reason and until when."""
        if self.reason is HoldReason.NEAR_MISS:
            return f"near miss of the declared {self.near_miss_of}; held until the declared set changes"
        if self.reason is HoldReason.DECLARED_WITHIN_GRACE:
            return f"the declared set named it until {stamp(self.declared_until)}; held until {stamp(self.until)}"
        if self.reason is HoldReason.FIRST_SEEN_WITHIN_GRACE:
            extra = f" ({self.note})" if self.note else ""
            return f"first seen as an orphan {stamp(self.first_seen)}{extra}; held until {stamp(self.until)}"
        return f"{self.note or 'the declared set history is unknown'}; held until it can be read"

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason.value,
            "status": self.status(),
            "until": _iso(self.until),
            "near_miss_of": self.near_miss_of,
            "declared_until": _iso(self.declared_until),
            "first_seen": _iso(self.first_seen),
            "detail": self.describe(),
        }


def stamp(when: float | None) -> str:
    """A time as operators read it in logs and tables: `2026-12-01 22:41 UTC`."""
    if when is None:
        return "(unknown)"
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Evidence:
    """What one invocation knows for the time rules: the grace, the history, the ledger, the time.

    `history` None means it could not be read: every orphan is then held (grace > 0). With a
    grace of 0 neither is consulted (design §3: 0 turns the grace off; near misses still hold).
    """

    grace_days: int
    now: float
    history: DeclaredHistory | None = None
    ledger: Ledger = field(default_factory=Ledger)
    history_problem: str = ""

    @property
    def grace(self) -> float:
        return self.grace_days * DAY


def decide(row: HandlerRow, declared: DeclaredSet, evidence: Evidence) -> Hold | None:
    """Whether an orphan row is held (a :class:`Hold`) or may be unbound now (None).

    Precedence when several rules hold it: a near miss (it never ends by time), then an unknown
    history, then whichever time rule ends last, which is when it will actually be released.
    """
    near = near_miss_of(row, declared)
    if near is not None:
        return Hold(HoldReason.NEAR_MISS, None, near_miss_of=near)
    if evidence.grace_days <= 0:
        return None
    now, since = evidence.now, evidence.now - evidence.grace
    history = evidence.history
    if history is None or not history.covers(since):
        note = evidence.history_problem or "the declared set's history does not reach back the whole grace"
        return Hold(HoldReason.HISTORY_UNKNOWN, None, note=note)

    holds: list[Hold] = []
    until_declared = history.declared_until(row, since, now)
    if until_declared is not None:
        holds.append(
            Hold(
                HoldReason.DECLARED_WITHIN_GRACE,
                until_declared + evidence.grace,
                declared_until=until_declared,
                grace_days=evidence.grace_days,
            )
        )
    first = evidence.ledger.seen_at(row_key(row), now)
    if now - first < evidence.grace:
        note = evidence.ledger.problem if evidence.ledger.broken else ""
        if not evidence.ledger.broken and row_key(row) not in evidence.ledger.first_seen:
            note = "not in the orphan ledger yet"
        holds.append(
            Hold(
                HoldReason.FIRST_SEEN_WITHIN_GRACE,
                first + evidence.grace,
                first_seen=first,
                note=note,
                grace_days=evidence.grace_days,
            )
        )
    if not holds:
        return None
    return max(holds, key=lambda h: h.until or 0.0)


@dataclass(frozen=True)
class Split:
    """The orphans of one portal, split into those to unbind now and those held (with why)."""

    release: tuple[HandlerRow, ...]
    held: tuple[tuple[HandlerRow, Hold], ...]
    seen_keys: frozenset[str]  # every orphan's ledger key: what the ledger must hold afterwards

    def held_pairs(self) -> list[dict[str, Any]]:
        """One entry per held (event, URL) or (event, offline) pair with its row count and reason."""
        pairs: dict[tuple[str, str | None, bool], dict[str, Any]] = {}
        for row, hold in self.held:
            key = (row.event.strip().upper(), row.handler, row.offline)
            if key not in pairs:
                pairs[key] = {
                    "event": row.event,
                    "handler": row.handler,
                    "offline": row.offline,
                    "rows": 0,
                    **hold.as_dict(),
                }
            pairs[key]["rows"] += 1
        return list(pairs.values())


def split(orphans: Sequence[HandlerRow], declared: DeclaredSet, evidence: Evidence) -> Split:
    """Decide every orphan row; the rows of one pair always share one decision (design §3)."""
    release: list[HandlerRow] = []
    held: list[tuple[HandlerRow, Hold]] = []
    decided: dict[tuple[str, str | None, bool], Hold | None] = {}
    for row in orphans:
        pair = (row.event.strip().upper(), None if row.offline else row.handler, row.offline)
        if pair not in decided:
            decided[pair] = decide(row, declared, evidence)
        hold = decided[pair]
        if hold is None:
            release.append(row)
        else:
            held.append((row, hold))
    return Split(tuple(release), tuple(held), frozenset(row_key(row) for row in orphans))
