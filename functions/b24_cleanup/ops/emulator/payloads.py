"""The bodies a portal POSTs to an app's install/update/uninstall URL (design §10.5 to §5.4).

Form-encoded with PHP bracket keys, in the order the docs list them. ONAPPUNINSTALL carries no
token, scope or status (`sendAuth => false` in [src]); whether it has `event_handler_id` is
unconfirmed, so it is left out: the service must not depend on it.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import requests

from .models import Installation, TokenPair
from .phpform import flatten
from .state import Portal, State

POST_TIMEOUT = 10.0


def _auth_with_tokens(state: State, inst: Installation, tokens: TokenPair) -> dict[str, Any]:
    portal = inst.portal
    return {  # the order of the docs' examples (on-app-install.md, on-app-update.md)
        "domain": portal.domain,
        "scope": inst.app.scope,
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "expires_in": str(tokens.expires_in),
        "server_endpoint": state.server_endpoint,
        "status": inst.app.status,
        "client_endpoint": portal.client_endpoint,
        "member_id": portal.member_id,
        "application_token": inst.application_token,
    }


def install_form(state: State, inst: Installation, *, ts: int | None = None) -> list[tuple[str, str]]:
    """ONAPPINSTALL (design §10.5) or ONAPPUPDATE (§5.3), as form pairs."""
    data: dict[str, Any] = {"VERSION": str(inst.app.version), "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"}
    if inst.event == "ONAPPUPDATE":
        data = {"VERSION": str(inst.app.version), "PREVIOUS_VERSION": str(inst.app.version - 1), "LANGUAGE_ID": "en"}
    body = {
        "event": inst.event,
        "event_handler_id": str(secrets.randbelow(900) + 100),
        "data": data,
        "ts": str(ts if ts is not None else int(time.time())),
        "auth": _auth_with_tokens(state, inst, inst.tokens),
    }
    return flatten(body)


def uninstall_form(
    state: State, portal: Portal, application_token: str, *, clean: bool, ts: int | None = None
) -> list[tuple[str, str]]:
    """ONAPPUNINSTALL (design §10.5): no tokens, only the identifying auth keys."""
    body = {
        "event": "ONAPPUNINSTALL",
        "data": {"LANGUAGE_ID": "en", "CLEAN": "1" if clean else "0"},
        "ts": str(ts if ts is not None else int(time.time())),
        "auth": {
            "domain": portal.domain,
            "server_endpoint": state.server_endpoint,
            "client_endpoint": portal.client_endpoint,
            "member_id": portal.member_id,
            "application_token": application_token,
        },
    }
    return flatten(body)


def post_form(url: str, pairs: list[tuple[str, str]], timeout: float = POST_TIMEOUT) -> int:
    """POST like the portal's queue server: form-encoded, no redirects, no retries.

    Returns the HTTP status, or 0 when the URL could not be reached (the portal only logs that).
    """
    try:
        response = requests.post(url, data=pairs, timeout=timeout, allow_redirects=False)
    except requests.RequestException:
        return 0
    return response.status_code
