"""Registering installs: the start of a portal's one token chain (design §9).

Nothing in an `ONAPPINSTALL` / `ONAPPUPDATE` body can be trusted until the OAuth server vouches
for it. So the posted refresh token is refreshed at a *trusted* OAuth URL with the app's own
credentials: only a genuine token of this app succeeds, and the OAuth server's answer — not the
request — supplies what is stored. The posted refresh token is spent by that refresh; the new pair
is the chain's first link, written before anyone uses it. So everything that can fail on our side
happens before the token is spent (reading the credentials and the existing record), and nothing
after it can stop the pair from being stored.

One implementation, three callers: the endpoint (`B24_ACCEPT_INSTALL=true`), the
`b24-cleanup register` command, and the app's own install handler (:func:`register`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from .errors import B24Error, RegistrationRejectedError, TransientError, UnreadableRecordError
from .oauth import DEFAULT_TIMEOUT as OAUTH_TIMEOUT
from .oauth import OAuthClient, pair_of, trusted_token_url
from .payload import ONAPPUPDATE, InstallPost
from .record import PortalRecord, domain_of, valid_endpoint, valid_member_id
from .store import PortalStore

log = logging.getLogger(__name__)

# Once the posted token is spent its pair must be stored: the OAuth call only starts with at least
# this long left after it, and only with MIN_OAUTH_SECONDS for itself.
STORE_RESERVE_SECONDS = 6.0
MIN_OAUTH_SECONDS = 2.0
STORE_ATTEMPTS = 5  # without a deadline


@dataclass(frozen=True)
class Registration:
    member_id: str
    event: str
    created: bool  # no record existed before


def register(
    post: InstallPost | Mapping[str, Any],
    store: PortalStore,
    *,
    oauth_url: str | None = None,
    session: requests.Session | None = None,
    deadline: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Registration:
    """Verify an install/update post with the OAuth server and write the portal's record.

    `post` is the typed post (:func:`b24_cleanup.payload.parse_post`) or the parsed body as a dict.
    `deadline` (time.monotonic) is when the caller must have answered (the endpoint's timeout): the
    posted token is only spent while there is time to store the pair, and storing it may use all of
    what is left.

    Everything that can fail on our side is done *before* the posted refresh token is spent (design
    §9): the app's credentials and the portal's existing record are read first, so that a failing
    or throttled SSM read costs a retryable error with the token still unspent. Once the OAuth
    server has rotated the pair, storing it comes first, and nothing that the answer holds can make
    this function raise before it is stored.

    Raises:
        RegistrationInvalidError: the body is not a registration (wrong event, auth fields missing).
        RegistrationRejectedError: the OAuth server did not vouch for it; nothing was written.
        ConfigError: the app's credentials are missing or unreadable (ours, not the caller's).
        TransientError: SSM failed, or too little time is left to store a pair (the install may be
            genuine); raised before the posted token is spent, except when storing the spent
            token's pair failed until the deadline (logged: the chain is lost).
    """
    if not isinstance(post, InstallPost):
        post = InstallPost.from_payload(post)
    posted_member = post.member_id if valid_member_id(post.member_id) else None

    def rejected(reason: str) -> RegistrationRejectedError:
        return RegistrationRejectedError(reason, posted_member)

    if posted_member is None:
        raise rejected("posted member_id is malformed")
    token_url = trusted_token_url(post.server_endpoint, oauth_url)
    if token_url is None:
        raise rejected("no trusted OAuth server for the posted server_endpoint")

    # Read before spending: both reads may fail (503) while the posted token still works.
    credentials = store.app_credentials()  # ConfigError propagates: that is ours, not the caller's
    try:
        existing = store.get(posted_member)
    except UnreadableRecordError:
        log.warning("portal %s: the stored record is not JSON; registering as if there were none", posted_member)
        existing = None
    timeout = _oauth_timeout(deadline)

    try:
        answer = OAuthClient(credentials, session=session, timeout=timeout).refresh(token_url, post.refresh_token)
    except B24Error as exc:
        raise rejected(f"the OAuth server refused the posted refresh token ({exc.code})") from None

    # The posted token is spent. The answer vouches for the pair, but only for the portal it names.
    member_id = answer.get("member_id")
    if member_id != posted_member:
        raise rejected("the OAuth server's member_id differs from the posted one")
    record = _record(post, existing, answer, token_url)
    _store_first(store, posted_member, record, deadline, sleep)
    log.info("registered %s for portal %s", post.event, posted_member)
    return Registration(member_id=posted_member, event=post.event, created=existing is None)


def _record(post: InstallPost, existing: PortalRecord | None, answer: dict[str, Any], token_url: str) -> PortalRecord:
    """The record to store: what the OAuth answer vouches for, and the posted application_token.

    An install starts a new record (an older install's content goes); an update keeps every other
    key. An update for a portal with no record is an install. Never raises: the pair in `answer`
    exists nowhere else.
    """
    data: dict[str, Any] = dict(existing.data) if (post.event == ONAPPUPDATE and existing is not None) else {}
    pair = pair_of(answer)  # the pair, and the answer's address when it is a usable one
    data.update(pair)
    data.update(
        {
            "member_id": post.member_id,
            "server_endpoint": _server_endpoint(token_url),
            "application_token": post.application_token,
        }
    )
    if "client_endpoint" not in pair:
        _address_without_the_answer(data, existing, post.member_id)
    # Only the OAuth answer says what the app may do: with no scope in it, none is stored.
    scope = answer.get("scope")
    if isinstance(scope, str) and scope:
        data["scope"] = scope
    else:
        data.pop("scope", None)
    data.pop("revoked_at", None)  # a fresh install or update proves the app is there
    return PortalRecord(data)


def _address_without_the_answer(data: dict[str, Any], existing: PortalRecord | None, member_id: str) -> None:
    """The OAuth answer named no usable client_endpoint: the pair must be stored all the same, with
    the address the record knew (a posted one never counts), or with none."""
    if existing is not None and valid_endpoint(existing.client_endpoint):
        log.warning("portal %s: the OAuth answer names no usable client_endpoint; kept the stored one", member_id)
        data["client_endpoint"], data["domain"] = existing.client_endpoint, domain_of(existing.client_endpoint)
    else:
        log.warning("portal %s: the OAuth answer names no usable client_endpoint; stored without one", member_id)
        data.pop("client_endpoint", None)
        data.pop("domain", None)


def _oauth_timeout(deadline: float | None) -> tuple[float, float]:
    """The OAuth call's limits, leaving STORE_RESERVE_SECONDS to store its pair; TransientError when
    the time left is too short to spend the posted token safely (it stays unspent)."""
    connect, limit = OAUTH_TIMEOUT
    if deadline is None:
        return connect, limit
    left = deadline - time.monotonic() - STORE_RESERVE_SECONDS
    if left < MIN_OAUTH_SECONDS:
        raise TransientError("NO_TIME_TO_STORE", "too little time left to store a refreshed pair; token not spent")
    return min(connect, left), min(limit, left)


def _store_first(
    store: PortalStore,
    member_id: str,
    record: PortalRecord,
    deadline: float | None,
    sleep: Callable[[float], None],
) -> None:
    """Write the spent token's pair, retrying transient failures within the time left (design §9, §5 step 3).

    Without a deadline (the CLI, the app's own install handler) it tries STORE_ATTEMPTS times.
    """
    for attempt in itertools.count(1):
        try:
            store.put(member_id, record, secure=True)
            return
        except TransientError:
            wait = min(4.0, 0.25 * 2**attempt)
            out_of_time = deadline is not None and time.monotonic() + wait >= deadline
            if out_of_time or (deadline is None and attempt >= STORE_ATTEMPTS):
                log.error(
                    "portal %s: the registered token pair could not be stored (%d attempts); the chain is lost",
                    member_id,
                    attempt,
                )
                raise
            sleep(wait)


def _server_endpoint(token_url: str) -> str:
    """The trusted OAuth server's REST base, the form design §3 stores (`https://host/rest/`)."""
    parts = urlsplit(token_url)
    return urlunsplit((parts.scheme, parts.netloc, "/rest/", "", ""))
