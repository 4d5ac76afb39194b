"""One token chain per portal (design §5 step 3, §9).

Refresh tokens are single-use and the chain must not branch, so the SSM record is the only store
and every holder follows one protocol: refresh only when due (or after `expired_token`), write
the new pair to the record before using it, and on a refused refresh re-read the record once —
another writer (the app's backend, a concurrent job) may already have moved the chain on.

:class:`TokenKeeper` is that protocol; the worker, the CLI and the app-side API all use it.
"""

from __future__ import annotations

import hmac
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import InvalidGrantError, PermanentError, RevokedError, TransientError
from .oauth import OAuthClient, derive_token_url, pair_of
from .record import PortalRecord
from .store import PortalStore

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# A concurrent writer may have refreshed at the OAuth server and not yet written SSM: give its
# PutParameter this long before the one re-read decides.
DEFAULT_SETTLE_SECONDS = 1.0
# design §5 step 3, the persist budget: a refresh is only started while the invocation has this
# long left. Once the OAuth server has rotated the pair, storing it comes before everything else
# and may use all the time left: the used refresh token is spent, the new pair exists nowhere else.
PERSIST_BUDGET_SECONDS = 60.0
# Stop starting a write attempt this close to the end: one attempt of the bounded write client
# (store.WRITE_BOTO_CONFIG, two tries of at most 3 s connect + 5 s read) must finish before it.
PERSIST_ATTEMPT_SECONDS = 17.0
_RETRY_BASE, _RETRY_CAP = 0.25, 4.0


@dataclass(frozen=True)
class Rotation:
    """A pair the OAuth server rotated, and the record it was rotated from (design §5 step 3).

    `pair` holds only the pair's own keys; it may be written only while the record still holds
    `application_token` and `from_refresh_token`: anything else means a reinstall, an update or
    another writer's pair, which this older pair must never revert.
    """

    pair: dict[str, Any]
    application_token: str
    from_refresh_token: str

    def __repr__(self) -> str:  # never a token
        return "Rotation(...)"

    @property
    def refresh_token(self) -> str:
        return str(self.pair["refresh_token"])


@dataclass(frozen=True)
class Latest:
    """The newest record this process stored for a portal, and the refresh token it was rotated from."""

    record: PortalRecord
    from_refresh_token: str


class ChainState:
    """What one process knows about its portals' token chains beyond SSM (one per process: see runtime).

    Threads of one process take turns refreshing a portal (`lock`); across processes the re-read
    does it. `latest` is the newest record this process stored per portal: a thread that read the
    record before that write, and waited for the lock, adopts it instead of spending an
    already-spent refresh token. `pending` holds pairs rotated at the OAuth server whose write
    failed, the only copy of the chain: the next refresh of that portal in this process (the job's
    retry) stores it, under the same condition as the first try, instead of spending the dead token.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self.latest: dict[str, Latest] = {}
        self.pending: dict[str, Rotation] = {}

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
        ends_at: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
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
        # time.monotonic() at which the invocation times out (None: no limit, e.g. the CLI)
        self.ends_at = ends_at
        self.monotonic = monotonic

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
                self._store_rotated(pending)
                if not self.record.refresh_due(self.clock()):
                    return
            latest = self.chains.latest.get(self.member_id)
            if (
                latest is not None
                # Only a record this process rotated *from the one the job holds* is newer: after
                # a reinstall or update (another application_token, another chain) it is not.
                and _same(latest.record.application_token, self.record.application_token)
                and _same(latest.from_refresh_token, self.record.refresh_token)
                and (stale_token is None or latest.record.access_token != stale_token)
                and not latest.record.refresh_due(self.clock())
            ):
                self.record = latest.record.copy()
                self.fresh = True
                return
            with self.store.write_slot():  # taken before the refresh token is spent, see write_slot
                self._check_budget()
                used = self.record.refresh_token
                try:
                    answer = self._call_oauth(used)
                except InvalidGrantError as refused:
                    adopted_or_answer = self._after_refused(used, refused)
                    if adopted_or_answer is None:  # another writer's pair was adopted
                        return
                    answer = adopted_or_answer
                    used = self.record.refresh_token  # the re-read record's, which was just spent
                rotation = Rotation(pair_of(answer), self.record.application_token, used)
                self.chains.pending[self.member_id] = rotation
                self._store_rotated(rotation)

    def _check_budget(self) -> None:
        """Start a refresh only while there is time to store its result (design §5 step 3)."""
        if self.ends_at is not None and self.ends_at - self.monotonic() < PERSIST_BUDGET_SECONDS:
            raise TransientError(
                "OUT_OF_TIME", "too little of the invocation left to store a refreshed pair", method="oauth"
            )

    def _store_rotated(self, rotation: Rotation) -> None:
        """Persist a rotated pair; only once it is stored may it be used (design §5 step 3).

        Raises TransientError when it could not be stored in time (the pair stays pending in
        this process for the retry), PermanentError when the record is gone.
        """
        until = self.ends_at if self.ends_at is not None else self.monotonic() + PERSIST_BUDGET_SECONDS

        def persist() -> tuple[PortalRecord | None, bool]:
            return persist_rotation(
                self.store, self.member_id, rotation, until=until, sleep=self.sleep, monotonic=self.monotonic
            )

        current, stored = persist()
        if current is not None and not stored and _same(current.application_token, rotation.application_token):
            # The same installation with another pair. Nobody else can have rotated the token this
            # pair came from (single-use), so it is an update's pair or an older one put back for a
            # moment: on SSM a write that overwrote another writes it again right after
            # (store.PortalStore._mend). Look once more before dropping the only copy of this pair.
            self.sleep(self.settle_seconds)
            current, stored = persist()
        self.chains.pending.pop(self.member_id, None)
        if current is None:
            raise PermanentError("RECORD_GONE", "the record was deleted while its tokens were refreshed")
        self.record = current
        if stored:
            self.chains.latest[self.member_id] = Latest(current.copy(), rotation.from_refresh_token)
            self.fresh = True
            return
        # The record moved on meanwhile; the older pair is dropped, never written (design §5 step 3).
        self.fresh = False
        if _same(current.application_token, rotation.application_token):
            log.warning(
                "portal %s: another writer stored a token pair meanwhile; this refresh's pair is dropped",
                self.member_id,
            )
        else:
            log.warning(
                "portal %s: the record now holds another installation (reinstalled or updated); "
                "this refresh's pair is dropped, the new installation kept",
                self.member_id,
            )

    def _call_oauth(self, refresh_token: str) -> dict:
        url = self.token_url  # an untrusted server_endpoint raises here: no OAuth call, none counted
        self.refreshed += 1
        return self._oauth().refresh(url, refresh_token)

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


def persist_rotation(
    store: PortalStore,
    member_id: str,
    rotation: Rotation,
    *,
    until: float,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> tuple[PortalRecord | None, bool]:
    """Write `rotation` as a fresh-read change of the pair's keys, retrying until `until` (monotonic).

    Returns the record as it is now and whether it holds this rotation. The write happens only
    while the record still holds the `application_token` and refresh token the rotation started
    from; a record already holding the rotated pair counts as stored (a write whose reply was
    lost). Raises TransientError when `until` comes first.
    """
    stored = False

    def change(current: PortalRecord) -> bool:
        nonlocal stored
        if _same(current.refresh_token, rotation.refresh_token):
            stored = True  # an earlier attempt landed although its answer was lost
            return False
        if not _same(current.application_token, rotation.application_token) or not _same(
            current.refresh_token, rotation.from_refresh_token
        ):
            stored = False
            return False
        current.data.update(rotation.pair)
        stored = True
        return True

    current = _retrying(lambda: store.modify(member_id, change), member_id, until, sleep, monotonic)
    return current, stored


def _retrying(
    write: Callable[[], _T],
    member_id: str,
    until: float,
    sleep: Callable[[float], None],
    monotonic: Callable[[], float],
) -> _T:
    """Run `write` until it succeeds, backing off with jitter, while an attempt still fits before `until`."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return write()
        except TransientError:
            left = until - monotonic()
            pause = random.uniform(0, min(_RETRY_CAP, _RETRY_BASE * 2 ** min(attempt, 8)))
            if left - pause < PERSIST_ATTEMPT_SECONDS:
                log.error(
                    "portal %s: could not persist a refreshed token pair in %d attempts before the invocation "
                    "ends; it is kept in this process for the retry, the chain is at risk",
                    member_id,
                    attempt,
                )
                raise
            sleep(pause)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def check_usable(record: PortalRecord) -> None:
    """A record the client can work with names an endpoint and a refresh token."""
    if not record.client_endpoint.startswith(("http://", "https://")):
        raise PermanentError("RECORD_INVALID", "the portal record has no usable client_endpoint")
    if not record.refresh_token and not record.access_token:
        raise PermanentError("RECORD_INVALID", "the portal record holds no tokens")
