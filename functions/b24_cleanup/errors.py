"""Exception types, one per meaning, and the classification of Bitrix24 error codes.

Messages carry the method, the error code and the portal's own description, never a token:
every exception here may end up in a log line (SPEC §7).
"""

from __future__ import annotations

# Reference §11 and SPEC §5 step 7. Codes are compared case-insensitively (Bitrix24 mixes
# `expired_token` with `QUERY_LIMIT_EXCEEDED`), so every set holds upper-cased codes.
EXPIRED_CODES = frozenset({"EXPIRED_TOKEN", "NO_AUTH_FOUND"})
REVOKED_CODES = frozenset(
    {"APPLICATION_NOT_FOUND", "INVALID_TOKEN", "ERROR_OAUTH", "PAYMENT_REQUIRED", "PORTAL_DELETED"}
)
# What the OAuth server answers for a refresh token that no longer works (reference §7).
OAUTH_GONE_CODES = frozenset({"INVALID_GRANT", "NOT_INSTALLED", "INVALID_CLIENT", "PAYMENT_REQUIRED", "WRONG_CLIENT"})
TRANSIENT_CODES = frozenset(
    {
        "INTERNAL_SERVER_ERROR",
        "ERROR_UNEXPECTED_ANSWER",
        "QUERY_LIMIT_EXCEEDED",
        "OPERATION_TIME_LIMIT",
        "OVERLOAD_LIMIT",
        "CONNECTION_ERROR",
    }
)
RATE_LIMIT_CODE = "QUERY_LIMIT_EXCEEDED"
# A command that a batch answer lists neither in `result` nor in `result_error` (SPEC §5 step 5).
MISSING_FROM_BATCH = "MISSING_FROM_BATCH"


class B24Error(Exception):
    """Base of every error this package raises about a portal or the OAuth server."""

    def __init__(self, code: str, description: str = "", *, status: int | None = None, method: str = "") -> None:
        self.code = code
        self.description = description
        self.status = status
        self.method = method
        self.operating_reset_at: float | None = None  # OPERATION_TIME_LIMIT: when the method unblocks
        where = f"{method}: " if method else ""
        http = f" (HTTP {status})" if status else ""
        super().__init__(f"{where}{code}{http}{': ' + description if description else ''}")


class ExpiredTokenError(B24Error):
    """The access token was refused as expired: refresh once and retry (SPEC §5 step 3)."""


class RevokedError(B24Error):
    """The app is gone from the portal: its tokens no longer work (SPEC §5 step 7)."""


class TransientError(B24Error):
    """Worth retrying later: 5xx, timeouts, rate and time limits, SSM throttling."""


class RateLimitedError(TransientError):
    """HTTP 503 QUERY_LIMIT_EXCEEDED: the portal's leaky bucket is full."""


class PermanentError(B24Error):
    """A client error that a retry cannot mend (bad argument, access denied, licence)."""


class InvalidGrantError(B24Error):
    """The OAuth server refused the refresh token: the caller re-reads the record once."""


class ConfigError(Exception):
    """The service's own configuration is missing or broken (credentials, prefix, declared set)."""


class InvalidDeclaredSet(ConfigError):
    """The declared handler set is invalid (SPEC §3): a sweep must unbind nothing."""


def classify(code: str, status: int | None = None) -> type[B24Error]:
    """Map a portal's error code (and HTTP status) to the exception type that says what to do."""
    upper = (code or "").upper()
    if upper == RATE_LIMIT_CODE:
        return RateLimitedError
    if upper in EXPIRED_CODES:
        return ExpiredTokenError
    if upper in REVOKED_CODES:
        return RevokedError
    if upper in TRANSIENT_CODES or upper == MISSING_FROM_BATCH:
        return TransientError
    if status is not None and status >= 500:
        return TransientError
    return PermanentError


def classify_oauth(code: str, status: int | None = None) -> type[B24Error]:
    """Map an OAuth server error: gone codes lead to the re-read, 5xx is transient."""
    upper = (code or "").upper()
    if upper in OAUTH_GONE_CODES:
        return InvalidGrantError
    if upper in TRANSIENT_CODES or (status is not None and status >= 500):
        return TransientError
    return PermanentError


def make_error(code: str, description: str = "", *, status: int | None = None, method: str = "") -> B24Error:
    """Build the classified exception for a portal's error answer."""
    return classify(code, status)(code, description, status=status, method=method)
