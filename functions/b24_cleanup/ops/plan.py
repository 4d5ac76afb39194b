"""`b24-cleanup plan`: what tonight's sweep would do, for one portal or the whole fleet (design §8).

A plan runs the worker's own engine as a dry run, so that it can never disagree with the sweep:
the same declared set, the same held-orphan rules (history, ledger, near misses), the same
classification. It is read-only apart from one write it cannot avoid: a portal whose access token
is due is refreshed, and the rotated pair is stored (a refresh token is single-use; dropping the
new one would cut the portal off). The plan says so, per portal and in the totals.

`plan --all` plans every portal with a bounded SSM request rate (the account's ~40 reads/s are
shared with the running service) and prints one table for the fleet, grouped by (event, URL) or
(event, offline) and status: the table an operator reads before the first real sweep and after
every change of the declared set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import JobFailedError
from ..jobs import Action, Job, JobResult, Outcome
from ..pacing import LeakyBucket
from .output import table

DECLARED = "declared"
ORPHAN = "orphan: will be unbound"
MISSING = "missing"
OFFLINE = "(offline)"
# Statuses in the order the fleet table lists them within one (event, URL).
_ORDER = {DECLARED: 0, ORPHAN: 1, MISSING: 3}
DEFAULT_SSM_RATE = 10.0  # requests/s: a quarter of SSM's default read quota, leaving the rest to the service


@dataclass
class PortalPlan:
    """One portal's plan: what the sweep would keep, unbind, hold and miss."""

    member_id: str
    domain: str
    outcome: Outcome
    reason: str
    declared: list[dict[str, Any]]
    orphans: list[dict[str, Any]]  # rows the sweep would unbind
    held: list[dict[str, Any]]  # held pairs with their rows, reason and until
    missing: list[dict[str, Any]]
    refreshed: int
    rest_calls: int
    ssm_name: str = ""

    @classmethod
    def of(cls, result: JobResult, ssm_name: str = "") -> PortalPlan:
        return cls(
            member_id=result.member_id,
            domain=result.domain,
            outcome=result.outcome,
            reason=result.reason,
            declared=list(result.declared_rows),
            orphans=list(result.orphans),
            held=list(result.held),
            missing=list(result.missing_handlers),
            refreshed=result.refreshed,
            rest_calls=result.rest_calls,
            ssm_name=ssm_name,
        )

    @property
    def status(self) -> str:
        """`planned` when the portal answered and everything was classified; else the outcome."""
        return "planned" if self.outcome in (Outcome.CLEAN, Outcome.CLEANED) else self.outcome.value

    @property
    def refresh_stored(self) -> bool:
        """A refresh happened and its pair was stored (a failed store fails the job)."""
        return self.refreshed > 0 and self.outcome is not Outcome.FAILED

    @property
    def held_rows(self) -> int:
        return sum(int(pair.get("rows", 0)) for pair in self.held)

    def as_json(self) -> dict[str, Any]:
        return {
            "member_id": self.member_id,
            "domain": self.domain,
            "status": self.status,
            "reason": self.reason,
            "declared": self.declared,
            "orphans": self.orphans,
            "held": self.held,
            "missing": self.missing,
            "token_refreshed": self.refreshed > 0,
            "token_refresh_stored_in_ssm": self.refresh_stored,
            "rest_calls": self.rest_calls,
        }


# ------------------------------------------------------------------------------------------ running


def plan_one(engine: Any, member_id: str) -> PortalPlan:
    """Plan one portal with `engine` (which must be in dry-run mode: the caller makes sure)."""
    assert engine.dry_run, "a plan never unbinds: run it on a dry-run engine"
    try:
        result = engine.run(Job(Action.SWEEP, member_id))
    except JobFailedError as failed:
        result = failed.result
    return PortalPlan.of(result, engine.store.portal_name(member_id))


def plan_all(
    engine: Any,
    member_ids: Sequence[str],
    *,
    workers: int = 8,
    on_done: Callable[[PortalPlan], None] | None = None,
) -> list[PortalPlan]:
    """Plan every portal, `workers` at a time, in the order given."""

    def one(member_id: str) -> PortalPlan:
        planned = plan_one(engine, member_id)
        if on_done is not None:
            on_done(planned)
        return planned

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(member_ids)))) as pool:
        return list(pool.map(one, member_ids))


def limit_ssm_rate(client: Any, rate: float) -> LeakyBucket:
    """Pace every request of `client` (an SSM client) to `rate` per second, across threads.

    Through botocore's own `before-call` hook, the documented place for this: each API call waits
    for room in the bucket before it is sent (its adaptive retries come on top, rarely).
    """
    bucket = LeakyBucket(rate, max(1, int(rate)))

    def wait(**_: Any) -> None:
        bucket.acquire()  # and return None: a value returned here would replace the call's answer

    client.meta.events.register("before-call.ssm", wait, unique_id="b24-plan-ssm-rate")
    return bucket


# ------------------------------------------------------------------------------------------ one portal


def _row_cells(row: dict[str, Any]) -> tuple[object, ...]:
    return (
        row.get("event"),
        row.get("handler") or OFFLINE,
        row.get("auth_type") or row.get("connector_id") or "",
    )


def render_portal(plan: PortalPlan) -> str:
    """The single-portal plan as text: every owned row with what tonight's sweep does to it."""
    lines = [
        f"portal {plan.member_id} ({plan.domain or '?'}): {plan.status}" + (f" - {plan.reason}" if plan.reason else ""),
        f"owned handler rows: {len(plan.declared) + len(plan.orphans) + plan.held_rows} "
        f"(declared {len(plan.declared)}, orphan {len(plan.orphans)}, held {plan.held_rows}); "
        f"declared but missing: {len(plan.missing)}",
    ]
    if plan.refreshed:
        lines.append(_refresh_line(plan))
    lines.append("")
    header = ("event", "handler", "auth_type/connector")
    if plan.declared:
        lines += ["declared (kept):", table([_row_cells(r) for r in plan.declared], header), ""]
    if plan.orphans:
        lines += ["orphans (the sweep will unbind them):", table([_row_cells(r) for r in plan.orphans], header), ""]
    if plan.held:
        held_rows: list[tuple[object, ...]] = [
            (p.get("event"), p.get("handler") or OFFLINE, p.get("rows"), p.get("detail")) for p in plan.held
        ]
        lines += [
            "held (orphans, not unbound yet):",
            table(held_rows, ("event", "handler", "rows", "why, and until when")),
            "",
        ]
    if plan.missing:
        rows = [(m.get("event"), m.get("handler") or OFFLINE) for m in plan.missing]
        lines += ["declared but missing (not bound on this portal):", table(rows, ("event", "handler")), ""]
    return "\n".join(lines).rstrip() + "\n"


def _refresh_line(plan: PortalPlan) -> str:
    if plan.refresh_stored:
        return (
            f"note: the access token was due and was refreshed; the rotated pair was written to SSM "
            f"({plan.ssm_name or 'the portal record'}). That is the only thing a plan writes."
        )
    return "note: the access token was refreshed, but storing the rotated pair failed (see the reason above)"


# ------------------------------------------------------------------------------------------ the fleet


@dataclass
class Group:
    """One line of the fleet table: an (event, URL) or (event, offline) in one status."""

    event: str
    handler: str | None
    status: str
    kind: str  # declared | orphan | held | missing
    hold: dict[str, Any] | None = None
    portals: set[str] = field(default_factory=set)
    rows: int = 0

    def sort_key(self) -> tuple[object, ...]:
        return (self.event, self.handler or "", _ORDER.get(self.status, 2), self.status)

    def as_json(self) -> dict[str, Any]:
        hold = self.hold or {}
        return {
            "event": self.event,
            "handler": self.handler,
            "offline": self.handler is None,
            "status": self.status,
            "kind": self.kind,
            "reason": hold.get("reason"),
            "until": hold.get("until"),
            "portals": len(self.portals),
            "rows": self.rows,
        }


def fleet_groups(plans: Sequence[PortalPlan]) -> list[Group]:
    """Group every portal's rows by (event, URL or offline, status)."""
    groups: dict[tuple[str, str | None, str], Group] = {}

    def add(event: Any, handler: Any, status: str, kind: str, member_id: str, rows: int, hold: Any = None) -> None:
        key = (str(event).strip().upper(), handler or None, status)
        group = groups.setdefault(key, Group(key[0], key[1], status, kind, hold))
        group.portals.add(member_id)
        group.rows += rows

    for plan in plans:
        for row in plan.declared:
            add(row.get("event"), row.get("handler"), DECLARED, "declared", plan.member_id, 1)
        for row in plan.orphans:
            add(row.get("event"), row.get("handler"), ORPHAN, "orphan", plan.member_id, 1)
        for pair in plan.held:
            status = str(pair.get("status") or _held_status(pair))
            add(pair.get("event"), pair.get("handler"), status, "held", plan.member_id, int(pair.get("rows", 0)), pair)
        for entry in plan.missing:
            add(entry.get("event"), entry.get("handler"), MISSING, "missing", plan.member_id, 0)
    return sorted(groups.values(), key=Group.sort_key)


def _held_status(pair: dict[str, Any]) -> str:
    return f"held: {pair.get('reason', 'held')}"


def fleet_totals(plans: Sequence[PortalPlan], groups: Sequence[Group]) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    for plan in plans:
        by_status[plan.status] = by_status.get(plan.status, 0) + 1
    rows = {kind: sum(g.rows for g in groups if g.kind == kind) for kind in ("declared", "orphan", "held")}
    return {
        "portals": len(plans),
        "portals_by_status": dict(sorted(by_status.items())),
        "rows_declared": rows["declared"],
        "rows_to_unbind": rows["orphan"],
        "rows_held": rows["held"],
        "portals_with_held": sum(1 for p in plans if p.held),
        "missing": sum(len(p.missing) for p in plans),
        "portals_with_missing": sum(1 for p in plans if p.missing),
        "token_refreshes_stored_in_ssm": sum(1 for p in plans if p.refresh_stored),
    }


def fleet_json(plans: Sequence[PortalPlan]) -> dict[str, Any]:
    groups = fleet_groups(plans)
    return {
        "groups": [g.as_json() for g in groups],
        "totals": fleet_totals(plans, groups),
        "problems": [
            {"member_id": p.member_id, "domain": p.domain, "status": p.status, "reason": p.reason}
            for p in plans
            if p.status != "planned"
        ],
    }


def render_fleet(plans: Sequence[PortalPlan], *, max_problems: int = 20) -> str:
    groups = fleet_groups(plans)
    totals = fleet_totals(plans, groups)
    rows = [(g.event, g.handler or OFFLINE, g.status, len(g.portals), g.rows) for g in groups]
    lines = [table(rows, ("event", "handler", "status", "portals", "rows")), ""]
    statuses = ", ".join(f"{k} {v}" for k, v in totals["portals_by_status"].items())
    lines.append(f"portals: {totals['portals']} ({statuses})")
    lines.append(
        f"rows: declared {totals['rows_declared']}, will be unbound {totals['rows_to_unbind']}, "
        f"held {totals['rows_held']} (on {totals['portals_with_held']} portals); "
        f"declared but missing: {totals['missing']} (on {totals['portals_with_missing']} portals)"
    )
    refreshed = totals["token_refreshes_stored_in_ssm"]
    lines.append(
        f"token refreshes stored in SSM: {refreshed}"
        + (" (their access tokens were due; a rotated pair is always stored)" if refreshed else "")
    )
    problems = [p for p in plans if p.status != "planned"]
    if problems:
        lines += ["", f"not planned or not fully ({len(problems)}):"]
        for p in problems[:max_problems]:
            lines.append(f"  {p.member_id} ({p.domain or '?'}): {p.status} - {p.reason}")
        if len(problems) > max_problems:
            lines.append(f"  ... and {len(problems) - max_problems} more (--json lists all)")
    if totals["rows_held"]:
        lines += [
            "",
            "held rows are not unbound tonight: fix the declared set if they are live handlers, or let the "
            "grace run out (B24_ORPHAN_GRACE_DAYS=0 for one CLI sweep releases all but near misses)",
        ]
    return "\n".join(lines) + "\n"
