"""The uninstall endpoint: a Lambda Function URL (payload format 2.0) that Bitrix24 POSTs to.

SPEC §5 "Uninstall endpoint". The URL is public and Bitrix24 cannot sign its requests, so the only
proof that an `ONAPPUNINSTALL` is genuine is its `auth[application_token]`, compared in constant
time with the one stored in the portal's record (reference §6). Everything is decided in this
order, so that a spoofed or malformed request never reaches a write and never earns a 5xx:

    method (405) → size (413) → base64 (400) → parse (400) → event (400) → auth fields (400)
    → member_id format (401, no AWS call) → one SSM read → token compare (401) → one SQS send (200)

The only 5xx is 503, when SSM or SQS fails while handling a request that may be genuine: the
record read has to happen before we can tell, so a transient SSM failure on a spoofed request
is answered 503 too — it depends on our state, never on the input, and writes nothing.

Written as a small explicit handler rather than with Powertools' `LambdaFunctionUrlResolver`:
the resolver answers an unrouted method with 404 (SPEC wants 405), routes by path (Bitrix24 may
post to any path of the URL), and its `decoded_body` decodes leniently and without a size bound
(SPEC wants 413 decided on the decoded size before parsing, a bad base64 answered 400, and an
absurd encoded body refused without decoding it). What would be left of it is one route.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.logging import correlation_paths
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import B24Error, ConfigError
from ..jobs import Action, Job
from ..payload import MAX_BODY_BYTES, EventPost, PayloadError, PayloadTooLarge, event_name, parse_event_body
from ..record import valid_member_id
from .deps import reset as reset_clients  # noqa: F401 - public: tests and the demo reset the handler
from .deps import settings as _settings
from .deps import sqs as _sqs
from .deps import store as _store
from .observability import logger, publish

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

ACTION = "endpoint"
UNINSTALL = "ONAPPUNINSTALL"
INSTALL_EVENTS = frozenset({"ONAPPINSTALL", "ONAPPUPDATE"})

# The longest base64 text that can decode to MAX_BODY_BYTES; anything longer is over the limit
# whatever it holds, so it is refused without being decoded.
MAX_ENCODED_CHARS = 4 * -(-MAX_BODY_BYTES // 3)

# One body per status. 401 is the same for an unknown portal, a wrong token and a malformed
# member_id: the answer must not tell a prober which member ids exist.
ACCEPTED = {"status": "accepted"}
UNAUTHORIZED = {"error": "unauthorized"}


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


class Rejected(Exception):
    """A 4xx decision: `reason` is for the log line and never holds a value from the request."""

    def __init__(
        self,
        status: int,
        body: dict[str, str],
        reason: str,
        member_id: str | None = None,
        metric: str = "UninstallRejected",
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.body = body
        self.reason = reason
        self.member_id = member_id
        self.metric = metric


class Unavailable(Exception):
    """SSM, SQS or the configuration failed on a request that may be genuine: 503."""


def _response(status: int, body: dict[str, str], headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json", **(headers or {})},
        "body": json.dumps(body, separators=(",", ":")),
    }


def _bad_request(reason: str) -> Rejected:
    return Rejected(400, {"error": "bad_request", "detail": reason}, reason)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _header(event: dict[str, Any], name: str) -> str | None:
    """A request header; Function URLs lower-case names, HTTP API v2 does too, but be sure."""
    headers = event.get("headers")
    if not isinstance(headers, dict):
        return None
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == name), None)
    return value if isinstance(value, str) else None


def _method(event: dict[str, Any]) -> str | None:
    """`requestContext.http.method` of payload format 2.0 (None when the event is not one)."""
    context = event.get("requestContext")
    http = context.get("http") if isinstance(context, dict) else None
    method = http.get("method") if isinstance(http, dict) else None
    return method.upper() if isinstance(method, str) else None


def read_body(event: dict[str, Any]) -> bytes:
    """The raw request body, size-checked before anything is parsed (413), base64 decoded strictly (400)."""
    body = event.get("body")
    if body is None:
        return b""
    if not isinstance(body, str):
        raise _bad_request("body is not text")
    if event.get("isBase64Encoded") is True:
        if len(body) > MAX_ENCODED_CHARS:
            raise Rejected(413, {"error": "payload_too_large"}, "encoded body is over the size limit")
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_request("body is not valid base64") from None
    else:
        if len(body) > MAX_BODY_BYTES:  # every character is at least one byte
            raise Rejected(413, {"error": "payload_too_large"}, "body is over the size limit")
        try:
            raw = body.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad_request("body is not valid UTF-8") from None
    if len(raw) > MAX_BODY_BYTES:
        raise Rejected(413, {"error": "payload_too_large"}, "body is over the size limit")
    return raw


def verify(post: EventPost) -> None:
    """Compare the posted application_token with the stored one; raise :class:`Rejected` (401).

    Exactly one SSM read, no write. A malformed member_id is refused before any AWS call.
    """
    if not valid_member_id(post.member_id):
        raise Rejected(401, UNAUTHORIZED, "malformed member_id")
    try:
        record = _store().get(post.member_id)
    except (B24Error, ConfigError, ClientError, BotoCoreError) as exc:
        # Transient SSM failure, missing permission or a corrupt record: we cannot tell whether
        # the request is genuine, and it might be, so the operator has to see it (503, error log).
        raise Unavailable(f"reading the portal record failed: {type(exc).__name__}: {exc}") from None
    if record is None:
        raise Rejected(401, UNAUTHORIZED, "unknown member_id", post.member_id)
    stored = record.application_token.encode("utf-8")
    posted = post.application_token.encode("utf-8", "surrogatepass")
    if not stored or not hmac.compare_digest(stored, posted):
        raise Rejected(401, UNAUTHORIZED, "application_token does not match", post.member_id)


def dedup_id(member_id: str, ts: str | None) -> str:
    """FIFO deduplication id of an uninstall: the same event delivered twice is queued once."""
    # Bitrix24 always sends `ts`; should it be missing, the current second stands in for it, so
    # that only a repeat within the same second is merged (rather than every later uninstall of
    # the portal within SQS's five-minute window).
    stamp = ts if ts is not None else str(int(time.time()))
    return hashlib.sha256(f"uninstall:{member_id}:{stamp}".encode()).hexdigest()


def enqueue(post: EventPost) -> None:
    """One SQS SendMessage: the uninstall job of SPEC §5 on the portal's FIFO group."""
    job = Job(Action.UNINSTALL, post.member_id, post.application_token, post.clean, post.ts)
    try:
        queue_url = _settings().require_queue()
        _sqs().send_message(
            QueueUrl=queue_url,
            MessageBody=json.dumps(job.to_message(), separators=(",", ":")),
            MessageGroupId=post.member_id,
            MessageDeduplicationId=dedup_id(post.member_id, post.ts),
        )
    except ConfigError as exc:
        raise Unavailable(str(exc)) from None
    except (ClientError, BotoCoreError) as exc:
        raise Unavailable(f"sending the uninstall job failed: {type(exc).__name__}") from None


def _register(payload: dict[str, Any]) -> dict[str, Any]:
    """ONAPPINSTALL / ONAPPUPDATE with B24_ACCEPT_INSTALL=true: SPEC §9, through `registration`.

    Imported here, not at the top: an uninstall-only deployment never loads the OAuth client.
    A body that is not a registration → 400; anything the OAuth server does not vouch for → 401
    with the same body as a spoofed uninstall, nothing written; our own SSM or configuration
    failing → 503 (the install may be genuine).
    """
    from .. import registration

    try:
        result = registration.register(payload, _store(), oauth_url=_settings().oauth_url)
    except registration.RegistrationInvalid as exc:
        reason = str(exc)
        raise Rejected(400, {"error": "bad_request", "detail": reason}, reason, metric="InstallsRejected") from None
    except registration.RegistrationRejected as exc:
        member_id = _posted_member_id(payload)
        raise Rejected(401, UNAUTHORIZED, str(exc), member_id, metric="InstallsRejected") from None
    except (B24Error, ConfigError, ClientError, BotoCoreError) as exc:
        raise Unavailable(f"registering the install failed: {type(exc).__name__}: {exc}") from None
    logger.info(
        "install registered", extra={"member_id": result.member_id, "event": result.event, "new_record": result.created}
    )
    publish(ACTION, {"InstallsRegistered": 1})
    return _response(200, {"status": "registered"})


def _posted_member_id(payload: dict[str, Any]) -> str | None:
    """The posted member_id when it is well-formed (for the log line of a rejection), else None."""
    auth = payload.get("auth")
    member_id = auth.get("member_id") if isinstance(auth, dict) else None
    return member_id if valid_member_id(member_id) else None


def handle(event: dict[str, Any]) -> dict[str, Any]:
    """Decide one request (no Lambda context needed): the status matrix of SPEC §5."""
    if not isinstance(event, dict) or _method(event) != "POST":
        raise Rejected(405, {"error": "method_not_allowed"}, "method is not POST")
    raw = read_body(event)
    try:
        payload = parse_event_body(raw, _header(event, "content-type"))
        name = event_name(payload)
    except PayloadTooLarge as exc:
        raise Rejected(413, {"error": "payload_too_large"}, str(exc)) from None
    except PayloadError as exc:
        raise _bad_request(str(exc)) from None

    if name in INSTALL_EVENTS:
        try:
            accept_install = _settings().accept_install
        except ConfigError as exc:
            raise Unavailable(str(exc)) from None
        if accept_install:
            return _register(payload)
        raise _bad_request("install events are not accepted (B24_ACCEPT_INSTALL is off)")
    if name != UNINSTALL:
        raise _bad_request("event is not ONAPPUNINSTALL")

    try:
        post = EventPost.from_payload(payload)
    except PayloadError as exc:
        raise _bad_request(str(exc)) from None
    verify(post)
    enqueue(post)
    logger.info("uninstall accepted", extra={"member_id": post.member_id, "ts": post.ts, "clean": post.clean})
    publish(ACTION, {"UninstallAccepted": 1})
    return _response(200, ACCEPTED)


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.LAMBDA_FUNCTION_URL, log_event=False, clear_state=True
)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Function URL entry point: every 4xx is counted (`UninstallRejected`, or `InstallsRejected` for a
    refused registration) and logged with its reason; the event itself is never logged."""
    try:
        return handle(event)
    except Rejected as rejected:
        extra: dict[str, Any] = {"status": rejected.status, "reason": rejected.reason}
        if rejected.member_id is not None:
            extra["member_id"] = rejected.member_id
        (logger.warning if rejected.status == 401 else logger.info)("request rejected", extra=extra)
        publish(ACTION, {rejected.metric: 1})
        headers = {"allow": "POST"} if rejected.status == 405 else None
        return _response(rejected.status, rejected.body, headers)
    except Unavailable as exc:
        logger.error("request not handled: dependency failed", extra={"reason": str(exc)})
        return _response(503, {"error": "unavailable"}, {"retry-after": "60"})
