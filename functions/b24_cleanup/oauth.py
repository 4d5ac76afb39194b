"""The Bitrix24 OAuth server: refreshing a token pair (design §10.7).

The request carries the client secret and the refresh token in its query string (the documented
GET), so nothing about the request — not even the URL requests puts into its exception texts —
may reach a message or a log line. And it goes only to a trusted token URL (design §5 step 3, §9):
`B24_OAUTH_URL` when set, else one derived from a `server_endpoint` that names Bitrix24's own OAuth
server exactly — whoever wrote the record (this service's registration, the app's own install flow,
an operator), a record naming any other host never receives the client secret or a refresh token.
The request is bounded like every other (transport.py), and its answer is read as strict JSON.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests

from . import __version__
from .errors import PermanentError, TransientError, UntrustedTargetError, classify_oauth
from .logsafety import scrub
from .record import domain_of, valid_endpoint
from .store import AppCredentials
from .transport import AnswerTooLargeError, AnswerTooSlowError, bounded
from .transport import session as transport_session

log = logging.getLogger(__name__)

# No project URL exists to name, so the agent is the name and the one version (b24_cleanup.__version__).
USER_AGENT = f"b24-cleanup/{__version__}"
# (connect timeout, total time limit of one refresh from connect to last byte).
DEFAULT_TIMEOUT = (3.05, 15.0)
# The only hosts a token URL may be derived from (design §5 step 3, §9).
TRUSTED_OAUTH_HOSTS = frozenset({"oauth.bitrix.info", "oauth.bitrix24.tech"})
UNTRUSTED_SERVER_ENDPOINT = "untrusted server_endpoint"
# An answer's `expires` / `expires_in` beyond this is not an expiry (a year: tokens live an hour).
_MAX_LIFETIME = 366 * 86400


def derive_token_url(server_endpoint: str, override: str | None = None) -> str:
    """The token URL for a record: `override` (B24_OAUTH_URL), else derived from a trusted
    `server_endpoint` (`https://oauth.bitrix.info/rest/` → `https://oauth.bitrix.info/oauth/token/`).

    Raises UntrustedTargetError ("untrusted server_endpoint") for any other `server_endpoint`:
    the job ends `incomplete`, and nothing — no client secret, no refresh token — was sent.
    """
    url = trusted_token_url(server_endpoint, override)
    if url is None:
        raise UntrustedTargetError("UNTRUSTED_SERVER_ENDPOINT", UNTRUSTED_SERVER_ENDPOINT, method="oauth")
    return url


def trusted_token_url(server_endpoint: str, override: str | None) -> str | None:
    """The token URL that may be trusted for a `server_endpoint`, or None (design §5 step 3, §9).

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
        self.session = session or transport_session()
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
        connect, limit = self.timeout
        try:
            response = bounded(
                self.session,
                "GET",
                token_url,
                limit=limit,
                connect_timeout=connect,
                params=params,
                headers={"Accept": "application/json", "User-Agent": USER_AGENT},
            )
        except AnswerTooSlowError:
            raise TransientError("OAUTH_TOO_SLOW", f"no whole answer within {limit:g} s", method="oauth") from None
        except AnswerTooLargeError:
            raise TransientError(
                "OAUTH_ANSWER_TOO_LARGE", "the answer is over the size limit", method="oauth"
            ) from None
        except requests.RequestException as exc:
            # `from None`: the chained exception's text holds the URL with the secret in it.
            raise TransientError("OAUTH_UNREACHABLE", type(exc).__name__, method="oauth") from None
        status = response.status
        body = response.json()
        if not isinstance(body, dict):
            kind = TransientError if status >= 500 or status == 200 else PermanentError
            raise kind("OAUTH_BAD_ANSWER", "the OAuth server did not answer JSON", status=status, method="oauth")
        # Some OAuth errors come with HTTP 200 (`wrong_client`, design §10.7).
        if body.get("error"):
            code = scrub(body["error"], 100)
            raise classify_oauth(code, status)(
                code, scrub(body.get("error_description")), status=status, method="oauth"
            )
        if status != 200:
            raise classify_oauth("", status)("OAUTH_HTTP_ERROR", "", status=status, method="oauth")
        if not isinstance(body.get("access_token"), str) or not isinstance(body.get("refresh_token"), str):
            raise TransientError("OAUTH_BAD_ANSWER", "the answer holds no token pair", method="oauth")
        body = dict(body)
        body["expires"] = _absolute_expiry(body, self.clock())
        return body


def _absolute_expiry(answer: dict[str, Any], now: float) -> int:
    """The answer's expiry in unix seconds; an absurd one (`Infinity`, past the year) is not believed.

    Called after the refresh token was spent: it must not raise, whatever the answer holds.
    """
    expires = answer.get("expires")
    if isinstance(expires, int | float) and not isinstance(expires, bool) and 0 < expires < now + _MAX_LIFETIME:
        return int(expires)
    lifetime = answer.get("expires_in")
    if isinstance(lifetime, int | float) and not isinstance(lifetime, bool) and 0 < lifetime <= _MAX_LIFETIME:
        return int(now + lifetime)
    return int(now + 3600)


def pair_of(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a refresh owns (design §5 step 3): the pair, its expiry, and what the answer says of
    `client_endpoint` (and so `domain`). Nothing else: `scope` and every other key stay as stored."""
    pair: dict[str, Any] = {
        "access_token": answer["access_token"],
        "refresh_token": answer["refresh_token"],
        "expires": answer["expires"],
    }
    endpoint = answer.get("client_endpoint")
    # Only a plain http(s) address is one (a broken one keeps the record's): the refresh token is
    # spent by now, so nothing the answer holds may raise or be stored as an address.
    if valid_endpoint(endpoint):
        assert isinstance(endpoint, str)
        # The refresh answer tracks portal renames (design §10.7, §10.8).
        pair["client_endpoint"] = endpoint
        domain = domain_of(endpoint)
        if domain:
            pair["domain"] = domain
    return pair
