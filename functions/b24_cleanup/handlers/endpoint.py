"""The uninstall endpoint: a Lambda Function URL (payload format 2.0) that Bitrix24 POSTs to.

design §5 "Uninstall endpoint"; the proof and the job are the core's (:mod:`b24_cleanup.uninstall`).
Decided in this order, so that a spoofed or malformed request never reaches a write nor earns a 5xx:

    method (405) → size (413) → base64 (400) → parse (400) → event (400) → auth fields (400)
    → member_id format (401, no AWS call) → one SSM read → token compare (401) → one SQS send (200)

The only 5xx is 503, when SSM or SQS fails while handling a request that may be genuine: the
record read has to happen before we can tell, so a transient SSM failure on a spoofed request
is answered 503 too — our state, never the input; nothing written; in time (runtime.endpoint_request).

Not Powertools' `LambdaFunctionUrlResolver`: it answers an unrouted method 404 (design §5: 405), routes
by path (Bitrix24 may post to any path) and decodes the body leniently with no size bound (design §5:
413 on the decoded size before parsing, bad base64 400, an absurd encoded body never decoded).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools.logging import correlation_paths
from botocore.exceptions import BotoCoreError, ClientError

from .. import errors, runtime, uninstall
from ..payload import INSTALL_EVENTS, InstallPost, decode_body, event_name, parse_event_body, parse_post
from .observability import logger, publish

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

ACTION = "endpoint"
# Our own state failing while a request may be genuine: 503, never the input's fault.
DEPENDENCY_ERRORS = (errors.B24Error, errors.ConfigError, errors.EnqueueFailedError, ClientError, BotoCoreError)

# One body per status. 401 is the same for an unknown portal, a wrong token and a malformed
# member_id: the answer must not tell a prober which member ids exist.
ACCEPTED = {"status": "accepted"}
UNAUTHORIZED = {"error": "unauthorized"}


@dataclass
class Rejected(Exception):
    """A 4xx decision: `reason` is for the log line and never holds a value from the request."""

    status: int
    body: dict[str, str]
    reason: str
    member_id: str | None = None
    metric: str = "UninstallRejected"


class Unavailable(Exception):
    """SSM, SQS or the configuration failed on a request that may be genuine: 503."""


def _response(status: int, body: dict[str, str], headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json", **(headers or {})},
        "body": json.dumps(body, separators=(",", ":")),
    }


def _bad_request(reason: str, metric: str = "UninstallRejected") -> Rejected:
    return Rejected(400, {"error": "bad_request", "detail": reason}, reason, metric=metric)


def _request(event: dict[str, Any]) -> tuple[str | None, str | None]:
    """`requestContext.http.method` of payload format 2.0 and the content type (None when absent)."""
    context = event.get("requestContext")
    http = context.get("http") if isinstance(context, dict) else None
    method = http.get("method") if isinstance(http, dict) else None
    headers = found if isinstance(found := event.get("headers"), dict) else {}
    # Function URLs lower-case header names, HTTP API v2 does too, but be sure.
    kind = headers.get("content-type")
    if kind is None:
        kind = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == "content-type"), None)
    return (method.upper() if isinstance(method, str) else None), (kind if isinstance(kind, str) else None)


def _register(post: InstallPost) -> dict[str, Any]:
    """ONAPPINSTALL / ONAPPUPDATE with B24_ACCEPT_INSTALL=true (design §9): not vouched for → 401 (a spoofed
    uninstall's body); our own state failing → 503. Imported late: uninstall-only never loads OAuth."""
    from .. import registration

    try:
        settings, deadline = runtime.settings(), runtime.endpoint_deadline()
        result = registration.register(post, runtime.endpoint_store(), oauth_url=settings.oauth_url, deadline=deadline)
    except errors.RegistrationRejectedError as exc:
        raise Rejected(401, UNAUTHORIZED, str(exc), exc.member_id, metric="InstallsRejected") from None
    except DEPENDENCY_ERRORS as exc:
        raise Unavailable(f"registering the install failed: {type(exc).__name__}: {exc}") from None
    logger.info(f"{result.event} registered", extra={"member_id": result.member_id, "new_record": result.created})
    publish(ACTION, {"InstallsRegistered": 1})
    return _response(200, {"status": "registered"})


def handle(event: dict[str, Any]) -> dict[str, Any]:
    """Decide one request (no Lambda context needed): the status matrix of design §5."""
    method, content_type = _request(event) if isinstance(event, dict) else (None, None)
    if method != "POST":
        raise Rejected(405, {"error": "method_not_allowed"}, "method is not POST")
    try:
        payload = parse_event_body(decode_body(event.get("body"), event.get("isBase64Encoded") is True), content_type)
        if event_name(payload) in INSTALL_EVENTS and not runtime.settings().accept_install:
            raise _bad_request("install events are not accepted (B24_ACCEPT_INSTALL is off)")
        post = parse_post(payload)
    except errors.PayloadTooLargeError as exc:
        raise Rejected(413, {"error": "payload_too_large"}, str(exc)) from None
    except errors.RegistrationInvalidError as exc:
        raise _bad_request(str(exc), "InstallsRejected") from None
    except errors.PayloadError as exc:
        raise _bad_request(str(exc)) from None
    except errors.ConfigError as exc:  # the settings, read for an install event only
        raise Unavailable(str(exc)) from None
    if isinstance(post, InstallPost):
        return _register(post)
    try:
        uninstall.accept(post, runtime.endpoint_store, runtime.endpoint_queue)
    except errors.UnauthorizedError as exc:
        raise Rejected(401, UNAUTHORIZED, str(exc), exc.member_id) from None
    except DEPENDENCY_ERRORS as exc:
        raise Unavailable(f"accepting the uninstall failed: {type(exc).__name__}: {exc}") from None
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
        with runtime.endpoint_request(context):
            return handle(event)
    except Rejected as rejected:
        extra = {"status": rejected.status, "reason": rejected.reason, "member_id": rejected.member_id}
        extra = {key: value for key, value in extra.items() if value is not None}
        (logger.warning if rejected.status == 401 else logger.info)("request rejected", extra=extra)
        publish(ACTION, {rejected.metric: 1})
        headers = {"allow": "POST"} if rejected.status == 405 else None
        return _response(rejected.status, rejected.body, headers)
    except Unavailable as exc:
        logger.error("request not handled: dependency failed", extra={"reason": str(exc)})
        return _response(503, {"error": "unavailable"}, {"retry-after": "60"})
