"""The cleanup engine: one job for one portal, design §5 steps 1-8.

Request budget per job: one `event.get`, ⌈c/50⌉ `batch` calls for c batched unbind commands, one
single call per connector-keyed offline row, and one OAuth call when a refresh is due. Transient
trouble raises :class:`JobFailedError` so that the worker fails the SQS record and the retry plans
afresh; nothing that did not finish is reported as done.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

from . import runtime, transport
from .client import DEFAULT_TIMEOUT as REST_TIMEOUT
from .client import PortalClient
from .commands import Command, CommandResult
from .config import DEFAULT_GRACE_DAYS, DEFAULT_ORPHAN_GRACE_DAYS, Settings
from .errors import ConfigError, InvalidDeclaredSetError, JobFailedError, PermanentError, RevokedError, TransientError
from .jobs import Action, Job, JobResult, Outcome
from .oauth import DEFAULT_TIMEOUT as OAUTH_TIMEOUT
from .oauth import OAuthClient
from .orphans import OrphanRecords, hold_orphans
from .pacing import DEFAULT_BURST, DEFAULT_RATE, Backoff, BucketRegistry, RetryPolicy
from .planner import DeclaredSet, HandlerRow, Listing, Plan, plan, unbind_commands
from .record import PortalRecord
from .store import AppCredentials, PortalStore
from .tokens import DEFAULT_SETTLE_SECONDS, ChainState, TokenKeeper, check_usable

log = logging.getLogger(__name__)

DAY = 86400
CREDENTIALS_TTL = 300.0  # re-read the app's credentials at most every five minutes
# The declared set is checked by every sweep job, but read once per worker invocation (a batch of
# up to 10 jobs; see `new_invocation`) and at most this long: at 10k portals a read per job would
# double the SSM reads, which share ~40/s per account with every other reader.
DECLARED_TTL = 60.0
# An uninstall's only confirmation is the portal's refusal; this code alone is a lapsed
# subscription, not a removal (design §5 step 6).
PAYMENT_REQUIRED = "PAYMENT_REQUIRED"
UNCONFIRMED_REASON = (
    "unconfirmed: the portal still answers this app's tokens, so the ONAPPUNINSTALL was forged with a "
    "leaked application_token, replayed or early; nothing unbound, the record kept"
)


@dataclass
class EngineOptions:
    """Knobs that tests and benchmarks turn; production uses the defaults."""

    backoff: Backoff = field(default_factory=Backoff)
    rate: float = DEFAULT_RATE
    burst: int = DEFAULT_BURST
    settle_seconds: float = DEFAULT_SETTLE_SECONDS
    timeout: tuple[float, float] = REST_TIMEOUT  # portal REST requests
    oauth_timeout: tuple[float, float] = OAUTH_TIMEOUT  # the OAuth server's own, not the portal's
    max_time_limit_wait: float = RetryPolicy.max_time_limit_wait  # the policy's own default


class Engine:
    """Runs jobs against one SSM store. Thread-safe: jobs of different portals run concurrently."""

    def __init__(
        self,
        store: PortalStore,
        *,
        oauth_url: str | None = None,
        dry_run: bool = False,
        grace_days: int = DEFAULT_GRACE_DAYS,
        orphan_grace_days: int = DEFAULT_ORPHAN_GRACE_DAYS,
        options: EngineOptions | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
        chains: ChainState | None = None,
    ) -> None:
        self.store = store
        self.oauth_url = oauth_url
        self.dry_run = dry_run
        self.grace_days = grace_days
        self.options = options or EngineOptions()
        self.session = session or _pooled_session()
        self.clock = clock
        # The process's one chain state unless told otherwise: every engine and TokenAccess of a
        # process must see each other's refreshes (two of them in one process are one container).
        self.chains = chains if chains is not None else runtime.chains()
        self.buckets = BucketRegistry(self.options.rate, self.options.burst)
        self._credentials: tuple[float, AppCredentials] | None = None
        self._cache_lock = threading.Lock()
        self._declared: tuple[float, str | None] | None = None
        # Held orphans (design §3): the declared set's history and the orphan ledger, read like the set.
        self.orphan_records = OrphanRecords(store, orphan_grace_days, clock=clock)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: object) -> Engine:
        return cls(
            settings.store(),
            oauth_url=settings.oauth_url,
            dry_run=settings.dry_run,
            grace_days=settings.revoked_grace_days,
            orphan_grace_days=settings.orphan_grace_days,
            **kwargs,  # type: ignore[arg-type]
        )

    # -- collaborators -----------------------------------------------------------------
    def credentials(self) -> AppCredentials:
        """The app's credentials, read only when a refresh needs them, cached briefly."""
        with self._cache_lock:
            now = time.monotonic()
            if self._credentials is None or now - self._credentials[0] > CREDENTIALS_TTL:
                self._credentials = (now, self.store.app_credentials())
            return self._credentials[1]

    def new_invocation(self) -> None:
        """A new worker invocation: the next sweep job reads the declared set afresh."""
        with self._cache_lock:
            self._declared = None
        self.orphan_records.new_invocation()

    def declared_set_text(self) -> str | None:
        """The declared set's raw text, read once per invocation and at most DECLARED_TTL old."""
        with self._cache_lock:
            now = time.monotonic()
            if self._declared is None or now - self._declared[0] > DECLARED_TTL:
                self._declared = (now, self.store.declared_set_text())
            return self._declared[1]

    def oauth_client(self) -> OAuthClient:
        return OAuthClient(self.credentials(), session=self.session, timeout=self.options.oauth_timeout)

    def keeper(self, member_id: str, record: PortalRecord, ends_at: float | None = None) -> TokenKeeper:
        return TokenKeeper(
            self.store,
            member_id,
            record,
            self.oauth_client,
            chains=self.chains,
            oauth_url=self.oauth_url,
            settle_seconds=self.options.settle_seconds,
            clock=self.clock,
            ends_at=ends_at,
        )

    def client(self, keeper: TokenKeeper, deadline: float | None = None) -> PortalClient:
        return PortalClient(
            keeper,
            session=self.session,
            bucket=self.buckets.get(keeper.member_id),
            retry=RetryPolicy(self.options.backoff, self.options.max_time_limit_wait),
            timeout=self.options.timeout,
            deadline=deadline,
        )

    # -- jobs --------------------------------------------------------------------------
    def run(self, job: Job, *, deadline: float | None = None, ends_at: float | None = None) -> JobResult:
        """Run one job to its outcome. Raises JobFailedError for `failed` (the queue retries it).

        `deadline` (a time.monotonic() value) stops the job from starting portal requests past
        it: the job then fails and is retried instead of being cut off by a Lambda timeout.
        `ends_at` (time.monotonic()) is when the invocation times out: a token refresh starts only
        while there is time to store its result, and storing it may use all of it (design §5 step 3).
        """
        result = JobResult(job.action, job.member_id, dry_run=self.dry_run)
        try:
            self._run(job, result, deadline, ends_at)
        except (TransientError, ConfigError) as exc:
            result.outcome = Outcome.FAILED
            result.reason = str(exc)
            _log_result(result)
            raise JobFailedError(result) from None  # the reason says it; no chained traceback
        _log_result(result)
        return result

    def _run(self, job: Job, result: JobResult, deadline: float | None, ends_at: float | None) -> None:
        declared: DeclaredSet | None = None
        if job.action is Action.SWEEP:
            try:
                declared = DeclaredSet.parse(self.declared_set_text())
            except InvalidDeclaredSetError as exc:
                # A retry cannot mend the config: skip, touch nothing, say so loudly.
                result.outcome, result.declared_set_invalid = Outcome.SKIPPED, True
                result.reason = f"declared handler set is invalid: {exc}"
                log.error("sweep of %s skipped: %s", job.member_id, result.reason)
                return

        record = self.store.get(job.member_id)
        if record is None:
            result.outcome, result.reason = Outcome.SKIPPED, "no stored record"
            return
        result.domain = record.domain
        if job.action is Action.UNINSTALL and not _same_token(record, job.application_token):
            result.outcome = Outcome.SKIPPED
            result.reason = "the portal was reinstalled since (application_token differs)"
            return
        started_token = record.application_token

        keeper = self.keeper(job.member_id, record, ends_at)
        client = self.client(keeper, deadline)
        try:
            check_usable(record)
            self._clean(job, declared, client, result)
        except RevokedError as exc:
            self._revoked(job, keeper.record, started_token, exc, result)
        except PermanentError as exc:
            result.outcome, result.reason = Outcome.INCOMPLETE, str(exc)
        finally:
            self._remember_move(job.member_id, client.moved_to)
            result.rest_calls = client.stats.rest_calls
            result.rate_limited = client.stats.rate_limited
            result.refreshed = keeper.refreshed
            # Also when the job goes on to fail: whatever happens after `event.get` answered, the
            # portal was reached, so it is not revoked (design §5 step 8). A stale mark left on a
            # paying portal would let one later PAYMENT_REQUIRED delete it with no grace at all.
            if result.reached and result.outcome is not Outcome.REVOKED and keeper.record.revoked_at is not None:
                self._unmark(job.member_id)

    def _unmark(self, member_id: str) -> None:
        """Remove `revoked_at` on a fresh read (a pair the app's backend stored meanwhile is kept)."""
        if not self.dry_run:
            self.store.modify(member_id, lambda current: current.data.pop("revoked_at", None) is not None)

    def _clean(self, job: Job, declared: DeclaredSet | None, client: PortalClient, result: JobResult) -> None:
        """design §5 steps 4-7: plan from `event.get`, hold what must wait, unbind the rest, conclude."""
        if job.action is Action.UNINSTALL:
            self._unconfirmed(job, client, result)
            return
        orphans = self._hold(job, declared, self._plan(declared, client, result), result)
        commands = unbind_commands(orphans)
        if self.dry_run:
            result.unbound = len(result.orphans)  # what *would* be unbound: every orphan row
            if commands:
                log.info("dry run: %d handler rows of %s would be unbound", result.unbound, job.member_id)
        elif commands:
            self._unbind(job.member_id, commands, client, result)
        _conclude(result, had_orphans=bool(commands))

    @staticmethod
    def _unconfirmed(job: Job, client: PortalClient, result: JobResult) -> None:
        """Step 6: an uninstall never unbinds, and `event.get` answering at all proves the app installed.

        The event itself proves nothing: Bitrix24 posts the same `member_id` and
        `application_token` with every event to every URL the app ever bound, stale hosts
        included. So only the portal's refusal (RevokedError, in `_revoked`) confirms an
        uninstall; a portal that still answers keeps everything, and the sweep goes on as before.
        """
        client.call("event.get")
        result.reached = True
        result.outcome, result.unconfirmed = Outcome.SKIPPED, True
        result.reason = UNCONFIRMED_REASON
        log.warning("uninstall of %s unconfirmed: %s", job.member_id, UNCONFIRMED_REASON)

    @staticmethod
    def _plan(declared: DeclaredSet | None, client: PortalClient, result: JobResult) -> Plan:
        """Step 4: read `event.get` and plan; unreadable rows count as permanent unbind failures."""
        answer = client.call("event.get")
        result.reached = True
        listing = Listing.parse(answer)
        planned = plan(listing.rows, declared)
        result.found = listing.found
        result.kept = len(planned.declared)
        result.missing = len(planned.missing)
        result.declared_rows = [row.as_dict() for row in planned.declared]
        result.orphans = [row.as_dict() for row in planned.orphans]
        result.missing_handlers = [entry.as_dict() for entry in planned.missing]
        result.failures.extend(_unreadable(item) for item in listing.unreadable)
        result.unbind_failed += len(listing.unreadable)
        return planned

    def _hold(self, job: Job, declared: DeclaredSet | None, planned: Plan, result: JobResult) -> tuple[HandlerRow, ...]:
        """Step 4's held orphans (design §3): the orphans to unbind now; the held ones go to `result.held`.

        Sweeps only: an uninstall job unbinds nothing, so the rules have nothing to hold there. A
        dry run (and `plan`) records no first-seen keys: it reports what tonight's sweep would hold.
        """
        if declared is None or not planned.orphans:
            return planned.orphans
        held = hold_orphans(self.orphan_records, declared, planned.orphans, job.member_id, record=not self.dry_run)
        result.held = held.held_pairs()
        result.orphans = [row.as_dict() for row in held.release]
        return held.release

    @staticmethod
    def _unbind(member_id: str, commands: list[Command], client: PortalClient, result: JobResult) -> None:
        """Step 5: run the commands and tally the answers; revoked or unfinished work raises."""
        tally = Tally.of(commands, client.batch(commands))
        for failure in tally.failures:
            log.warning("unbind failed on %s: %s", member_id, failure)
        result.unbound += tally.unbound
        result.failures.extend(tally.failures)
        result.unbind_failed += len(tally.failures)
        if tally.revoked is not None:
            raise RevokedError(tally.revoked.code, tally.revoked.description, method=tally.revoked.method)
        if tally.unfinished:
            raise TransientError("UNBIND_FAILED", f"{result.unbind_failed} unbind command(s) failed transiently")

    def _remember_move(self, member_id: str, client_endpoint: str | None) -> None:
        """Store a renamed portal's new address (design §10.8), except in a dry run.

        Only the address changes, on a fresh read: a pair another writer stored meanwhile stays.
        """
        if client_endpoint is not None and not self.dry_run:
            self.store.modify(member_id, lambda current: _moved(current, client_endpoint))

    def _revoked(
        self, job: Job, record: PortalRecord, started_token: str, exc: RevokedError, result: JobResult
    ) -> None:
        """The app is gone from the portal. The evidence goes to the log (design §9)."""
        result.outcome = Outcome.REVOKED
        source = "the OAuth server" if exc.method == "oauth" else "the portal"
        result.reason = f"revoked: {exc.code} from {source}" + (f" ({exc.description})" if exc.description else "")
        if job.action is Action.UNINSTALL and exc.code.upper() == PAYMENT_REQUIRED:
            # A lapsed subscription is not a removal: mark it as a sweep would, the grace decides.
            result.reason += "; PAYMENT_REQUIRED alone does not confirm an uninstall, the grace period decides"
        if self.dry_run:
            return
        if job.action is Action.UNINSTALL and exc.code.upper() != PAYMENT_REQUIRED:
            self._forget(job.member_id, started_token, record, result)  # confirmed (design §5 step 6)
            return
        now = int(self.clock())
        revoked_at = record.revoked_at
        if revoked_at is None:
            self.store.modify(job.member_id, lambda current: _mark_revoked(current, record, started_token, now))
        elif now - revoked_at >= self.grace_days * DAY:
            self._forget(job.member_id, started_token, record, result)

    def _forget(self, member_id: str, application_token: str, seen: PortalRecord, result: JobResult) -> None:
        """Delete the record, but only the one this job's evidence is about (design §5 steps 6, 8).

        A new `application_token` is a newer installation; a new refresh token means someone
        moved the chain on since the job saw it refused, so the portal is in use: keep either.
        """
        if self.dry_run:
            return
        result.record_deleted = self.store.delete_if(
            member_id, lambda current: _same_token(current, application_token) and _same_pair(current, seen)
        )
        if not result.record_deleted:
            log.info("record of %s kept: it changed (reinstalled or refreshed) or is already gone", member_id)


@dataclass
class Tally:
    """The answers to one job's unbind commands, counted (design §5 step 5).

    `unfinished` is true when something is left for the retry (a transient failure, or a command
    the client did not try after one); `revoked` keeps the first app-gone answer, the evidence.
    """

    unbound: int = 0  # rows removed: the sum of the commands' `count`
    failures: list[dict[str, Any]] = field(default_factory=list)
    unfinished: bool = False
    revoked: RevokedError | None = None

    @classmethod
    def of(cls, commands: list[Command], answers: Mapping[str, CommandResult]) -> Tally:
        tally = cls()
        for command in commands:
            tally.add(command, answers[command.key])
        return tally

    def add(self, command: Command, answer: CommandResult) -> None:
        if answer.ok:
            self.unbound += _count(answer.value)
        elif not answer.attempted:
            self.unfinished = True
        elif isinstance(answer.error, RevokedError):
            self.revoked = self.revoked or answer.error
        else:
            assert answer.error is not None
            kind = "transient" if isinstance(answer.error, TransientError) else "permanent"
            self.unfinished = self.unfinished or kind == "transient"
            params = command.params
            self.failures.append(
                {
                    "event": params.get("event"),
                    "handler": params.get("handler"),
                    "error": answer.error.code,
                    "kind": kind,
                }
            )


def _count(value: object) -> int:
    """The rows one `event.unbind` removed, as its answer says (a missing count removed none)."""
    count = value.get("count") if isinstance(value, dict) else None
    return int(count) if isinstance(count, int | float) else 0


def _unreadable(item: object) -> dict[str, Any]:
    """The failure report of an `event.get` item that is not a row: it cannot be unbound, so it is left."""
    return {
        "event": item.get("event") if isinstance(item, dict) else None,
        "error": "UNREADABLE_ROW",
        "kind": "permanent",
    }


def _conclude(result: JobResult, *, had_orphans: bool) -> None:
    """Step 7: permanent failures leave the portal incomplete; else cleaned, or clean when it had no orphans."""
    if result.unbind_failed:
        result.outcome = Outcome.INCOMPLETE
        result.reason = f"{result.unbind_failed} handler(s) could not be unbound (permanent errors)"
    else:
        result.outcome = Outcome.CLEANED if had_orphans else Outcome.CLEAN


def _mark_revoked(current: PortalRecord, seen: PortalRecord, started_token: str, now: int) -> bool:
    """Mark `current` revoked, unless it changed since the job saw it fail.

    A new application_token is a reinstall, a new refresh token a chain someone else moved on:
    either way this job's evidence is about a record that no longer exists.
    """
    if current.revoked_at is not None or not _same_token(current, started_token):
        return False
    if current.refresh_token != seen.refresh_token:
        return False
    current.data["revoked_at"] = now
    return True


def _moved(record: PortalRecord, client_endpoint: str) -> bool:
    if record.client_endpoint == client_endpoint:
        return False
    record.set_client_endpoint(client_endpoint)
    return True


def _same_pair(record: PortalRecord, seen: PortalRecord) -> bool:
    return hmac.compare_digest(record.refresh_token.encode(), seen.refresh_token.encode())


def _same_token(record: PortalRecord, token: str | None) -> bool:
    return hmac.compare_digest(record.application_token.encode(), (token or "").encode())


def _log_result(result: JobResult) -> None:
    summary = result.summary()
    if result.outcome is Outcome.REVOKED:
        log.warning("portal %s revoked; evidence: %s", result.member_id, result.reason, extra={"job": summary})
    else:
        log.info(
            "%s job for %s: %s", result.action.value, result.member_id, result.outcome.value, extra={"job": summary}
        )


def _pooled_session() -> requests.Session:
    """One session for all portals of an invocation: connection reuse, enough pool for threads,
    every request bounded in total time and answer size (transport.py)."""
    return transport.session(pool_size=32)
