"""Token access for the app's own backend (design §9): the same chain the worker uses.

    from b24_cleanup.access import TokenAccess

    tokens = TokenAccess.from_env()            # B24_SSM_PREFIX, B24_STORE/B24_TABLE, optional B24_OAUTH_URL
    portal = tokens.get(member_id)             # refreshes (and persists first) when due
    answer = call(portal.client_endpoint, portal.access_token)
    if answer_says_expired_token:
        portal = tokens.after_expired(member_id, portal.access_token)

No Lambda needed. Every refresh goes through :class:`~b24_cleanup.tokens.TokenKeeper`, so the
record in SSM stays the one store of the portal's single-use refresh chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from . import runtime
from .config import Settings
from .errors import PermanentError, PortalNotFoundError
from .oauth import OAuthClient
from .store import AppCredentials, PortalStore
from .tokens import DEFAULT_SETTLE_SECONDS, ChainState, TokenKeeper, check_usable


@dataclass(frozen=True)
class PortalAccess:
    member_id: str
    client_endpoint: str
    access_token: str
    expires: int

    def __repr__(self) -> str:  # never the token
        return f"PortalAccess(member_id={self.member_id!r}, client_endpoint={self.client_endpoint!r})"


class TokenAccess:
    """Hands out working access tokens for portals, refreshing under the one-chain protocol."""

    def __init__(
        self,
        store: PortalStore,
        *,
        oauth_url: str | None = None,
        session: requests.Session | None = None,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
        chains: ChainState | None = None,
    ) -> None:
        self.store = store
        self.oauth_url = oauth_url
        self.session = session or requests.Session()
        self.settle_seconds = settle_seconds
        self._credentials: AppCredentials | None = None
        # Shared with every engine of the process: a refresh one of them made is seen by the others.
        self.chains = chains if chains is not None else runtime.chains()

    @classmethod
    def from_env(cls) -> TokenAccess:
        """The store the service uses (B24_STORE: SSM or the DynamoDB table), from the same settings.

        Raises ConfigError when the environment does not name a usable store (design §4).
        """
        settings = Settings.from_env()
        return cls(settings.store(), oauth_url=settings.oauth_url)

    def _oauth(self) -> OAuthClient:
        if self._credentials is None:
            self._credentials = self.store.app_credentials()
        return OAuthClient(self._credentials, session=self.session)

    def _keeper(self, member_id: str) -> TokenKeeper:
        record = self.store.get(member_id)
        if record is None:
            raise PortalNotFoundError(f"no record for portal {member_id}")
        check_usable(record)
        return TokenKeeper(
            self.store,
            member_id,
            record,
            self._oauth,
            chains=self.chains,
            oauth_url=self.oauth_url,
            settle_seconds=self.settle_seconds,
        )

    @staticmethod
    def _access(keeper: TokenKeeper) -> PortalAccess:
        record = keeper.record
        return PortalAccess(
            record.member_id or keeper.member_id, record.client_endpoint, record.access_token, record.expires
        )

    def get(self, member_id: str) -> PortalAccess:
        """A valid access token and the portal's endpoint; refreshed (and stored) first when due.

        Raises:
            PortalNotFoundError: no record for that member id (not registered, or removed).
            PermanentError: the record is unusable (no endpoint or tokens), or the OAuth server
                refused the refresh for a reason a retry cannot mend.
            RevokedError: the OAuth server refused the refresh token, also after the one re-read:
                the app is gone from the portal.
            TransientError: SSM or the OAuth server failed for now; retry later.
            ConfigError: the app's credentials or the record's OAuth address are missing or broken.
        """
        keeper = self._keeper(member_id)
        keeper.access_token()
        return self._access(keeper)

    def after_expired(self, member_id: str, refused_token: str) -> PortalAccess:
        """The portal answered `expired_token` for `refused_token`: hand out a working one.

        If another writer already replaced it in the record, that token is returned without an
        OAuth call; otherwise the chain is moved on by one refresh (persisted before returning).

        Raises:
            PortalNotFoundError: no record for that member id (not registered, or removed).
            PermanentError: the record is unusable, or the refreshed record holds no access token.
            RevokedError: the OAuth server refused the refresh token, also after the one re-read:
                the app is gone from the portal.
            TransientError: SSM or the OAuth server failed for now; retry later.
            ConfigError: the app's credentials or the record's OAuth address are missing or broken.
        """
        keeper = self._keeper(member_id)
        if keeper.record.access_token != refused_token and not keeper.record.refresh_due():
            return self._access(keeper)
        keeper.refresh(stale_token=refused_token)
        if not keeper.record.access_token:
            raise PermanentError("RECORD_INVALID", "the refreshed record holds no access token")
        return self._access(keeper)
