"""One token chain per portal (design §5 step 3, §9).

Refresh tokens are single-use and the chain must not branch, so the SSM record is the only store
and every holder follows one protocol: refresh only when due (or after `expired_token`), write
the new pair to the record before using it, and on a refused refresh re-read the record once —
another writer (the app's backend, a concurrent job) may already have moved the chain on.

:class:`TokenKeeper` is that protocol; the worker, the CLI and the app-side API all use it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .errors import InvalidGrantError, PermanentError, RevokedError, TransientError
from .oauth import OAuthClient, apply_refresh, derive_token_url
from .record import PortalRecord
from .store import PortalStore

log = logging.getLogger(__name__)

# A concurrent writer may have refreshed at the OAuth server and not yet written SSM: give its
# PutParameter this long before the one re-read decides.
DEFAULT_SETTLE_SECONDS = 1.0
_PUT_ATTEMPTS = 4


class ChainState:
    """What one process knows about its portals' token chains beyond SSM (one per process: see runtime).

    Threads of one process take turns refreshing a portal (`lock`); across processes the re-read
    does it. `latest` is the newest record this process wrote per portal: a thread that waited for
    the lock adopts it instead of spending an already-spent refresh token. `pending` holds pairs
    rotated at the OAuth server whose write to SSM failed, the only copy of the chain: the next
    refresh of that portal in this process (the job's retry) stores it instead of spending the
    dead token.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self.latest: dict[str, PortalRecord] = {}
        self.pending: dict[str, PortalRecord] = {}

    def lock(self, member_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(member_id, threading.Lock())

    def reset(self) -> None:
        """Forget everything (tests and the demo; a pending pair is dropped with the rest)."""
        with self._guard:
            self._locks.clear()
            self.latest.clear()
            self.pending.clear()


class TokenKeeper:
    """Holds one portal's record and hands out a working access token."""

    def __init__(
        self,
        store: PortalStore,
        member_id: str,
        record: PortalRecord,
        oauth: Callable[[], OAuthClient],
        *,
        chains: ChainState,
        oauth_url: str | None = None,
        settle_seconds: float = DEFAULT_SETTLE_SECONDS,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.member_id = member_id
        self.record = record
        self._oauth = oauth
        self.chains = chains
        self._oauth_url = oauth_url
        self.settle_seconds = settle_seconds
        self.clock = clock
        self.sleep = sleep
        self.refreshed = 0  # OAuth calls made (design §6 TokensRefreshed)
        self.fresh = False  # the current access token came from a refresh made just now

    @property
    def token_url(self) -> str:
        return self._oauth_url or derive_token_url(self.record.server_endpoint)

    def access_token(self) -> str:
        """A token that is not due; refreshes (and persists) first when it is."""
        if self.record.refresh_due(self.clock()) or self.member_id in self.chains.pending:
            self.refresh()
        return self.record.access_token

    def refresh(self, *, stale_token: str | None = None) -> None:
        """Move the chain on by one refresh, persisted before the new token is used.

        `stale_token` is the access token the portal just refused: if another thread of this
        process has replaced it meanwhile, that newer pair is adopted instead of refreshing.
        """
        with self.chains.lock(self.member_id):
            pending = self.chains.pending.get(self.member_id)
            if pending is not None:
                log.warning("portal %s: storing a rotated token pair an earlier write failed to store", self.member_id)
                self.record = pending.copy()
                self._store_rotated()
                if not self.record.refresh_due(self.clock()):
                    return
            latest = self.chains.latest.get(self.member_id)
            if (
                latest is not None
                and latest.refresh_token != self.record.refresh_token
                and latest.expires >= self.record.expires
                and (stale_token is None or latest.access_token != stale_token)
                and not latest.refresh_due(self.clock())
            ):
                self.record = latest.copy()
                self.fresh = True
                return
            used = self.record.refresh_token
            try:
                answer = self._call_oauth(used)
            except InvalidGrantError as refused:
                adopted_or_answer = self._after_refused(used, refused)
                if adopted_or_answer is None:  # another writer's pair was adopted
                    return
                answer = adopted_or_answer
            apply_refresh(self.record.data, answer)
            self.chains.pending[self.member_id] = self.record.copy()
            self._store_rotated()

    def _store_rotated(self) -> None:
        """Persist a just-rotated pair; only once it is stored may it be used (design §5 step 3)."""
        persist(self.store, self.member_id, self.record, sleep=self.sleep)
        self.chains.pending.pop(self.member_id, None)
        self.chains.latest[self.member_id] = self.record.copy()
        self.fresh = True

    def _call_oauth(self, refresh_token: str) -> dict:
        self.refreshed += 1
        return self._oauth().refresh(self.token_url, refresh_token)

    def _after_refused(self, used: str, refused: InvalidGrantError) -> dict | None:
        """The OAuth server refused `used`: re-read the record once (design §5 step 3)."""
        self.sleep(self.settle_seconds)
        current = self.store.get(self.member_id)
        if current is None:
            raise RevokedError(refused.code, "refused by the OAuth server; the record is gone", method="oauth")
        if not current.refresh_token or current.refresh_token == used:
            raise RevokedError(
                refused.code, "refused by the OAuth server after a re-read found no newer token", method="oauth"
            )
        log.info("portal %s: another writer refreshed the tokens; adopting its pair", self.member_id)
        self.record = current
        if not current.refresh_due(self.clock()):
            self.fresh = True
            return None
        try:
            return self._call_oauth(current.refresh_token)
        except InvalidGrantError as again:
            raise RevokedError(
                again.code, "refused by the OAuth server, also for the re-read token", method="oauth"
            ) from None


def persist(
    store: PortalStore,
    member_id: str,
    record: PortalRecord,
    *,
    secure: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Write a record that holds a just-rotated pair, retrying beyond botocore's own retries.

    The pair exists nowhere else (the used refresh token is spent): give SSM every chance.
    """
    for attempt in range(1, _PUT_ATTEMPTS + 1):
        try:
            store.put(member_id, record, secure=secure)
            return
        except TransientError:
            if attempt == _PUT_ATTEMPTS:
                log.error(
                    "portal %s: could not persist a refreshed token pair after %d attempts; the chain is at risk",
                    member_id,
                    attempt,
                )
                raise
            sleep(min(8.0, 0.5 * 2**attempt))


def check_usable(record: PortalRecord) -> None:
    """A record the client can work with names an endpoint and a refresh token."""
    if not record.client_endpoint.startswith(("http://", "https://")):
        raise PermanentError("RECORD_INVALID", "the portal record has no usable client_endpoint")
    if not record.refresh_token and not record.access_token:
        raise PermanentError("RECORD_INVALID", "the portal record holds no tokens")
