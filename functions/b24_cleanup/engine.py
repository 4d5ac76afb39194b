"""The cleanup engine: one job for one portal, SPEC §5 steps 1-8.

Request budget per job: one `event.get`, ⌈c/50⌉ `batch` calls for c unbind commands, and one
OAuth call when a refresh is due. Transient trouble raises :class:`JobFailed` so that the worker
fails the SQS record and the retry plans afresh; nothing that did not finish is reported as done.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests
from requests.adapters import HTTPAdapter

from .client import Command, PortalClient
from .config import Settings
from .errors import B24Error, ConfigError, InvalidDeclaredSet, PermanentError, RevokedError, TransientError
from .jobs import Action, Job, JobFailed, JobResult, Outcome
from .oauth import OAuthClient
from .pacing import Backoff, BucketRegistry
from .planner import UNBIND_METHOD, DeclaredSet, HandlerRow, Plan, classify, plan_uninstall, unbind_commands
from .record import PortalRecord
from .store import AppCredentials, PortalStore
from .tokens import DEFAULT_SETTLE_SECONDS, TokenKeeper, check_usable

log = logging.getLogger(__name__)

DAY = 86400
CREDENTIALS_TTL = 300.0  # re-read the app's credentials at most every five minutes
# The declared set is checked by every sweep job, but read once per worker invocation (a batch of
# up to 10 jobs; see `new_invocation`) and at most this long: at 10k portals a read per job would
# double the SSM reads, which share ~40/s per account with every other reader.
DECLARED_TTL = 60.0


@dataclass
class EngineOptions:
    """Knobs that tests and benchmarks turn; production uses the defaults."""

    backoff: Backoff = field(default_factory=Backoff)
    rate: float = 2.0
    burst: int = 50
    settle_seconds: float = DEFAULT_SETTLE_SECONDS
    timeout: tuple[float, float] = (3.05, 30.0)
    max_time_limit_wait: float = 30.0


class Engine:
    """Runs jobs against one SSM store. Thread-safe: jobs of different portals run concurrently."""

    def __init__(
        self,
        store: PortalStore,
        *,
        oauth_url: str | None = None,
        dry_run: bool = False,
        grace_days: int = 7,
        options: EngineOptions | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.oauth_url = oauth_url
        self.dry_run = dry_run
        self.grace_days = grace_days
        self.options = options or EngineOptions()
        self.session = session or _pooled_session()
        self.clock = clock
        self.buckets = BucketRegistry(self.options.rate, self.options.burst)
        self._credentials: tuple[float, AppCredentials] | None = None
        self._cache_lock = threading.Lock()
        self._declared: tuple[float, str | None] | None = None
        self.settings: Settings | None = None  # what `from_settings` built it from

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: object) -> Engine:
        engine = cls(
            settings.store(),
            oauth_url=settings.oauth_url,
            dry_run=settings.dry_run,
            grace_days=settings.revoked_grace_days,
            **kwargs,  # type: ignore[arg-type]
        )
        engine.settings = settings
        return engine

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

    def declared_set_text(self) -> str | None:
        """The declared set's raw text, read once per invocation and at most DECLARED_TTL old."""
        with self._cache_lock:
            now = time.monotonic()
            if self._declared is None or now - self._declared[0] > DECLARED_TTL:
                self._declared = (now, self.store.declared_set_text())
            return self._declared[1]

    def oauth_client(self) -> OAuthClient:
        return OAuthClient(self.credentials(), session=self.session, timeout=self.options.timeout)

    def keeper(self, member_id: str, record: PortalRecord) -> TokenKeeper:
        return TokenKeeper(
            self.store,
            member_id,
            record,
            self.oauth_client,
            oauth_url=self.oauth_url,
            settle_seconds=self.options.settle_seconds,
            clock=self.clock,
            persist_renames=not self.dry_run,
        )

    def client(self, keeper: TokenKeeper, deadline: float | None = None) -> PortalClient:
        return PortalClient(
            keeper,
            session=self.session,
            bucket=self.buckets.get(keeper.member_id),
            backoff=self.options.backoff,
            timeout=self.options.timeout,
            max_time_limit_wait=self.options.max_time_limit_wait,
            deadline=deadline,
        )

    # -- jobs --------------------------------------------------------------------------
    def run(self, job: Job, *, deadline: float | None = None) -> JobResult:
        """Run one job to its outcome. Raises JobFailed for `failed` (the queue retries it).

        `deadline` (a time.monotonic() value) stops the job from starting portal requests past
        it: the job then fails and is retried instead of being cut off by a Lambda timeout.
        """
        result = JobResult(job.action, job.member_id, dry_run=self.dry_run)
        try:
            self._run(job, result, deadline)
        except (TransientError, ConfigError) as exc:
            result.outcome = Outcome.FAILED
            result.reason = str(exc)
            _log_result(result)
            raise JobFailed(result) from None  # the reason says it; no chained traceback
        _log_result(result)
        return result

    def _run(self, job: Job, result: JobResult, deadline: float | None) -> None:
        declared: DeclaredSet | None = None
        if job.action is Action.SWEEP:
            try:
                declared = DeclaredSet.parse(self.declared_set_text())
            except InvalidDeclaredSet as exc:
                # A retry cannot mend the config: skip, touch nothing, say so loudly.
                result.outcome, result.declared_set_invalid = Outcome.SKIPPED, True
                result.reason = f"declared handler set is invalid: {exc}"
                log.error("sweep of %s skipped: %s", job.member_id, result.reason)
                return

        record = self.store.get(job.member_id)
        if record is None:
            result.outcome, result.reason = Outcome.SKIPPED, "no stored record"
            return
        if job.action is Action.UNINSTALL and not _same_token(record, job.application_token):
            result.outcome = Outcome.SKIPPED
            result.reason = "the portal was reinstalled since (application_token differs)"
            return
        started_token = record.application_token

        keeper = self.keeper(job.member_id, record)
        client = self.client(keeper, deadline)
        try:
            check_usable(record)
            self._clean(job, declared, client, result)
        except RevokedError as exc:
            self._revoked(job, keeper.record, started_token, exc, result)
        except PermanentError as exc:
            result.outcome, result.reason = Outcome.INCOMPLETE, str(exc)
        finally:
            result.rest_calls = client.stats.rest_calls
            result.rate_limited = client.stats.rate_limited
            result.refreshed = keeper.refreshed

        if result.outcome in (Outcome.CLEANED, Outcome.CLEAN):
            if job.action is Action.UNINSTALL:
                self._forget(job.member_id, started_token, result)
            elif keeper.record.revoked_at is not None and not self.dry_run:
                # Reached successfully: the portal is not revoked after all (SPEC §5 step 8). On a
                # fresh read, so that a pair the app's backend stored meanwhile is kept.
                self.store.modify(job.member_id, lambda current: current.data.pop("revoked_at", None) is not None)

    def _clean(self, job: Job, declared: DeclaredSet | None, client: PortalClient, result: JobResult) -> None:
        items = client.call("event.get")
        rows, bad = _rows(items)
        plan: Plan = classify(rows, declared) if declared is not None else plan_uninstall(rows)
        result.found = len(rows) + len(bad)
        result.kept = len(plan.declared)
        result.missing = len(plan.missing)
        result.orphans = [row.as_dict() for row in plan.orphans]
        result.missing_handlers = [entry.as_dict() for entry in plan.missing]
        for item in bad:
            result.unbind_failed += 1
            result.failures.append(
                {
                    "event": item.get("event") if isinstance(item, dict) else None,
                    "error": "UNREADABLE_ROW",
                    "kind": "permanent",
                }
            )

        commands = unbind_commands(plan.orphans)
        if self.dry_run:
            result.unbound = sum(c.rows for c in commands)  # what *would* be unbound
            if commands:
                log.info("dry run: %d handler rows of %s would be unbound", result.unbound, job.member_id)
        elif commands:
            answers = client.batch([Command(c.key, UNBIND_METHOD, c.params) for c in commands])
            revoked: B24Error | None = None
            transient = False
            for c in commands:
                answer = answers[c.key]
                if answer.ok:
                    count = answer.value.get("count") if isinstance(answer.value, dict) else None
                    result.unbound += int(count) if isinstance(count, int | float) else 0
                    continue
                if not answer.attempted:
                    transient = True  # left for the retry after a transient failure
                    continue
                error = answer.error
                assert error is not None
                if isinstance(error, RevokedError):
                    revoked = revoked or error
                    continue
                kind = "transient" if isinstance(error, TransientError) else "permanent"
                transient = transient or kind == "transient"
                result.unbind_failed += 1
                failure = {"event": c.event, "handler": c.handler, "error": error.code, "kind": kind}
                result.failures.append(failure)
                log.warning("unbind failed on %s: %s", job.member_id, failure)
            if revoked is not None:
                raise RevokedError(revoked.code, revoked.description, method=revoked.method)
            if transient:
                raise TransientError("UNBIND_FAILED", f"{result.unbind_failed} unbind command(s) failed transiently")

        if result.unbind_failed:
            result.outcome = Outcome.INCOMPLETE
            result.reason = f"{result.unbind_failed} handler(s) could not be unbound (permanent errors)"
        else:
            result.outcome = Outcome.CLEANED if commands else Outcome.CLEAN

    def _revoked(
        self, job: Job, record: PortalRecord, started_token: str, exc: RevokedError, result: JobResult
    ) -> None:
        """The app is gone from the portal. The evidence goes to the log (SPEC §9)."""
        result.outcome = Outcome.REVOKED
        source = "the OAuth server" if exc.method == "oauth" else "the portal"
        result.reason = f"revoked: {exc.code} from {source}" + (f" ({exc.description})" if exc.description else "")
        if self.dry_run:
            return
        if job.action is Action.UNINSTALL:
            self._forget(job.member_id, started_token, result)
            return
        now = int(self.clock())
        revoked_at = record.revoked_at
        if revoked_at is None:
            self.store.modify(job.member_id, lambda current: _mark_revoked(current, record, started_token, now))
        elif now - revoked_at >= self.grace_days * DAY:
            self._forget(job.member_id, started_token, result)

    def _forget(self, member_id: str, application_token: str, result: JobResult) -> None:
        """Delete the record, but never a newer installation's (SPEC §5 step 6)."""
        if self.dry_run:
            return
        result.record_deleted = self.store.delete_if_token(member_id, application_token)
        if not result.record_deleted:
            log.info("record of %s kept: it changed (reinstalled) or is already gone", member_id)


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


def _same_token(record: PortalRecord, token: str | None) -> bool:
    return hmac.compare_digest(record.application_token.encode(), (token or "").encode())


def _rows(items: object) -> tuple[list[HandlerRow], list[object]]:
    """Parse `event.get` rows; unreadable ones are kept aside, never silently dropped."""
    if isinstance(items, dict):  # a PHP array with gaps may come back as an object
        items = list(items.values())
    if not isinstance(items, list):
        raise PermanentError("BAD_ANSWER", "event.get did not return a list", method="event.get")
    rows: list[HandlerRow] = []
    bad: list[object] = []
    for item in items:
        try:
            rows.append(HandlerRow.from_api(item))
        except (ValueError, TypeError):
            bad.append(item)
    return rows, bad


def _log_result(result: JobResult) -> None:
    summary = result.summary()
    if result.outcome is Outcome.REVOKED:
        log.warning("portal %s revoked; evidence: %s", result.member_id, result.reason, extra={"job": summary})
    else:
        log.info(
            "%s job for %s: %s", result.action.value, result.member_id, result.outcome.value, extra={"job": summary}
        )


def _pooled_session() -> requests.Session:
    """One session for all portals of an invocation: connection reuse, enough pool for threads."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=32, pool_maxsize=32, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
