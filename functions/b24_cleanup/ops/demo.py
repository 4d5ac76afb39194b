"""`b24-cleanup demo`: the whole service on this machine, no AWS account, no network.

The emulator plays a dozen portals and the OAuth server; moto plays SSM and SQS. The real Lambda
handlers run in-process: portals POST their install and uninstall events over HTTP to the
endpoint (through a loopback Function URL), the worker drains the FIFO queue as the SQS event
source would, and the nightly scheduler queues every stored portal for a sweep. Every portal is
set up to end one particular way; the demo exits 0 only if each one did.
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from typing import Any, TextIO

import boto3

from .emulator import payloads
from .functionurl import FakeContext, FunctionUrl
from .output import table
from .sandbox import Sandbox, SeededPortal, collect_results, drain, patched_environ, sandbox

APP = "https://app.example.com/b24"
DECLARED = [
    {"event": "ONCRMLEADADD", "handler": f"{APP}/events"},
    {"event": "ONCRMDEALUPDATE", "handler": f"{APP}/events"},
    {"event": "ONCRMDEALADD", "event_type": "offline"},
]
OLD = "https://app-v1.example.com/b24/events"  # a deployment retired long ago


def _declared_rows(skip: int | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {"event": "ONCRMLEADADD", "handler": f"{APP}/events"},
        {"event": "ONCRMDEALUPDATE", "handler": f"{APP}/events", "user_id": 1},
        {"event": "ONCRMDEALADD", "offline": True},
        {"event": "ONAPPUNINSTALL", "handler": f"{APP}/uninstall"},
    ]
    return [row for i, row in enumerate(rows) if i != skip]


@dataclass
class Case:
    name: str
    story: str
    expect_endpoint: int | None = None  # status the endpoint should answer, if an event is posted
    expect_uninstall: str | None = None  # outcome of the uninstall job
    expect_sweep: str | None = None  # outcome of the nightly sweep ("-" = not swept: no record)
    member_id: str = ""
    endpoint: list[int] = field(default_factory=list)
    uninstall: str | None = None
    sweep: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return (
            (self.expect_endpoint is None or self.endpoint == [self.expect_endpoint])
            and self.uninstall == self.expect_uninstall
            and (self.sweep or "-") == (self.expect_sweep or "-")
        )


def _post(url: str, pairs: list[tuple[str, str]]) -> int:
    return payloads.post_form(url, pairs)


def run_demo(out: TextIO, *, as_json: bool = False) -> int:
    """Run the scenario; print the table, totals and metrics; 0 when every portal ended as expected."""
    started = time.monotonic()
    logs = io.StringIO()
    emf: list[dict[str, Any]] = []
    with sandbox(prefix="/b24-cleanup/demo", declared=DECLARED) as box:
        env = box.env(
            B24_ACCEPT_INSTALL="true",
            B24_OAUTH_URL=box.emulator.oauth_url,
            POWERTOOLS_METRICS_NAMESPACE="B24Cleanup",
            POWERTOOLS_SERVICE_NAME="b24-cleanup",
        )
        with patched_environ(env):
            cases = _scenario(box, logs, emf)
        leaked = sum(1 for secret in box.emulator.secrets() if secret and secret in logs.getvalue())
    elapsed = time.monotonic() - started
    metrics = _metric_totals(emf)
    good = all(c.ok for c in cases) and leaked == 0
    if as_json:
        json.dump(
            {
                "ok": good,
                "seconds": round(elapsed, 2),
                "portals": [c.__dict__ for c in cases],
                "metrics": metrics,
                "emf_blobs": len(emf),
                "secrets_in_logs": leaked,
            },
            out,
            indent=2,
            default=str,
        )
        out.write("\n")
    else:
        _print(out, cases, metrics, emf, logs, leaked, elapsed)
    return 0 if good else 1


def _scenario(box: Sandbox, logs: io.StringIO, emf: list[dict[str, Any]]) -> list[Case]:
    from .. import runtime
    from ..handlers import endpoint, observability, scheduler, worker

    for handler in observability.logger.handlers:  # keep the handlers' JSON logs for the leak scan
        handler.setStream(logs)  # type: ignore[attr-defined]
    runtime.reset()

    def call(handler: Callable[[dict[str, Any], Any], Any], event: dict[str, Any]) -> Any:
        """Invoke a handler the way Lambda would, keeping its EMF blobs (stdout) for the report."""
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            answer = handler(event, FakeContext())
        for line in buffer.getvalue().splitlines():
            if line.startswith('{"_aws"'):
                emf.append(json.loads(line))
            else:
                logs.write(line + "\n")
        return answer

    cases = [
        Case("acme", "orphans: a retired URL under 3 auth_types, an unused offline queue", expect_sweep="cleaned"),
        Case("tidy", "only declared handlers", expect_sweep="clean"),
        Case("partial", "one declared handler missing (reported, not bound)", expect_sweep="clean"),
        Case("sleepy", "access token expired: refreshed, stored, then used", expect_sweep="cleaned"),
        Case("moved", "portal renamed: 302 followed, new address stored", expect_sweep="cleaned"),
        Case("lost", "app removed, uninstall event lost: found revoked", expect_sweep="revoked"),
        Case("locked", "an orphan queue it may not unbind (WRONG_LICENSE)", expect_sweep="incomplete"),
        Case(
            "bye",
            "genuine uninstall: portal already dropped it all",
            expect_endpoint=200,
            expect_uninstall="revoked",
            expect_sweep="-",
        ),
        Case(
            "early",
            "uninstall event while tokens still work",
            expect_endpoint=200,
            expect_uninstall="cleaned",
            expect_sweep="-",
        ),
        Case("spoofed", "forged ONAPPUNINSTALL (wrong application_token)", expect_endpoint=401, expect_sweep="clean"),
        Case(
            "again",
            "uninstalled, reinstalled before the job ran",
            expect_endpoint=200,
            expect_uninstall="skipped",
            expect_sweep="clean",
        ),
        Case("newcomer", "installs through the endpoint's registration", expect_endpoint=200, expect_sweep="cleaned"),
    ]
    by = {c.name: c for c in cases}
    seeded: dict[str, SeededPortal] = {}

    def seed(name: str, rows: list[dict[str, Any]], **kw: Any) -> SeededPortal:
        seeded[name] = box.add_portal(f"{name}.bitrix24.test", handlers=rows, **kw)
        by[name].member_id = seeded[name].member_id
        return seeded[name]

    seed(
        "acme",
        _declared_rows()
        + [{"event": "ONCRMLEADADD", "handler": OLD, "user_id": u} for u in (0, 1, 2)]
        + [{"event": "ONCRMLEADUPDATE", "offline": True}],
    )
    seed("tidy", _declared_rows())
    seed("partial", _declared_rows(skip=1))
    seed("sleepy", [*_declared_rows(), {"event": "ONCRMDEALADD", "handler": OLD}], expired=True)
    seed("moved", [*_declared_rows(), {"event": "ONCRMLEADDELETE", "handler": OLD}])
    seeded["moved"].portal.rename("moved-renamed.bitrix24.test")
    seed("lost", _declared_rows())
    box.emulator.uninstall(seeded["lost"].portal, box.app)  # its ONAPPUNINSTALL never arrives
    seed("locked", [*_declared_rows(), {"event": "ONCRMLEADADD", "offline": True, "connector_id": "erp"}])
    seeded["locked"].portal.license_auth_connector = False
    seed("bye", _declared_rows())
    seed("early", [*_declared_rows(), {"event": "ONCRMLEADADD", "handler": OLD}])
    seed("spoofed", _declared_rows())
    seed("again", _declared_rows())

    with collect_results() as results, FunctionUrl(lambda e, c: call(endpoint.lambda_handler, e)) as url:
        # -- events reach the endpoint over HTTP --------------------------------------------------
        by["bye"].endpoint.append(box.emulator.uninstall(seeded["bye"].portal, box.app, uninstall_url=url.url) or 0)
        early = seeded["early"]
        by["early"].endpoint.append(
            _post(
                url.url,
                payloads.uninstall_form(
                    box.emulator.state, early.portal, early.installation.application_token, clean=True
                ),
            )
        )
        by["spoofed"].endpoint.append(
            _post(url.url, payloads.uninstall_form(box.emulator.state, seeded["spoofed"].portal, "0" * 32, clean=True))
        )
        by["again"].endpoint.append(box.emulator.uninstall(seeded["again"].portal, box.app, uninstall_url=url.url) or 0)
        box.emulator.install(seeded["again"].portal, box.app, install_url=url.url)  # registered again
        newcomer = box.emulator.add_portal("newcomer.bitrix24.test")
        by["newcomer"].member_id = newcomer.member_id
        joined = box.emulator.install(newcomer, box.app, install_url=url.url)
        by["newcomer"].endpoint.append(joined.status or 0)
        for row in [*_declared_rows(), {"event": "ONCRMLEADADD", "handler": OLD}]:
            newcomer.bind(
                box.app,
                row["event"],
                row.get("handler"),
                user_id=int(row.get("user_id", 0)),
                offline=bool(row.get("offline")),
            )

        # -- the worker drains the uninstall jobs ------------------------------------------------
        queue = boto3.client("sqs")
        drain(queue, box.queue_url, lambda e, c: call(worker.lambda_handler, e), FakeContext())
        by_member = {c.member_id: c for c in cases}
        for job in results.jobs:
            if job["member_id"] in by_member and job["action"] == "uninstall":
                by_member[job["member_id"]].uninstall = job["outcome"]
        results.jobs.clear()

        # -- night: the scheduler queues every stored portal, the worker sweeps -------------------
        call(scheduler.lambda_handler, {"scheduled_time": time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime())})
        drain(queue, box.queue_url, lambda e, c: call(worker.lambda_handler, e), FakeContext())
        for job in results.jobs:
            case = by_member.get(job["member_id"])
            if case is not None and job["action"] == "sweep":
                case.sweep = job["outcome"]
                case.detail = (
                    f"found {job['found']}, unbound {job['unbound']}, kept {job['kept']}, "
                    f"missing {job['missing']}, refreshed {job['refreshed']}, REST {job['rest_calls']}"
                )
                if job["outcome"] in ("revoked", "incomplete"):
                    case.detail += f"; {job['reason']}"
    return cases


def _metric_totals(blobs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """What CloudWatch would hold: per `action` dimension, each metric's sum."""
    totals: dict[str, dict[str, float]] = defaultdict(dict)
    for blob in blobs:
        action = blob.get("action", "-")
        for directive in blob["_aws"]["CloudWatchMetrics"]:
            for metric in directive["Metrics"]:
                values = blob.get(metric["Name"], [])
                values = values if isinstance(values, list) else [values]
                totals[action][metric["Name"]] = totals[action].get(metric["Name"], 0) + sum(values)
    return {action: dict(sorted(values.items())) for action, values in sorted(totals.items())}


def _print(
    out: TextIO,
    cases: list[Case],
    metrics: dict[str, dict[str, float]],
    emf: list[dict[str, Any]],
    logs: io.StringIO,
    leaked: int,
    elapsed: float,
) -> None:
    out.write("b24-cleanup demo: 12 emulated portals, SSM and SQS in moto, the real Lambda handlers\n\n")
    rows = []
    for c in cases:
        rows.append(
            (
                c.name,
                c.member_id[:8],
                ",".join(map(str, c.endpoint)) or "-",
                c.uninstall or "-",
                c.sweep or "-",
                "ok" if c.ok else "UNEXPECTED",
                c.story,
            )
        )
    out.write(
        table(rows, ("portal", "member", "endpoint", "uninstall job", "nightly sweep", "as expected", "scenario"))
        + "\n\n"
    )
    out.write("sweep detail:\n")
    out.write(table([(c.name, c.detail) for c in cases if c.detail], ("portal", "what the sweep did")) + "\n\n")
    out.write("metrics as CloudWatch receives them (namespace B24Cleanup, dimension action):\n")
    mrows = [(action, name, int(value)) for action, values in metrics.items() for name, value in values.items()]
    out.write(table(mrows, ("action", "metric", "sum")) + "\n")
    if emf:
        sample = next((b for b in emf if b.get("action") == "sweep"), emf[0])
        out.write(f"\n{len(emf)} EMF blobs; one of them, as printed to stdout:\n{json.dumps(sample)}\n")
    lines = len(logs.getvalue().splitlines())
    out.write(f"\nlog lines: {lines}; tokens, secrets or application tokens found in them: {leaked}\n")
    ok = sum(c.ok for c in cases)
    out.write(f"{ok}/{len(cases)} portals ended as expected in {elapsed:.1f} s\n")
