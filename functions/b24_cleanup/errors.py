"""Every exception the package raises, one per meaning, and the classification of Bitrix24 error codes.

One tree, one root (:class:`B24CleanupError`)::

    B24CleanupError
    ├── B24Error                  a portal's or the OAuth server's answer, by what to do about it
    │   ├── ExpiredTokenError     refresh once and retry
    │   ├── RevokedError          the app is gone from the portal
    │   ├── TransientError        retry later (5xx, timeouts, limits, SSM throttling)
    │   │   └── RateLimitedError
    │   ├── PermanentError        a retry cannot mend it
    │   └── InvalidGrantError     the OAuth server refused the refresh token
    ├── ConfigError               our own configuration is missing or broken
    │   └── InvalidDeclaredSetError
    ├── PayloadError              (also ValueError) not a usable event body → 400
    │   ├── PayloadTooLargeError  → 413
    │   └── RegistrationInvalidError  not a registration body → 400
    ├── RegistrationRejectedError the OAuth server did not vouch for an install → 401
    ├── UnauthorizedError         an uninstall that does not prove itself → 401
    ├── PortalNotFoundError       (also LookupError) no record for that member id
    ├── InvalidJobError           (also ValueError) a queue message that is no job
    ├── JobFailedError            a job ended `failed`: the queue retries it
    └── EnqueueFailedError        SQS did not take the jobs

Messages carry the method, the error code and the portal's own description, or the rule that
failed, never a token or a value from a request: every exception here may end up in a log line
or an answer (design §7).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .jobs import JobResult

# design §10.11 and design §5 step 7. Codes are compared case-insensitively (Bitrix24 mixes
# `expired_token` with `QUERY_LIMIT_EXCEEDED`), so every set holds upper-cased codes.
EXPIRED_CODES = frozenset({"EXPIRED_TOKEN", "NO_AUTH_FOUND"})
REVOKED_CODES = frozenset(
    {"APPLICATION_NOT_FOUND", "INVALID_TOKEN", "ERROR_OAUTH", "PAYMENT_REQUIRED", "PORTAL_DELETED"}
)
# What the OAuth server answers for a refresh token that no longer works (design §10.7).
OAUTH_GONE_CODES = frozenset({"INVALID_GRANT", "NOT_INSTALLED", "INVALID_CLIENT", "PAYMENT_REQUIRED"})
# Not `wrong_client` (HTTP 200: the OAuth server does not know the client_id, or the token is another
# app's): that says nothing about the portal. Read as "gone", one wrong client_id would mark every
# portal of the fleet revoked and delete every record after the grace; as a permanent error the job
# ends `incomplete` (retried next night, nothing marked) and registration answers 401.
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
# A command that a batch answer lists neither in `result` nor in `result_error` (design §5 step 5).
MISSING_FROM_BATCH = "MISSING_FROM_BATCH"


class B24CleanupError(Exception):
    """The root of every exception this package raises on purpose: `except B24CleanupError` catches them all."""


class B24Error(B24CleanupError):
    """An answer of a portal or the OAuth server, classified by what to do about it (the subclasses)."""

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
    """The access token was refused as expired: refresh once and retry (design §5 step 3)."""


class RevokedError(B24Error):
    """The app is gone from the portal: its tokens no longer work (design §5 step 7)."""


class TransientError(B24Error):
    """Worth retrying later: 5xx, timeouts, rate and time limits, SSM throttling."""


class RateLimitedError(TransientError):
    """HTTP 503 QUERY_LIMIT_EXCEEDED: the portal's leaky bucket is full."""


class RecordChangedError(TransientError):
    """A conditional write to the DynamoDB store lost (design §3a): the item moved past the version read."""

    def __init__(self, member_id: str) -> None:
        super().__init__("RECORD_CHANGED", f"the record of {member_id} changed since it was read")


class PermanentError(B24Error):
    """A client error that a retry cannot mend (bad argument, access denied, licence)."""


class UntrustedTargetError(PermanentError):
    """A token or the client secret would go where nobody vouched for it: an untrusted
    `server_endpoint`, a redirect the OAuth server does not confirm. Nothing was sent there; the job
    ends `incomplete`, wherever it is raised (never taken for a refused `batch` or a failed command).
    """


class InvalidGrantError(B24Error):
    """The OAuth server refused the refresh token: the caller re-reads the record once."""


class ConfigError(B24CleanupError):
    """The service's own configuration is missing or broken (credentials, prefix, declared set)."""


class MovedRecordError(ConfigError):
    """The portal's record moved to DynamoDB (design §3a): an SSM store must not use what is left of it."""

    def __init__(self, member_id: str, text: str) -> None:
        try:
            data = json.loads(text)
            where = f"{data.get('moved_to')} table {data.get('table')}"
        except (ValueError, AttributeError):
            where = "DynamoDB"
        super().__init__(f"the record of {member_id} moved to {where}: set B24_STORE=dynamodb and B24_TABLE to use it")


class UnreadableRecordError(ConfigError):
    """A portal record that is not a JSON object. Registration takes it for absent (design §9); every
    other reader stops: it cannot tell which tokens are the portal's."""


class InvalidDeclaredSetError(ConfigError):
    """The declared handler set is invalid (design §3): a sweep must unbind nothing."""


class PayloadError(B24CleanupError, ValueError):
    """The body is not a usable Bitrix24 event: the endpoint answers 400 (413 for PayloadTooLargeError)."""


class PayloadTooLargeError(PayloadError):
    """The body is over the size limit (the endpoint answers 413)."""


class RegistrationInvalidError(PayloadError):
    """The body is not a registration at all (→ 400): wrong event, tokens missing."""


class RegistrationRejectedError(B24CleanupError):
    """The OAuth server did not vouch for the body (→ 401, nothing written). The reason is safe to log.

    `member_id` is the posted one when it is well-formed (for the log line), else None.
    """

    def __init__(self, reason: str, member_id: str | None = None) -> None:
        super().__init__(reason)
        self.member_id = member_id


class UnauthorizedError(B24CleanupError):
    """An uninstall that does not prove itself (unknown portal, wrong token, malformed member_id).

    The message is safe to log; `member_id` is set when it is well-formed. Callers answer every
    case alike, so that a prober cannot tell which member ids exist.
    """

    def __init__(self, reason: str, member_id: str | None = None) -> None:
        super().__init__(reason)
        self.member_id = member_id


class PortalNotFoundError(B24CleanupError, LookupError):
    """No record for that member id: the app is not registered on the portal (or was removed)."""


class InvalidJobError(B24CleanupError, ValueError):
    """A queue message that is not a job of design §5 (the worker fails its record)."""


class JobFailedError(B24CleanupError):
    """A job ended `failed` (transient): the worker fails the SQS record so that it is retried."""

    def __init__(self, result: JobResult) -> None:
        self.result = result
        super().__init__(f"{result.action.value} job for {result.member_id} failed: {result.reason}")


class EnqueueFailedError(B24CleanupError):
    """Jobs could not be queued. For the sweep fan-out, `sent` jobs were accepted before it stopped.

    They stay queued, and a retried run with the same scheduled time is deduplicated by SQS
    (within its five-minute window).
    """

    def __init__(self, message: str, sent: int = 0) -> None:
        super().__init__(message)
        self.sent = sent


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
