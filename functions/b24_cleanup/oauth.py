"""The Bitrix24 OAuth server: refreshing a token pair (design §10.7).

The request carries the client secret and the refresh token in its query string (the documented
GET), so nothing about the request — not even the URL requests puts into its exception texts —
may reach a message or a log line.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from . import (
    __version__,
    logsafety,  # noqa: F401 - imported for its effect: no secrets in DEBUG logs
)
from .errors import ConfigError, PermanentError, TransientError, classify_oauth
from .record import domain_of
from .store import AppCredentials

log = logging.getLogger(__name__)

# No project URL exists to name, so the agent is the name and the one version (b24_cleanup.__version__).
USER_AGENT = f"b24-cleanup/{__version__}"
DEFAULT_TIMEOUT = (3.05, 15.0)
# The only hosts a token URL may be derived from when it comes from an untrusted request (design §9).
TRUSTED_OAUTH_HOSTS = frozenset({"oauth.bitrix.info", "oauth.bitrix24.tech"})


def derive_token_url(server_endpoint: str) -> str:
    """`https://oauth.bitrix.info/rest/` → `https://oauth.bitrix.info/oauth/token/` (design §3)."""
    parts = urlsplit(server_endpoint or "")
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        raise ConfigError("the portal record has no usable server_endpoint to derive the OAuth URL from")
    return urlunsplit((parts.scheme, parts.netloc, "/oauth/token/", "", ""))


def trusted_token_url(server_endpoint: str, override: str | None) -> str | None:
    """The token URL that may be trusted for a posted `server_endpoint`, or None (design §9).

    `override` (B24_OAUTH_URL) always wins. Otherwise only https on the default port, no user
    info, and a host that is exactly one of Bitrix24's OAuth servers.
    """
    if override:
        return override
    try:
        parts = urlsplit(server_endpoint or "")
        port = parts.port
    except ValueError:
        return None
    if (
        parts.scheme != "https"
        or port not in (None, 443)
        or parts.username is not None
        or parts.password is not None
        or "@" in parts.netloc
        or (parts.hostname or "") not in TRUSTED_OAUTH_HOSTS
        or parts.netloc.lower() not in {parts.hostname, f"{parts.hostname}:443"}
    ):
        return None
    return f"https://{parts.hostname}/oauth/token/"


class OAuthClient:
    """Refreshes token pairs. Knows nothing about where they are stored."""

    def __init__(
        self,
        credentials: AppCredentials,
        *,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        clock: Any = time.time,
    ) -> None:
        self.credentials = credentials
        self.session = session or requests.Session()
        self.timeout = timeout
        self.clock = clock

    def refresh(self, token_url: str, refresh_token: str) -> dict[str, Any]:
        """Trade `refresh_token` for a new pair. The used token is spent whatever happens next.

        Returns the OAuth answer with `expires` made absolute. Raises InvalidGrantError for the
        codes that mean "this token no longer works", TransientError for 5xx and network
        trouble, PermanentError otherwise.
        """
        if not refresh_token:
            raise PermanentError("NO_REFRESH_TOKEN", "the record holds no refresh token", method="oauth")
        params = {
            "grant_type": "refresh_token",
            "client_id": self.credentials.client_id,
            "client_secret": self.credentials.client_secret,
            "refresh_token": refresh_token,
        }
        try:
            response = self.session.get(
                token_url,
                params=params,
                timeout=self.timeout,
                allow_redirects=False,
                headers={"Accept": "application/json", "User-Agent": USER_AGENT},
            )
        except requests.RequestException as exc:
            # `from None`: the chained exception's text holds the URL with the secret in it.
            raise TransientError("OAUTH_UNREACHABLE", type(exc).__name__, method="oauth") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            kind = TransientError if response.status_code >= 500 or response.status_code == 200 else PermanentError
            raise kind(
                "OAUTH_BAD_ANSWER", "the OAuth server did not answer JSON", status=response.status_code, method="oauth"
            )
        # Some OAuth errors come with HTTP 200 (`wrong_client`, design §10.7).
        if body.get("error"):
            code = str(body["error"])
            raise classify_oauth(code, response.status_code)(
                code, _short(body.get("error_description")), status=response.status_code, method="oauth"
            )
        if response.status_code != 200:
            raise classify_oauth("", response.status_code)(
                "OAUTH_HTTP_ERROR", "", status=response.status_code, method="oauth"
            )
        if not isinstance(body.get("access_token"), str) or not isinstance(body.get("refresh_token"), str):
            raise TransientError("OAUTH_BAD_ANSWER", "the answer holds no token pair", method="oauth")
        body = dict(body)
        body["expires"] = _absolute_expiry(body, self.clock())
        return body


def _absolute_expiry(answer: dict[str, Any], now: float) -> int:
    expires = answer.get("expires")
    if isinstance(expires, int | float) and not isinstance(expires, bool) and expires > 0:
        return int(expires)
    try:
        return int(now + int(answer.get("expires_in", 3600)))
    except (TypeError, ValueError):
        return int(now + 3600)


def _short(text: object) -> str:
    """Error descriptions are the server's own words; keep them short and single-line."""
    return str(text or "").replace("\n", " ")[:200]


def apply_refresh(record_data: dict[str, Any], answer: dict[str, Any]) -> None:
    """Copy a refresh answer into a record's data (unknown keys are left as they are)."""
    record_data["access_token"] = answer["access_token"]
    record_data["refresh_token"] = answer["refresh_token"]
    record_data["expires"] = answer["expires"]
    if isinstance(answer.get("scope"), str) and answer["scope"]:
        record_data["scope"] = answer["scope"]
    endpoint = answer.get("client_endpoint")
    if isinstance(endpoint, str) and endpoint.startswith(("http://", "https://")):
        # The refresh answer tracks portal renames (design §10.7, §8).
        record_data["client_endpoint"] = endpoint
        domain = domain_of(endpoint)
        if domain:
            record_data["domain"] = domain
