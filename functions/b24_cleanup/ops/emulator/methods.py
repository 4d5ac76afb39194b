"""The REST methods a portal serves: `event.get`, `event.bind`, `event.unbind`, `batch` and a few
harmless read methods, with the argument checks and error codes of design §10.2, §3, §4 and §9.

These run under the emulator's state lock, on behalf of an authenticated :class:`Caller`; they
raise :class:`ApiError` for every error answer. Parameter names are case-insensitive (the source
does `array_change_key_case`), and parameter values may be JSON values (a JSON body) or strings (a
form body, a query string, a `batch` sub-call) — the difference matters for `auth_type`.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import phpform
from .models import ApiError, App, time_block

if TYPE_CHECKING:
    from .state import Portal

BATCH_MAX_LENGTH = 50
_EVENT_NAME_RE = re.compile(r"^ON[A-Z0-9_]+$")
# Events whose description carries `disableOffline` ([src] Event::onRestServiceBuildDescription).
_NO_OFFLINE_EVENTS = frozenset({"ONOFFLINEEVENT"})
_INT_PREFIX_RE = re.compile(r"^\s*([+-]?\d+)")
# The scope an event belongs to, by name prefix (longest first). [docs] lists events per scope;
# the emulator keeps only the prefixes, and an event of no listed prefix counts as `basic`
# (always allowed): there is no full event list here.
_EVENT_SCOPES: tuple[tuple[str, str], ...] = (
    ("ONIMCONNECTOR", "imconnector"),
    ("ONIMBOT", "imbot"),
    ("ONIMOPENLINES", "imopenlines"),
    ("ONCRM", "crm"),
    ("ONTASK", "task"),
    ("ONUSER", "user"),
    ("ONIM", "im"),
    ("ONCALENDAR", "calendar"),
    ("ONSONETGROUP", "sonet_group"),
    ("ONDISK", "disk"),
    ("ONTELEPHONY", "telephony"),
    ("ONVOXIMPLANT", "telephony"),
    ("ONLISTS", "lists"),
    ("ONSALE", "sale"),
    ("ONCATALOG", "catalog"),
    ("ONLANDING", "landing"),
    ("ONTIMEMAN", "timeman"),
    ("ONBIZPROC", "bizproc"),
)
_CANONICAL_INT_RE = re.compile(r"^(0|-?[1-9]\d*)$")


@dataclass(frozen=True)
class Caller:
    """Who is calling: the portal, the app behind the token and the token's user."""

    portal: Portal
    app: App
    user_id: int

    @property
    def client_id(self) -> str:
        return self.app.client_id

    @property
    def is_admin(self) -> bool:
        return bool(self.portal.users.get(self.user_id, False))


# -- PHP value semantics ---------------------------------------------------------------------


def php_intval(value: Any) -> int:
    """PHP's `intval`: leading digits of a string, 0 for anything unparseable."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        match = _INT_PREFIX_RE.match(value)
        return int(match.group(1)) if match else 0
    return 0


def php_bool(value: Any) -> bool:
    """PHP's `(bool)`: "", "0", 0, null and empty arrays are false."""
    if isinstance(value, str):
        return value not in ("", "0")
    return bool(value)


def text(value: Any) -> str:
    """A parameter as PHP would see it in a string context (arrays count as empty here)."""
    if value is None or isinstance(value, dict | list):
        return ""
    if isinstance(value, bool):
        return "1" if value else ""
    return str(value)


def normalize_method(name: str) -> str:
    """`Event.Get.json` → `event.get`: portals accept any case and an optional `.json` suffix."""
    name = name.strip().lower()
    return name.removesuffix(".json")


def lower_keys(params: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in params.items()}


# -- event.* ---------------------------------------------------------------------------------


def _event_name(p: dict[str, Any]) -> str:
    name = text(p.get("event")).upper()
    if not name:
        raise ApiError("ERROR_ARGUMENT", "Argument 'EVENT' is null or empty")
    return name


def _event_type(p: dict[str, Any]) -> str:
    kind = text(p.get("event_type")).strip().lower()
    if kind == "":
        return "online"
    if kind not in ("online", "offline"):
        raise ApiError("ERROR_ARGUMENT", "Value must be one of {online|offline}")
    return kind


def _check_connector(caller: Caller, connector: str) -> None:
    if connector and not caller.portal.license_auth_connector:
        raise ApiError("WRONG_LICENSE", None, 403)


def _check_handler_url(url: str) -> None:
    """[src] HandlerHelper::checkCallback: a host with a dot (not first), then scheme http/https.

    The scheme is compared case-sensitively, as PHP's `parse_url` keeps its case.
    """
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        host = ""
    if host.find(".") <= 0:
        raise ApiError("ERROR_WRONG_HANDLER_URL", "Wrong handler URL")
    raw_scheme = url.split(":", 1)[0]
    if raw_scheme not in ("http", "https"):
        raise ApiError("ERROR_UNSUPPORTED_PROTOCOL", "Unsupported handler protocol")


def event_bind(caller: Caller, params: dict[str, Any]) -> bool:
    """design §10.2, in the order of [src] `Event::eventBind`.

    Without `auth_type` an admin's row is stored with user 0 ("the user who caused the event")
    and a non-admin's with his own id, as the source does.
    """
    p = lower_keys(params)
    user = php_intval(p.get("auth_type"))
    if user > 0:
        if not caller.is_admin and user != caller.user_id:
            raise ApiError("ACCESS_DENIED", "Event binding with AUTH_TYPE requires administrator access rights", 403)
    elif not caller.is_admin:
        user = caller.user_id
    else:
        user = 0
    connector = text(p.get("auth_connector"))
    event = _event_name(p)
    kind = _event_type(p)
    handler = text(p.get("handler"))
    if kind == "offline":
        if not caller.is_admin:
            raise ApiError("ACCESS_DENIED", "Offline events binding requires administrator access rights", 403)
        handler, user = "", 0
    elif not handler:
        raise ApiError("ERROR_ARGUMENT", "Argument 'HANDLER' is null or empty")
    _check_connector(caller, connector)
    if handler:
        _check_handler_url(handler)
    if not _EVENT_NAME_RE.match(event) or not _in_scope(caller, event):
        raise ApiError("ERROR_EVENT_NOT_FOUND", "Event not found")
    if kind == "offline" and event in _NO_OFFLINE_EVENTS:
        raise ApiError("ERROR_ARGUMENT", "Offline event cannot be registered for this event.")
    raw_options = p.get("options")
    options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
    caller.portal._add_row(caller.client_id, event, handler, user, connector, options)
    return True


def event_scope(event: str) -> str:
    """The scope an event needs (`basic` for app events and unlisted prefixes)."""
    for prefix, needed in _EVENT_SCOPES:
        if event.startswith(prefix):
            return needed
    return "basic"


def _in_scope(caller: Caller, event: str) -> bool:
    """[docs] event.bind: the event must be in the app's scopes or in `basic`."""
    needed = event_scope(event)
    return needed == "basic" or needed in scope(caller, {})


def event_unbind(caller: Caller, params: dict[str, Any]) -> dict[str, int]:
    """design §10.4, in the order of [src] `Event::eventUnbind`.

    A non-admin's `auth_type` must be his own id *as an integer* (the source compares with
    `!==`), so the string that arrives through a form body or `batch` is refused.
    """
    p = lower_keys(params)
    event = _event_name(p)
    kind = _event_type(p)
    handler = text(p.get("handler"))
    connector = text(p.get("auth_connector"))
    if kind == "offline":
        if not caller.is_admin:
            raise ApiError("ACCESS_DENIED", "Offline events unbinding requires administrator access rights", 403)
        handler = ""
    elif handler == "":
        raise ApiError("ERROR_ARGUMENT", "Argument 'HANDLER' is null or empty")
    _check_connector(caller, connector)

    user_filter: int | None = None
    if kind == "offline":
        match: Callable[[Any], bool] = lambda row: row.connector_id == connector  # noqa: E731
    else:
        auth_type = p.get("auth_type")
        if auth_type is not None:  # PHP isset()
            own = type(auth_type) is int and auth_type == caller.user_id
            if not caller.is_admin and not own:
                raise ApiError(
                    "ACCESS_DENIED", "Event unbinding with AUTH_TYPE requires administrator access rights", 403
                )
            user_filter = php_intval(auth_type)
        elif not caller.is_admin:
            user_filter = caller.user_id
        match = lambda row: user_filter is None or row.user_id == user_filter  # noqa: E731
    count = caller.portal._delete_rows(
        caller.client_id, lambda row: row.event == event and row.handler == handler and match(row)
    )
    return {"count": count}


def event_get(caller: Caller, params: dict[str, Any]) -> list[dict[str, Any]]:
    """design §10.3: the calling app's rows, all users' for an admin, own rows otherwise."""
    rows = caller.portal._rows_of(caller.client_id)
    if not caller.is_admin:
        rows = [r for r in rows if r.user_id == caller.user_id]
    return [r.as_item() for r in rows]


# -- small read methods (so that a client's accidental extra calls are visible, not 404) -------


def app_info(caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "ID": zlib.crc32(caller.client_id.encode()) % 10000,
        "CODE": caller.client_id,
        "VERSION": caller.app.version,
        "STATUS": caller.app.status,
        "INSTALLED": True,
        "PAYMENT_EXPIRED": "N",
        "DAYS": None,
        "LANGUAGE_ID": "en",
        "LICENSE": "en_project",
    }


def profile(caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
    return {"ID": str(caller.user_id), "ADMIN": caller.is_admin, "NAME": f"User {caller.user_id}", "LAST_NAME": ""}


def user_admin(caller: Caller, params: dict[str, Any]) -> bool:
    return caller.is_admin


def server_time(caller: Caller, params: dict[str, Any]) -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def scope(caller: Caller, params: dict[str, Any]) -> list[str]:
    return [s for s in re.split(r"[,\s]+", caller.app.scope) if s]


# -- batch -----------------------------------------------------------------------------------


def split_command(command: Any) -> tuple[str, dict[str, Any]]:
    """`"event.unbind?event=X&handler=..."` → (`event.unbind`, params of strings)."""
    raw = text(command)
    method, _, query = raw.partition("?")
    return normalize_method(method), phpform.parse_query(query)


def _commands(params: dict[str, Any]) -> list[tuple[str, Any]]:
    cmd = lower_keys(params).get("cmd")
    if isinstance(cmd, dict):
        return [(str(k), v) for k, v in cmd.items()]
    if isinstance(cmd, list):
        return [(str(i), v) for i, v in enumerate(cmd)]
    return []


def batch_command_names(params: dict[str, Any]) -> list[str]:
    """The sub-call methods of a batch request, for the request log."""
    return [split_command(call)[0] for _, call in _commands(params)]


def _section(values: dict[str, Any]) -> dict[str, Any] | list[Any]:
    """A batch section as PHP's `json_encode` writes an array: empty → `[]` (design §10.9), keys
    `0`…`n-1` in order → a JSON list ([fb24] #44: numeric command keys), else an object."""
    if not values:
        return []
    keys = list(values)
    if all(_CANONICAL_INT_RE.match(k) for k in keys) and [int(k) for k in keys] == list(range(len(keys))):
        return list(values.values())
    return values


def batch(caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
    """design §10.9 / [src] `CRestProvider::methodsBatch`: ≤ 50 sub-calls with inherited auth.

    Extra commands each fail with ERROR_BATCH_LENGTH_EXCEEDED; `halt` stops after the first error
    (that one included). `$result[...]` chaining is not emulated.
    """
    halt = php_bool(lower_keys(params).get("halt"))
    # The sub-calls inherit the batch's auth data, `auth_connector` included; one given inside a
    # command is not read ([src] CRestServerBatchItem, design §10.15).
    connector = lower_keys(params).get("auth_connector")
    results: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    times: dict[str, Any] = {}
    for index, (key, command) in enumerate(_commands(params)):
        if index < BATCH_MAX_LENGTH:
            method, sub_params = split_command(command)
            sub_params.pop("auth", None)  # the batch's own auth is inherited, not overridden
            for name in [k for k in sub_params if str(k).lower() == "auth_connector"]:
                del sub_params[name]
            if connector is not None:
                sub_params["auth_connector"] = connector
            started = time.time()
            try:
                results[key] = call(caller, method, sub_params, in_batch=True)
                times[key] = time_block(started, time.time())
                continue
            except ApiError as err:
                errors[key] = err.body()
        else:
            errors[key] = ApiError("ERROR_BATCH_LENGTH_EXCEEDED").body()
        if halt:
            break
    return {
        "result": _section(results),
        "result_error": _section(errors),
        "result_total": _section({}),
        "result_next": _section({}),
        "result_time": _section(times),
    }


METHODS: dict[str, Callable[[Caller, dict[str, Any]], Any]] = {
    "event.get": event_get,
    "event.bind": event_bind,
    "event.unbind": event_unbind,
    "batch": batch,
    "app.info": app_info,
    "profile": profile,
    "user.admin": user_admin,
    "server.time": server_time,
    "scope": scope,
}


def call(caller: Caller, method: str, params: dict[str, Any], *, in_batch: bool = False) -> Any:
    """Run one method call (top-level or inside a batch); raise ApiError for an error answer."""
    if in_batch and method == "batch":
        raise ApiError("ERROR_BATCH_METHOD_NOT_ALLOWED", None, 405)
    injected = caller.portal._command_fault(method, params)
    if injected is not None:
        raise injected
    handler = METHODS.get(method)
    if handler is None or (method == "batch" and caller.portal.refuse_batch):
        raise ApiError("ERROR_METHOD_NOT_FOUND", None, 404)
    result = handler(caller, params)
    patch = caller.portal.result_patch.get(method)
    return {**result, **patch} if patch and isinstance(result, dict) else result
