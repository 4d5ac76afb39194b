"""The body of a Bitrix24 event POST, as a nested dict (design §10.5, §5.4).

Bitrix24 posts `application/x-www-form-urlencoded` bodies built by PHP's `http_build_query`, so
nesting is spelled with bracket keys (`auth[member_id]`, `data[FIELDS][ID]`, `a[]`). This module
turns such a body (or the same structure sent as JSON) into a nested dict, with hard limits,
because the endpoint is a public URL and everything here is attacker-controlled until the
`application_token` has been compared.

No Lambda knowledge here: the endpoint hands in the body and a content type and gets one typed
post back (:func:`parse_post`): an :class:`UninstallPost`, or an :class:`InstallPost` that
registration (`ONAPPINSTALL` / `ONAPPUPDATE`) takes as it is.

Error messages name the rule that failed, never a value: a body may carry tokens, and every
:class:`PayloadError` may end up in a log line or a 400 answer (design §7).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from .errors import PayloadError, PayloadTooLargeError, RegistrationInvalidError

# The events this package reads (design §10.5): their one home.
ONAPPUNINSTALL = "ONAPPUNINSTALL"
ONAPPINSTALL = "ONAPPINSTALL"
ONAPPUPDATE = "ONAPPUPDATE"
INSTALL_EVENTS = frozenset({ONAPPINSTALL, ONAPPUPDATE})

MAX_BODY_BYTES = 64 * 1024  # design §5: a body over 64 KiB is answered 413
MAX_DEPTH = 16  # nesting levels below the top-level object (PHP's own default allows 64)
MAX_FIELDS = 1000  # form fields, or JSON keys and list items in total (PHP: max_input_vars=1000)

FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"

# `name[seg][seg]...`: a non-empty base without brackets, then zero or more bracket groups whose
# content holds no bracket. Anything else (`a[b`, `a]`, `a[b]c`, `[a]`) is kept as one flat key:
# it cannot collide with a well-formed path, and it never names `auth[...]`.
_KEY_RE = re.compile(r"^(?P<base>[^\[\]]+)(?P<segs>(?:\[[^\[\]]*\])*)$")
_SEG_RE = re.compile(r"\[([^\[\]]*)\]")

_TRUE = frozenset({"1", "y", "yes", "true", "on"})
_FALSE = frozenset({"0", "n", "no", "false", "off", ""})


# The longest base64 text that can decode to MAX_BODY_BYTES; anything longer is over the limit
# whatever it holds, so it is refused without being decoded.
MAX_ENCODED_CHARS = 4 * -(-MAX_BODY_BYTES // 3)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def decode_body(body: object, base64_encoded: bool) -> bytes:
    """The raw request body as an HTTP front end hands it over (text, possibly base64).

    Size-checked before anything is decoded or parsed (:class:`PayloadTooLargeError`), base64 decoded
    strictly (:class:`PayloadError`); an absurdly long encoded body is refused without decoding it.
    """
    if body is None:
        return b""
    if not isinstance(body, str):
        raise PayloadError("body is not text")
    if base64_encoded:
        if len(body) > MAX_ENCODED_CHARS:
            raise PayloadTooLargeError("encoded body is over the size limit")
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise PayloadError("body is not valid base64") from None
    else:
        if len(body) > MAX_BODY_BYTES:  # every character is at least one byte
            raise PayloadTooLargeError("body is over the size limit")
        try:
            raw = body.encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError("body is not valid UTF-8") from None
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLargeError("body is over the size limit")
    return raw


def media_type(content_type: str | None) -> str:
    """`"Application/X-WWW-Form-UrlEncoded; charset=UTF-8"` → `"application/x-www-form-urlencoded"`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_event_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """Parse an event POST body into a nested dict, or raise :class:`PayloadError`.

    The content type decides the format (`application/x-www-form-urlencoded`, or `application/json`
    and `+json` types). Without a content type we look at the body: a `{` means JSON, anything
    else must be a strict form body. Any other declared type is refused rather than guessed at.
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        raise PayloadError("body must be bytes")
    body = bytes(body)
    if len(body) > MAX_BODY_BYTES:  # the caller checks first; this keeps the core safe on its own
        raise PayloadTooLargeError(f"body is over {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("body is not valid UTF-8") from None
    if not text.strip():
        raise PayloadError("body is empty")

    kind = media_type(content_type)
    if kind == FORM_TYPE:
        return _parse_form(text)
    if kind == JSON_TYPE or (kind.startswith("application/") and kind.endswith("+json")):
        return _parse_json(text)
    if not kind:
        return _parse_json(text) if text.lstrip().startswith("{") else _parse_form(text)
    raise PayloadError("content type is neither form-urlencoded nor JSON")


def _parse_form(text: str) -> dict[str, Any]:
    try:
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError:
        raise PayloadError("form body holds percent-encoded bytes that are not UTF-8") from None
    except ValueError as exc:
        # parse_qsl's own messages quote the offending field: never pass them on.
        if "max number of fields" in str(exc).lower():
            raise PayloadError(f"form body has more than {MAX_FIELDS} fields") from None
        raise PayloadError("form body is not a list of name=value fields") from None
    if not pairs:
        raise PayloadError("form body has no fields")
    return unflatten(pairs)


def unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Turn PHP-style bracket keys into nested dicts and lists.

    `a[b][c]=1` → `{"a": {"b": {"c": "1"}}}`; every `[]` appends a new element to a list
    (`a[]=1&a[]=2` → `{"a": ["1", "2"]}`); numeric segments stay string keys of a dict, as PHP's
    ordered maps would print them. Where PHP would silently let a later field win — the same name
    twice, a name that is both a value and a container (`auth=x&auth[a]=y`), `[]` mixed with named
    keys — we refuse the body: ambiguity in an authenticated request is not worth resolving.
    """
    root: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY_RE.match(key)
        path = [key] if match is None else [match["base"], *_SEG_RE.findall(match["segs"])]
        if len(path) - 1 > MAX_DEPTH:
            raise PayloadError(f"form key is nested deeper than {MAX_DEPTH} levels")
        _insert(root, path, value)
    return root


def _insert(root: dict[str, Any], path: list[str], value: str) -> None:
    node: dict[str, Any] | list[Any] = root
    # The first element is the base name: never an append, even if it is literally "".
    for index, segment in enumerate(path):
        last = index == len(path) - 1
        append = index > 0 and segment == ""
        if append:
            if not isinstance(node, list):
                raise PayloadError("form keys mix [] with named keys")
            if last:
                node.append(value)
                return
            child: dict[str, Any] | list[Any] = [] if path[index + 1] == "" else {}
            node.append(child)
            node = child
            continue
        if not isinstance(node, dict):
            raise PayloadError("form keys mix [] with named keys")
        existing = node.get(segment)
        if last:
            if segment in node:
                kind = "twice" if isinstance(existing, str) else "both as a value and as a container"
                raise PayloadError(f"a form key appears {kind}")
            node[segment] = value
            return
        want_list = path[index + 1] == ""
        if existing is None and segment not in node:
            existing = [] if want_list else {}
            node[segment] = existing
        elif isinstance(existing, str):
            raise PayloadError("a form key appears both as a value and as a container")
        elif isinstance(existing, list) != want_list:
            raise PayloadError("form keys mix [] with named keys")
        assert isinstance(existing, dict | list)
        node = existing


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` refusing a key given twice (parsers disagree on which one wins)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise PayloadError("a JSON object has the same key twice")
        result[key] = value
    return result


def _parse_json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text, object_pairs_hook=_unique_object)
    except PayloadError:
        raise
    except RecursionError:
        raise PayloadError(f"JSON body is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        # json's messages quote positions, not values, but a generic one is all a client needs.
        raise PayloadError("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise PayloadError("JSON body is not an object")
    _check_shape(data)
    return data


def _check_shape(data: dict[str, Any]) -> None:
    """Enforce the depth and size limits on a decoded JSON value, without recursion."""
    count = 0
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise PayloadError(f"JSON body is nested deeper than {MAX_DEPTH} levels")
        count += len(node)
        if count > MAX_FIELDS:
            raise PayloadError(f"JSON body has more than {MAX_FIELDS} keys and items")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


# --------------------------------------------------------------------------------------------
# The typed posts: an uninstall (the endpoint) or an install/update (registration)
# --------------------------------------------------------------------------------------------


def _text(value: object) -> str | None:
    """A scalar field as text: form values are strings already, JSON may send numbers."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _required(auth: dict[str, Any], key: str) -> str:
    value = auth.get(key)
    if not isinstance(value, str) or not value.strip():
        raise PayloadError(f"auth[{key}] is missing or not a non-empty string")
    # Not stripped: the token is compared byte for byte, and a padded member_id is malformed.
    return value


def event_name(payload: dict[str, Any]) -> str:
    """The posted `event`, stripped and upper-cased (Bitrix24 sends event codes upper-case)."""
    event = payload.get("event") if isinstance(payload, dict) else None
    if not isinstance(event, str) or not event.strip():
        raise PayloadError("event is missing or not a non-empty string")
    return event.strip().upper()


def _flag(value: object) -> bool | None:
    """`data[CLEAN]`: Bitrix24 sends "1"/"0"; anything unrecognised is "not said" (None)."""
    if isinstance(value, bool):
        return value
    text = _text(value)
    if text is None:
        return None
    text = text.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


@dataclass(frozen=True, repr=False)
class UninstallPost:
    """What an `ONAPPUNINSTALL` POST says, validated for the uninstall path.

    `auth` and `data` are the generic nested dicts. `repr` names the event and the portal only:
    `auth` holds tokens.
    """

    event: str
    member_id: str
    application_token: str
    ts: str | None
    clean: bool | None
    auth: dict[str, Any]
    data: dict[str, Any]

    def __repr__(self) -> str:
        return (
            f"UninstallPost(event={self.event!r}, member_id={self.member_id!r}, ts={self.ts!r}, clean={self.clean!r})"
        )

    __str__ = __repr__

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> UninstallPost:
        """Validate a parsed body; raise :class:`PayloadError` naming the missing or bad field.

        `member_id` is only required to be present here; whether it can name a stored portal is
        the endpoint's check (a malformed one is answered like an unknown one: 401).
        """
        event = event_name(payload)
        auth = payload.get("auth")
        if not isinstance(auth, dict):
            raise PayloadError("auth[member_id] is missing or not a non-empty string")
        member_id = _required(auth, "member_id")
        application_token = _required(auth, "application_token")
        data = payload.get("data", {})
        if not isinstance(data, dict):
            raise PayloadError("data is not an object")
        ts_value = payload.get("ts")
        ts = _text(ts_value)
        if ts_value is not None and ts is None:
            raise PayloadError("ts is not a string or an integer")
        ts = ts.strip() if ts is not None else None
        return cls(
            event=event,
            member_id=member_id,
            application_token=application_token,
            ts=ts or None,
            clean=_flag(data.get("CLEAN")),
            auth=auth,
            data=data,
        )


def _stripped(mapping: dict[str, Any], key: str) -> str:
    value = mapping.get(key)
    return value.strip() if isinstance(value, str) else ""


@dataclass(frozen=True, repr=False)
class InstallPost:
    """What an `ONAPPINSTALL` / `ONAPPUPDATE` POST says (design §9): nothing of it is trusted until the
    OAuth server vouches for `refresh_token`. `repr` names the event and the portal only."""

    event: str
    member_id: str
    application_token: str
    refresh_token: str
    server_endpoint: str
    scope: str
    auth: dict[str, Any]

    def __repr__(self) -> str:
        return f"InstallPost(event={self.event!r}, member_id={self.member_id!r})"

    __str__ = __repr__

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> InstallPost:
        """Validate a parsed body; raise :class:`RegistrationInvalidError` when it is no registration."""
        event = _stripped(dict(payload), "event").upper()
        if event not in INSTALL_EVENTS:
            raise RegistrationInvalidError("event is not ONAPPINSTALL or ONAPPUPDATE")
        auth = payload.get("auth")
        if not isinstance(auth, Mapping):
            raise RegistrationInvalidError("the body has no auth fields")
        auth = dict(auth)
        for key in ("refresh_token", "application_token", "member_id"):
            if not _stripped(auth, key):
                raise RegistrationInvalidError(f"auth[{key}] is missing")
        return cls(
            event=event,
            # Not stripped: a padded member_id (a trailing newline) is malformed, as at the uninstall path.
            member_id=auth["member_id"] if isinstance(auth.get("member_id"), str) else "",
            application_token=_stripped(auth, "application_token"),
            refresh_token=_stripped(auth, "refresh_token"),
            server_endpoint=_stripped(auth, "server_endpoint"),
            scope=_stripped(auth, "scope"),
            auth=auth,
        )


def parse_post(payload: dict[str, Any]) -> UninstallPost | InstallPost:
    """The typed post of a parsed body, by its event; PayloadError (RegistrationInvalidError for an
    install or update body) when it is neither a usable uninstall nor a registration."""
    name = event_name(payload)
    if name in INSTALL_EVENTS:
        return InstallPost.from_payload(payload)
    if name != ONAPPUNINSTALL:
        raise PayloadError("event is not ONAPPUNINSTALL")
    return UninstallPost.from_payload(payload)
