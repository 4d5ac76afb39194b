"""Accepting an uninstall (design §5 "Uninstall endpoint"): prove it, then queue its job.

The endpoint's URL is public and Bitrix24 cannot sign its requests, so the only proof that an
`ONAPPUNINSTALL` is genuine is its `auth[application_token]`, compared in constant time with the
one stored in the portal's record (design §10.6): exactly one SSM read, no write, and a malformed
member_id refused before any AWS call. Only then is one job sent, in one SQS SendMessage.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from .errors import UnauthorizedError
from .jobs import Action, Job
from .payload import UninstallPost
from .queue import JobQueue
from .record import valid_member_id
from .store import PortalStore


def verify(post: UninstallPost, store: Callable[[], PortalStore]) -> None:
    """Compare the posted application_token with the stored one, or raise UnauthorizedError.

    `store` is only called for a well-formed member_id. Store failures (B24Error, ConfigError)
    propagate: whether the request is genuine is then unknown.
    """
    if not valid_member_id(post.member_id):
        raise UnauthorizedError("malformed member_id")
    record = store().get(post.member_id)
    if record is None:
        raise UnauthorizedError("unknown member_id", post.member_id)
    stored = record.application_token.encode("utf-8")
    posted = post.application_token.encode("utf-8", "surrogatepass")
    if not stored or not hmac.compare_digest(stored, posted):
        raise UnauthorizedError("application_token does not match", post.member_id)


def accept(post: UninstallPost, store: Callable[[], PortalStore], queue: Callable[[], JobQueue]) -> Job:
    """Verify the post, then queue its uninstall job; `queue` is only called once it is verified.

    Raises UnauthorizedError, the store's errors, ConfigError (no queue configured) and
    EnqueueFailedError (SQS did not take the job).
    """
    verify(post, store)
    job = Job(Action.UNINSTALL, post.member_id, post.application_token, post.clean, post.ts)
    queue().send_uninstall(job)
    return job
