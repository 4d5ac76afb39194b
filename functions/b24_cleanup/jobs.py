"""Jobs on the portal queue and what became of them (design §5, §6)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import InvalidJobError
from .record import valid_member_id


class Action(StrEnum):
    UNINSTALL = "uninstall"
    SWEEP = "sweep"


class Outcome(StrEnum):
    CLEANED = "cleaned"
    CLEAN = "clean"
    REVOKED = "revoked"
    SKIPPED = "skipped"
    INCOMPLETE = "incomplete"
    FAILED = "failed"


# design §6: one counter per outcome, except `clean` (the remainder of PortalsProcessed).
OUTCOME_METRIC: dict[Outcome, str | None] = {
    Outcome.CLEANED: "PortalsCleaned",
    Outcome.CLEAN: None,
    Outcome.REVOKED: "PortalsRevoked",
    Outcome.SKIPPED: "PortalsSkipped",
    Outcome.INCOMPLETE: "PortalsIncomplete",
    Outcome.FAILED: "PortalsFailed",
}


@dataclass(frozen=True)
class Job:
    action: Action
    member_id: str
    application_token: str | None = None  # uninstall jobs only
    clean: bool | None = None
    ts: str | None = None

    def __repr__(self) -> str:  # never the application token
        return f"Job(action={self.action.value!r}, member_id={self.member_id!r})"

    def to_message(self) -> dict[str, Any]:
        """The message body of design §5."""
        if self.action is Action.UNINSTALL:
            return {
                "action": "uninstall",
                "member_id": self.member_id,
                "application_token": self.application_token,
                "clean": self.clean,
                "ts": self.ts,
            }
        return {"action": "sweep", "member_id": self.member_id}

    @classmethod
    def parse(cls, body: str | bytes | dict[str, Any]) -> Job:
        """Parse a queue message body; raise :class:`InvalidJobError` with a reason that holds no secret."""
        if isinstance(body, str | bytes):
            try:
                body = json.loads(body)
            except ValueError:
                raise InvalidJobError("job body is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidJobError("job body is not a JSON object")
        try:
            action = Action(str(body.get("action")))
        except ValueError:
            raise InvalidJobError("job action is not 'uninstall' or 'sweep'") from None
        member_id = body.get("member_id")
        if not isinstance(member_id, str) or not valid_member_id(member_id):
            raise InvalidJobError("job member_id is missing or malformed")
        if action is Action.SWEEP:
            return cls(action, member_id)
        token = body.get("application_token")
        if not isinstance(token, str) or not token:
            raise InvalidJobError("uninstall job has no application_token")
        clean = body.get("clean")
        ts = body.get("ts")
        return cls(
            action,
            member_id,
            application_token=token,
            clean=clean if isinstance(clean, bool) else None,
            ts=str(ts) if ts is not None else None,
        )


@dataclass
class JobResult:
    """What one job did: the outcome, the counts behind the design §6 metrics, and log detail."""

    action: Action
    member_id: str
    outcome: Outcome = Outcome.CLEAN
    dry_run: bool = False
    domain: str = ""  # the portal's domain as its record says (for operators' tables; not secret)
    found: int = 0
    unbound: int = 0
    kept: int = 0
    missing: int = 0
    unbind_failed: int = 0
    refreshed: int = 0
    rest_calls: int = 0
    rate_limited: int = 0
    declared_set_invalid: bool = False
    unconfirmed: bool = False  # an uninstall whose tokens still work (design §5 step 6)
    reached: bool = False  # the portal answered `event.get` (design §5 step 8: not revoked)
    reason: str = ""  # why skipped / revoked evidence / what failed; never a secret
    orphans: list[dict[str, Any]] = field(default_factory=list)
    missing_handlers: list[dict[str, Any]] = field(default_factory=list)
    # Held orphans (design §3): one entry per held pair with its row count, reason and "until".
    held: list[dict[str, Any]] = field(default_factory=list)
    declared_rows: list[dict[str, Any]] = field(default_factory=list)  # the rows kept, for `plan`
    failures: list[dict[str, Any]] = field(default_factory=list)
    record_deleted: bool = False

    def metrics(self) -> dict[str, int]:
        """design §6 metric values of this job (absent = 0)."""
        values = {
            "PortalsProcessed": 1,
            "HandlersFound": self.found,
            "HandlersUnbound": self.unbound,
            "HandlersKept": self.kept,
            "HandlersMissing": self.missing,
            "UnbindFailed": self.unbind_failed,
            "TokensRefreshed": self.refreshed,
            "RestCalls": self.rest_calls,
            "RateLimited": self.rate_limited,
            "DeclaredSetInvalid": int(self.declared_set_invalid),
            "UninstallUnconfirmed": int(self.unconfirmed),
            "HandlersHeld": self.held_rows,
        }
        counter = OUTCOME_METRIC[self.outcome]
        if counter:
            values[counter] = 1
        return values

    @property
    def held_rows(self) -> int:
        """Rows held, not unbound (design §6 `HandlersHeld`)."""
        return sum(int(pair.get("rows", 0)) for pair in self.held)

    def summary(self) -> dict[str, Any]:
        """A log- and JSON-friendly view (member id and counts; no token)."""
        return {
            "member_id": self.member_id,
            "domain": self.domain,
            "action": self.action.value,
            "outcome": self.outcome.value,
            "dry_run": self.dry_run,
            "found": self.found,
            "unbound": self.unbound,
            "kept": self.kept,
            "missing": self.missing,
            "unbind_failed": self.unbind_failed,
            "held_rows": self.held_rows,
            # Held pairs (design §3): what the operator reads first when a sweep holds rows.
            "held": [
                {k: pair.get(k) for k in ("event", "handler", "offline", "rows", "reason", "until")}
                for pair in self.held
            ],
            "refreshed": self.refreshed,
            "rest_calls": self.rest_calls,
            "rate_limited": self.rate_limited,
            "reason": self.reason,
            "record_deleted": self.record_deleted,
            "unconfirmed": self.unconfirmed,
        }
