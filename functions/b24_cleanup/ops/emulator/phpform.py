"""PHP-style bracket keys (`auth[domain]=...`), both ways.

Bitrix24 posts its events as `application/x-www-form-urlencoded` with nested data flattened into
bracket keys, and parses `batch` sub-call query strings with PHP's `parse_str` (design §10.5,
§9). The emulator must speak that dialect exactly, so that the service's parser is tested against
what a real portal produces, and so that parameters inside `batch` arrive as strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

_SUBKEY_RE = re.compile(r"\[([^\]]*)\]")


def _split_key(key: str) -> list[str]:
    """`a[b][]` → `["a", "b", ""]`; a key without a well-formed bracket part stays whole."""
    first = key.find("[")
    if first <= 0 or not key.endswith("]"):
        return [key]
    head, rest = key[:first], key[first:]
    parts = _SUBKEY_RE.findall(rest)
    if "".join(f"[{p}]" for p in parts) != rest:
        return [key]  # PHP keeps unbalanced brackets literally; so do we
    return [head, *parts]


def parse_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Un-flatten `(key, value)` pairs into nested dicts, as PHP's `parse_str` does.

    Every leaf stays a string. `key[]` appends with the next integer index (as a string key),
    and a later scalar for the same key replaces an earlier one (PHP semantics).
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        path = _split_key(key)
        node = result
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if part == "" and i > 0:
                part = str(sum(1 for k in node if k.isdigit()))
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
    return result


def parse_query(query: str) -> dict[str, Any]:
    """Parse a URL-encoded query string or form body into nested dicts of strings."""
    return parse_pairs(parse_qsl(query, keep_blank_values=True))


def _scalar(value: Any) -> str:
    if value is True:
        return "1"
    if value is False or value is None:
        return ""
    return str(value)


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Flatten nested mappings/lists into bracket-keyed pairs, in insertion order.

    `{"auth": {"domain": "x"}}` → `[("auth[domain]", "x")]`; booleans become "1"/"" like PHP.
    """
    pairs: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, Mapping):
            pairs.extend(flatten(value, name))
        elif isinstance(value, list | tuple):
            pairs.extend(flatten({str(i): v for i, v in enumerate(value)}, name))
        else:
            pairs.append((name, _scalar(value)))
    return pairs
