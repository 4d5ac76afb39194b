"""One portal's stored record (design §3): a JSON object whose unknown keys survive every write."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

# Real member ids are 32 hex digits. design §5: 1-64 ASCII letters, digits, `_` or `-`, wholly: anything
# else (a path, a dot, a trailing newline, which `$` would let through) is refused before any AWS call.
MEMBER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Refresh when the access token expires within this many seconds (design §5 step 3).
REFRESH_MARGIN_SECONDS = 300


def valid_member_id(member_id: object) -> bool:
    """True when `member_id` can name a parameter under `{prefix}/portals/`."""
    return isinstance(member_id, str) and MEMBER_ID_RE.fullmatch(member_id) is not None


class PortalRecord:
    """A portal record. `data` is the whole stored object; properties read the fixed keys.

    `repr` names the portal only: a record must be safe to log by accident.
    """

    __slots__ = ("data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data: dict[str, Any] = dict(data)

    @classmethod
    def from_json(cls, text: str) -> PortalRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("portal record is not a JSON object")
        return cls(data)

    def to_json(self) -> str:
        return json.dumps(self.data, separators=(",", ":"), sort_keys=True)

    def copy(self) -> PortalRecord:
        return PortalRecord(self.data)

    def __repr__(self) -> str:
        return f"PortalRecord(member_id={self.member_id!r}, domain={self.domain!r})"

    def _str(self, key: str) -> str:
        value = self.data.get(key)
        return value if isinstance(value, str) else ""

    @property
    def member_id(self) -> str:
        return self._str("member_id")

    @property
    def domain(self) -> str:
        return self._str("domain")

    @property
    def client_endpoint(self) -> str:
        return self._str("client_endpoint")

    @property
    def server_endpoint(self) -> str:
        return self._str("server_endpoint")

    @property
    def access_token(self) -> str:
        return self._str("access_token")

    @property
    def refresh_token(self) -> str:
        return self._str("refresh_token")

    @property
    def application_token(self) -> str:
        return self._str("application_token")

    @property
    def expires(self) -> int:
        value = self.data.get("expires")
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            return 0  # unknown expiry (also `Infinity`): treat as due, the refresh fixes it

    @property
    def revoked_at(self) -> int | None:
        value = self.data.get("revoked_at")
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return None
        return int(value)

    def refresh_due(self, now: float | None = None) -> bool:
        """True when the access token expires within five minutes (or has no usable expiry)."""
        now = time.time() if now is None else now
        return not self.access_token or self.expires - now <= REFRESH_MARGIN_SECONDS

    def set_client_endpoint(self, endpoint: str) -> None:
        """Follow a renamed portal: the endpoint and the domain move together (design §10.8)."""
        self.data["client_endpoint"] = endpoint
        domain = domain_of(endpoint)
        if domain:
            self.data["domain"] = domain


def domain_of(client_endpoint: str) -> str:
    """The portal's domain for a `client_endpoint`: its host (design §3, §9), e.g.
    `https://example.bitrix24.com/rest/` → `example.bitrix24.com` ("" when it names none)."""
    try:
        return urlsplit(client_endpoint).hostname or ""
    except (ValueError, TypeError, AttributeError):
        return ""


def valid_endpoint(url: object) -> bool:
    """True for a plain http(s) URL with a host, a valid port, no user info and no white space.

    What a remote answer (the OAuth server's `client_endpoint`) must be before it is stored as an
    address that tokens will be sent to.
    """
    if not isinstance(url, str) or not url or any(ord(c) <= 0x20 or 0x7F <= ord(c) <= 0x9F for c in url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return False
    return parts.scheme.lower() in _DEFAULT_PORTS and bool(parts.hostname) and "@" not in parts.netloc
