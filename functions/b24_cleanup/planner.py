"""What to keep and what to unbind: the declared handler set (design §3) and the unbind plan (§5 step 5).

Pure functions, no I/O: the store hands in the raw parameter text, the client hands in the answer
of `event.get`, and the engine gets back a plan and the client's `event.unbind` commands for `batch`.

The guiding rule is design §7's first one: a declared handler must never be unbound. So the parser
refuses anything it is not sure about (an invalid set is never half-used; the sweep then unbinds
nothing anywhere), and classification compares exactly what Bitrix24 compares: the event name
without regard to case, the handler URL byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from .commands import Command
from .errors import InvalidDeclaredSetError, PermanentError
from .payload import ONAPPUNINSTALL as UNINSTALL_EVENT  # the event names' one home

UNBIND_METHOD = "event.unbind"

_ONLINE = "online"
_OFFLINE = "offline"
_URL_SCHEMES = frozenset({"http", "https"})

# How `event.get` spells the `offline` flag is documented as 0/1 (design §10.3); JSON-decoding
# middleware, the emulator or a future API version may hand us a bool or a string instead.
_OFFLINE_TRUE = frozenset({"1", "true", "y", "yes"})
_OFFLINE_FALSE = frozenset({"0", "false", "n", "no", ""})


# --------------------------------------------------------------------------------------------
# The declared handler set (design §3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeclaredHandler:
    """One entry of the declared set.

    `event` is stripped and upper-cased (Bitrix24 upper-cases event names itself, so that is
    the form rows come back in); `handler` is kept exactly as written, because `event.unbind`
    and therefore our comparison match the URL exactly. Offline entries have no handler.
    """

    event: str
    handler: str | None
    offline: bool

    def as_dict(self) -> dict[str, Any]:
        """A log- and JSON-friendly view (e.g. the `missing` list of a job's report)."""
        if self.offline:
            return {"event": self.event, "event_type": _OFFLINE}
        return {"event": self.event, "handler": self.handler}


@dataclass(frozen=True)
class DeclaredSet:
    """The app's declared handler set: every owned handler outside it is an orphan.

    `handlers` keeps the order of the parameter with exact duplicates dropped (the set is a set;
    a duplicated line must not be reported as missing twice).
    """

    handlers: tuple[DeclaredHandler, ...]

    @classmethod
    def parse(cls, text: str | None) -> DeclaredSet:
        """Parse the `{prefix}/app/handlers` parameter, or raise :class:`InvalidDeclaredSetError`.

        The reason names the rule that failed and the entry's index, never a value: the
        parameter is operator input and the message ends up in logs and metrics' log lines.

        Beyond design §3's rules, two ambiguities are refused as well, because either could hide
        which handler an operator meant to keep: a JSON object with the same key twice (JSON
        parsers disagree on which one wins), and a handler URL containing white space or
        control characters (a URL is compared byte for byte, so a stray blank would silently
        turn the live handler into an orphan). Unknown extra keys, in an entry or at the top
        level, are allowed and ignored: they leave no doubt about what is declared, and they
        let operators annotate the parameter (e.g. a `comment`). An `auth_type` or
        `auth_connector` key is such an extra key too: design §3 matches on event and URL only.
        """
        if text is None:
            raise InvalidDeclaredSetError("declared handler set is missing (no parameter)")
        if not isinstance(text, str):
            raise InvalidDeclaredSetError("declared handler set is not text")
        try:
            document = json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise InvalidDeclaredSetError(f"declared handler set is ambiguous: an object repeats {exc}") from None
        except ValueError:  # json.JSONDecodeError
            raise InvalidDeclaredSetError("declared handler set is not parseable JSON") from None
        except RecursionError:
            raise InvalidDeclaredSetError("declared handler set is nested too deeply to parse") from None
        if not isinstance(document, dict):
            raise InvalidDeclaredSetError("declared handler set is not a JSON object")
        if "handlers" not in document:
            raise InvalidDeclaredSetError("declared handler set has no 'handlers' key")
        entries = document["handlers"]
        if not isinstance(entries, list):
            raise InvalidDeclaredSetError("declared handler set: 'handlers' is not a list")
        if not entries:
            raise InvalidDeclaredSetError("declared handler set: 'handlers' is empty")
        parsed = [_parse_entry(index, entry) for index, entry in enumerate(entries)]
        return cls(tuple(dict.fromkeys(parsed)))

    def declares_event(self, event: str) -> bool:
        """True when any entry (online or offline) names `event` (case-insensitive)."""
        wanted = _event_key(event)
        return any(entry.event == wanted for entry in self.handlers)


class _DuplicateKey(ValueError):
    """A JSON object named the same key twice (the message is the key's name, set by us)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            # Only the known key names are echoed; anything else stays anonymous (no values).
            raise _DuplicateKey(f"the key {key!r}" if key in _KNOWN_KEYS else "a key")
        seen[key] = value
    return seen


_KNOWN_KEYS = frozenset({"handlers", "event", "handler", "event_type"})


def _parse_entry(index: int, entry: object) -> DeclaredHandler:
    where = f"declared handler set: handlers[{index}]"
    if not isinstance(entry, dict):
        raise InvalidDeclaredSetError(f"{where} is not an object")

    if "event" not in entry:
        raise InvalidDeclaredSetError(f"{where} has no 'event'")
    event = entry["event"]
    if not isinstance(event, str):
        raise InvalidDeclaredSetError(f"{where}: 'event' is not a string")
    event = event.strip()
    if not event:
        raise InvalidDeclaredSetError(f"{where}: 'event' is empty or only white space")

    offline = False
    if "event_type" in entry:
        event_type = entry["event_type"]
        if not isinstance(event_type, str):
            raise InvalidDeclaredSetError(f"{where}: 'event_type' is present but not a string")
        if not event_type:
            raise InvalidDeclaredSetError(f"{where}: 'event_type' is present but empty")
        kind = event_type.lower()
        if kind not in (_ONLINE, _OFFLINE):
            raise InvalidDeclaredSetError(f"{where}: 'event_type' is neither 'online' nor 'offline'")
        offline = kind == _OFFLINE

    if offline:
        if "handler" in entry:
            raise InvalidDeclaredSetError(
                f"{where}: an offline entry must not have a 'handler' (ambiguous: it could be an online one)"
            )
        return DeclaredHandler(event=_event_key(event), handler=None, offline=True)

    if "handler" not in entry:
        raise InvalidDeclaredSetError(f"{where}: an online entry has no 'handler'")
    handler = entry["handler"]
    if not isinstance(handler, str):
        raise InvalidDeclaredSetError(f"{where}: 'handler' is present but not a string")
    if not handler:
        raise InvalidDeclaredSetError(f"{where}: 'handler' is present but empty")
    problem = _url_problem(handler)
    if problem:
        raise InvalidDeclaredSetError(f"{where}: 'handler' {problem}")
    return DeclaredHandler(event=_event_key(event), handler=handler, offline=False)


def _url_problem(url: str) -> str | None:
    """Why `url` is not an http(s) URL with a host, or None when it is one."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "contains white space or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "is not a parseable URL"
    if parts.scheme.lower() not in _URL_SCHEMES:
        return "is not an http:// or https:// URL"
    if not parts.hostname:
        return "has no host"
    return None


def _event_key(event: str) -> str:
    """The form events are compared in: Bitrix24 treats event names case-insensitively."""
    return event.strip().upper()


# --------------------------------------------------------------------------------------------
# Owned handlers (rows of `event.get`, design §10.3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandlerRow:
    """One row of `event.get`: an online handler of one user, or an offline subscription.

    `event` is kept as the portal wrote it (upper-case in practice); comparisons upper-case it.
    Online rows carry `handler` and `auth_type` (a string, as `event.get` sends it) and an
    empty `connector_id`; offline rows carry `connector_id` ("" for none) and no handler.
    """

    event: str
    handler: str | None
    auth_type: str | None
    offline: bool
    connector_id: str = ""

    @classmethod
    def from_api(cls, item: dict[str, Any]) -> HandlerRow:
        """Build a row from one `event.get` item; ValueError for an item that cannot be one.

        Refused: a non-object, a missing or empty `event`, an `offline` flag that is neither a
        recognisable true nor false, and an online row without a handler URL (it could never
        be unbound by `event` + `handler`, and guessing would be worse than failing loudly).
        When `offline` is absent the keys decide: a `handler` means online, a `connector_id`
        means offline.
        """
        if not isinstance(item, dict):
            raise ValueError("event.get item is not an object")
        event = item.get("event")
        if not isinstance(event, str) or not event.strip():
            raise ValueError("event.get item has no event")
        event = event.strip()
        offline = _offline_flag(item)
        if offline:
            connector = item.get("connector_id")
            connector_id = "" if connector is None else str(connector)
            return cls(event=event, handler=None, auth_type=None, offline=True, connector_id=connector_id)
        handler = item.get("handler")
        if not isinstance(handler, str) or not handler:
            raise ValueError("online event.get item has no handler")
        auth = item.get("auth_type")
        auth_type = None if auth is None or isinstance(auth, bool) else str(auth)
        return cls(event=event, handler=handler, auth_type=auth_type, offline=False, connector_id="")

    def as_dict(self) -> dict[str, Any]:
        """A log- and JSON-friendly view; the same keys for both kinds, to keep log queries simple."""
        return {
            "event": self.event,
            "handler": self.handler,
            "auth_type": self.auth_type,
            "offline": self.offline,
            "connector_id": self.connector_id,
        }


@dataclass(frozen=True)
class Listing:
    """`event.get`'s answer, read: the rows, and the items that are not rows (kept aside, never dropped)."""

    rows: tuple[HandlerRow, ...]
    unreadable: tuple[object, ...] = ()

    @classmethod
    def parse(cls, items: object) -> Listing:
        """Read `event.get`'s `result`; PermanentError when it is not a list of items at all."""
        if isinstance(items, dict):  # a PHP array with gaps may come back as an object
            items = list(items.values())
        if not isinstance(items, list):
            raise PermanentError("BAD_ANSWER", "event.get did not return a list", method="event.get")
        rows: list[HandlerRow] = []
        unreadable: list[object] = []
        for item in items:
            try:
                rows.append(HandlerRow.from_api(item))
            except (ValueError, TypeError):
                unreadable.append(item)
        return cls(tuple(rows), tuple(unreadable))

    @property
    def found(self) -> int:
        """Every item the portal listed, readable or not (design §6 HandlersFound)."""
        return len(self.rows) + len(self.unreadable)


def _offline_flag(item: Mapping[str, Any]) -> bool:
    if "offline" not in item or item["offline"] is None:
        if "handler" in item:
            return False
        if "connector_id" in item:
            return True
        raise ValueError("event.get item is neither online nor offline")
    value = item["offline"]
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if value in (0, 1):
            return bool(value)
        raise ValueError("event.get item has an unknown offline flag")
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _OFFLINE_TRUE:
            return True
        if text in _OFFLINE_FALSE:
            return False
    raise ValueError("event.get item has an unknown offline flag")


# --------------------------------------------------------------------------------------------
# Classification (design §3)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The owned handlers of one portal, split.

    `declared` holds every row that is kept, including `ONAPPUNINSTALL` rows kept because the
    declared set does not mention that event (design §3's exception); `orphans` the rows to
    unbind; `missing` the declared entries that no row matches (reported, never bound).
    """

    declared: tuple[HandlerRow, ...]
    orphans: tuple[HandlerRow, ...]
    missing: tuple[DeclaredHandler, ...]


def _row_matches(row: HandlerRow, entry: DeclaredHandler) -> bool:
    if _event_key(row.event) != entry.event:
        return False
    if entry.offline:
        return row.offline
    return not row.offline and row.handler == entry.handler


def classify(rows: Sequence[HandlerRow], declared: DeclaredSet) -> Plan:
    """Split `rows` into declared and orphan rows and find the declared-but-missing entries.

    A row is declared when an entry has its event (any case) and its exact handler URL (online)
    or is offline (offline rows, any connector). `auth_type` plays no part: an (event, handler)
    pair is declared or orphan as a whole. An `ONAPPUNINSTALL` row is an orphan only when the
    declared set names `ONAPPUNINSTALL` and the row does not match, so a forgotten entry can
    never cut the app off from its own uninstall events; online rows are apart (design §3): an
    online one is an orphan only when the set declares an *online* `ONAPPUNINSTALL` handler (an
    offline entry says nothing about which URL receives the event).
    """
    online = {(entry.event, entry.handler) for entry in declared.handlers if not entry.offline}
    offline = {entry.event for entry in declared.handlers if entry.offline}
    protect_offline_uninstall = not declared.declares_event(UNINSTALL_EVENT)
    protect_online_uninstall = not any(event == UNINSTALL_EVENT for event, _ in online)

    kept: list[HandlerRow] = []
    orphans: list[HandlerRow] = []
    for row in rows:
        event = _event_key(row.event)
        is_declared = event in offline if row.offline else (event, row.handler) in online
        protected = protect_offline_uninstall if row.offline else protect_online_uninstall
        if is_declared or (protected and event == UNINSTALL_EVENT):
            kept.append(row)
        else:
            orphans.append(row)

    missing = tuple(entry for entry in declared.handlers if not any(_row_matches(r, entry) for r in rows))
    return Plan(declared=tuple(kept), orphans=tuple(orphans), missing=missing)


def plan_uninstall(rows: Sequence[HandlerRow]) -> Plan:
    """The uninstall plan: the app is leaving the portal, so every owned handler goes."""
    return Plan(declared=(), orphans=tuple(rows), missing=())


def plan(rows: Sequence[HandlerRow], declared: DeclaredSet | None) -> Plan:
    """A sweep's plan against the declared set; with no set (an uninstall), the uninstall plan."""
    return classify(rows, declared) if declared is not None else plan_uninstall(rows)


# --------------------------------------------------------------------------------------------
# Unbind commands (design §5 step 5)
# --------------------------------------------------------------------------------------------


def command_key(index: int) -> str:
    """The batch key of the `index`-th command: never a digit string (design §10.9, fb24 #44)."""
    return f"u{index}"


def unbind_commands(orphans: Sequence[HandlerRow]) -> list[Command]:
    """One `event.unbind` per orphan online (event, handler) pair and per offline (event, connector).

    Online commands omit `auth_type` on purpose (design §5 step 5): an admin token then removes
    every user's row of the pair, a non-admin token its own rows, which are the only ones its
    `event.get` listed; and no integer `auth_type` has to survive batch's query strings. The
    event is sent upper-cased, which is how Bitrix24 stores it anyway. Commands come in the
    order their first row appeared; keys are `u0`, `u1`, ... over the whole list, so they stay
    unique when the caller cuts the list into batches of 50.

    A connector-keyed offline row's command is `alone`: sent as a single call with
    `auth_connector` top-level, because inside `batch` the portal would read the batch's (empty)
    connector and remove the row *without* one instead (design §5 step 5, design §10.15).
    """
    groups = dict.fromkeys(_unbind_group(row) for row in orphans)  # an ordered set
    return [
        Command(
            command_key(index),
            UNBIND_METHOD,
            MappingProxyType(_unbind_params(*group)),
            alone=group[0] and bool(group[2]),
        )
        for index, group in enumerate(groups)
    ]


def _unbind_group(row: HandlerRow) -> tuple[bool, str, str]:
    """What one `event.unbind` removes: an online (event, handler) pair, an offline (event, connector)."""
    event = _event_key(row.event)
    if row.offline:
        return (True, event, row.connector_id)
    if not row.handler:
        raise ValueError("an online row without a handler cannot be unbound")
    return (False, event, row.handler)


def _unbind_params(offline: bool, event: str, target: str) -> dict[str, str]:
    if not offline:
        return {"event": event, "handler": target}
    params = {"event": event, "event_type": _OFFLINE}
    if target:
        params["auth_connector"] = target
    return params
