"""Value types of the emulator: apps, token pairs, installations, log entries, replies.

Every type that holds a secret masks it in `repr`: tests print these objects when they fail,
and design §7 forbids a token in any output, fake or not (the habit is what matters).
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .state import Portal

# What portals answer for these codes (design §10.11 and the docs' system-error table).
DESCRIPTIONS: dict[str, str] = {
    "INTERNAL_SERVER_ERROR": "Internal server error",
    "ERROR_UNEXPECTED_ANSWER": "Server returned an unexpected response",
    "QUERY_LIMIT_EXCEEDED": "Too many requests",
    "OPERATION_TIME_LIMIT": "Method is blocked due to operation time limit",
    "OVERLOAD_LIMIT": "REST API is blocked due to overload",
    "NO_AUTH_FOUND": "Wrong authorization data",
    "invalid_token": "Unable to get application by token",
    "ERROR_EVENT_NOT_FOUND": "Event not found",
    "APPLICATION_NOT_FOUND": "Application not found",
    "expired_token": "The access token provided has expired.",
    "authorization_error": "Unable to authorize user",
    "ERROR_METHOD_NOT_FOUND": "Method not found",
    "ERROR_BATCH_METHOD_NOT_ALLOWED": "Method is not allowed for batch usage",
    "ERROR_BATCH_LENGTH_EXCEEDED": "Max batch length exceeded",
    "PORTAL_DELETED": "Portal was deleted",
    "ACCESS_DENIED": "Access denied",
    "WRONG_LICENSE": "Feature is not available on the current plan: auth_connector",
    "invalid_grant": "Invalid grant",
    "invalid_client": "Invalid client credentials",
    "invalid_request": "Invalid request",
    "wrong_client": "Wrong client",
    "NOT_INSTALLED": "Application not installed",
    "PAYMENT_REQUIRED": "Payment required",
}

# Default HTTP status of an injected code (design §10.10, §11; the SDK's grouping where the docs
# give none), so that `fail_next(1, "QUERY_LIMIT_EXCEEDED")` answers 503 as the real thing does.
STATUSES: dict[str, int] = {
    "INTERNAL_SERVER_ERROR": 500,
    "ERROR_UNEXPECTED_ANSWER": 500,
    "QUERY_LIMIT_EXCEEDED": 503,
    "OPERATION_TIME_LIMIT": 429,
    "OVERLOAD_LIMIT": 503,
    "PORTAL_DELETED": 403,
    "NO_AUTH_FOUND": 401,
    "expired_token": 401,
    "APPLICATION_NOT_FOUND": 401,
    "authorization_error": 401,
    "invalid_token": 401,
    "ERROR_OAUTH": 401,
    "PAYMENT_REQUIRED": 401,
    "ACCESS_DENIED": 403,
    "INVALID_CREDENTIALS": 403,
    "WRONG_AUTH_TYPE": 403,
    "WRONG_LICENSE": 403,
    "insufficient_scope": 403,
    "user_access_error": 403,
    "ERROR_METHOD_NOT_FOUND": 404,
    "ERROR_BATCH_METHOD_NOT_ALLOWED": 405,
}


class ApiError(Exception):
    """A Bitrix24 error answer: `{"error": code, "error_description": description}` + HTTP status.

    Descriptions are fixed texts chosen by the emulator, never echoing a request value.
    """

    def __init__(self, code: str, description: str | None = None, status: int = 400) -> None:
        self.code = code
        self.description = description if description is not None else DESCRIPTIONS.get(code, code)
        self.status = status
        super().__init__(f"{code} (HTTP {status}): {self.description}")

    def body(self) -> dict[str, str]:
        return {"error": self.code, "error_description": self.description}


def new_token(nbytes: int = 32) -> str:
    return secrets.token_hex(nbytes)


def new_member_id() -> str:
    return secrets.token_hex(16)


def new_client_id() -> str:
    """Shaped like a local app's id: `local.<14 hex>.<8 digits>`."""
    return f"local.{secrets.token_hex(7)}.{secrets.randbelow(10**8):08d}"


def new_client_secret() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(50))


@dataclass
class App:
    """A Bitrix24 application as the OAuth server knows it."""

    client_id: str
    client_secret: str
    scope: str = "crm,user"
    status: str = "L"  # design §10.5: L local, F free, P paid, ...
    version: int = 1

    def __repr__(self) -> str:
        return f"App(client_id={self.client_id!r}, scope={self.scope!r})"


@dataclass(frozen=True)
class TokenPair:
    """An access/refresh token pair issued to one user of one portal for one app."""

    access_token: str
    refresh_token: str
    expires: int  # unix seconds
    expires_in: int
    user_id: int
    member_id: str
    client_id: str

    def __repr__(self) -> str:
        return f"TokenPair(member_id={self.member_id!r}, user_id={self.user_id}, expires={self.expires})"


@dataclass
class Installation:
    """The result of `Emulator.install` / `update`: the start of one token chain.

    `status` is the HTTP status the app's install/update URL answered (None when nothing was
    posted, 0 when the POST could not be delivered).
    """

    portal: Portal
    app: App
    user_id: int
    application_token: str
    tokens: TokenPair
    event: str  # ONAPPINSTALL | ONAPPUPDATE
    chain: int
    status: int | None = None

    @property
    def member_id(self) -> str:
        return self.portal.member_id

    # Shortcuts to the pair this installation issued (the start of its chain).
    @property
    def access_token(self) -> str:
        return self.tokens.access_token

    @property
    def refresh_token(self) -> str:
        return self.tokens.refresh_token

    @property
    def expires(self) -> int:
        return self.tokens.expires

    def __repr__(self) -> str:
        return (
            f"Installation(event={self.event!r}, member_id={self.portal.member_id!r}, "
            f"client_id={self.app.client_id!r}, user_id={self.user_id}, status={self.status})"
        )


@dataclass(frozen=True)
class LogEntry:
    """One HTTP request the emulator received. Holds names, never token values."""

    ts: float
    kind: str  # "rest" | "oauth" | "control" | "foreign" | "other"
    member_id: str | None
    domain: str | None
    method: str | None
    status: int  # 0: the connection was dropped (injected timeout)
    error: str | None
    commands: list[str] = field(default_factory=list)  # batch: sub-call methods, in order
    params_keys: list[str] = field(default_factory=list)  # top-level parameter names, no `auth`
    client_id: str | None = None
    user_id: int | None = None
    duration: float = 0.0
    host: str | None = None  # the loopback address the request arrived on
    scheme: str = "http"  # how it arrived: "https" only over TLS
    hostile: str | None = None  # the hostile mode that shaped the answer (see .hostile)
    auth_seen: bool = False  # a token (or, at a foreign host, a secret) came with the request


@dataclass
class Reply:
    """What the HTTP layer should answer; produced by the HTTP-free state."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    text: str | None = None  # non-JSON body (the 302 page)
    drop_after: float | None = None  # injected timeout: sleep, then close without answering
    log: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def error(cls, err: ApiError, **log: Any) -> Reply:
        return cls(err.status, err.body(), log={"error": err.code, **log})


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def time_block(
    start: float, finish: float, *, operating: float = 0.0, operating_reset_at: int | None = None
) -> dict[str, Any]:
    """The `time` object of every success answer (design §10.8, §10); `operating` is what the
    called method has accumulated in the current ten-minute window."""
    duration = max(finish - start, 0.0)
    return {
        "start": start,
        "finish": finish,
        "duration": duration,
        "processing": duration,
        "date_start": _iso(start),
        "date_finish": _iso(finish),
        "operating": round(operating, 6),
        "operating_reset_at": operating_reset_at if operating_reset_at is not None else int(start) + 600,
    }
