"""Registering installs: the start of a portal's one token chain (design §9).

Nothing in an `ONAPPINSTALL` / `ONAPPUPDATE` body can be trusted until the OAuth server vouches
for it. So the posted refresh token is refreshed at a *trusted* OAuth URL with the app's own
credentials: only a genuine token of this app succeeds, and the OAuth server's answer — not the
request — supplies what is stored. The posted refresh token is spent by that refresh; the new pair
is the chain's first link, written before anyone uses it.

One implementation, three callers: the endpoint (`B24_ACCEPT_INSTALL=true`), the
`b24-cleanup register` command, and the app's own install handler (:func:`register`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from .errors import B24Error, RegistrationRejectedError
from .oauth import OAuthClient, trusted_token_url
from .payload import ONAPPUPDATE, InstallPost
from .record import PortalRecord, domain_of, valid_member_id
from .store import PortalStore
from .tokens import persist

log = logging.getLogger(__name__)


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
) -> Registration:
    """Verify an install/update post with the OAuth server and write the portal's record.

    `post` is the typed post (:func:`b24_cleanup.payload.parse_post`) or the parsed body as a dict.

    Raises:
        RegistrationInvalidError: the body is not a registration (wrong event, auth fields missing).
        RegistrationRejectedError: the OAuth server did not vouch for it; nothing was written.
        ConfigError: the app's credentials are missing or unreadable (ours, not the caller's).
        TransientError: SSM failed while reading or writing the record (the install may be genuine).
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

    credentials = store.app_credentials()  # ConfigError propagates: that is ours, not the caller's
    try:
        answer = OAuthClient(credentials, session=session).refresh(token_url, post.refresh_token)
    except B24Error as exc:
        raise rejected(f"the OAuth server refused the posted refresh token ({exc.code})") from None

    member_id = answer.get("member_id")
    if member_id != posted_member:
        raise rejected("the OAuth server's member_id differs from the posted one")
    client_endpoint = answer.get("client_endpoint")
    if not isinstance(client_endpoint, str) or urlsplit(client_endpoint).scheme not in {"http", "https"}:
        raise rejected("the OAuth server's answer has no usable client_endpoint")

    existing = store.get(member_id)
    # An install starts a new record (an older install's content goes); an update keeps every
    # other key. An update for a portal with no record is an install.
    data: dict[str, Any] = dict(existing.data) if (post.event == ONAPPUPDATE and existing is not None) else {}
    scope = answer.get("scope") if isinstance(answer.get("scope"), str) else post.scope
    data.update(
        {
            "member_id": member_id,
            "domain": domain_of(client_endpoint),
            "client_endpoint": client_endpoint,
            "server_endpoint": _server_endpoint(token_url),
            "access_token": answer["access_token"],
            "refresh_token": answer["refresh_token"],
            "expires": answer["expires"],
            "application_token": post.application_token,
            "scope": scope,
        }
    )
    data.pop("revoked_at", None)  # a fresh install or update proves the app is there
    # The posted refresh token is spent: this write holds the chain's only copy.
    persist(store, member_id, PortalRecord(data), secure=True)
    log.info("registered %s for portal %s", post.event, member_id)
    return Registration(member_id=member_id, event=post.event, created=existing is None)


def _server_endpoint(token_url: str) -> str:
    """The trusted OAuth server's REST base, the form design §3 stores (`https://host/rest/`)."""
    parts = urlsplit(token_url)
    return urlunsplit((parts.scheme, parts.netloc, "/rest/", "", ""))
