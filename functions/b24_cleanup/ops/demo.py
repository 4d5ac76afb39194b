"""`b24-cleanup demo`: the whole service on this machine, no AWS account, no network.

The emulator plays a dozen portals and the OAuth server; moto plays SSM and SQS. The real Lambda
handlers run in-process: portals POST their install and uninstall events over HTTP to the
endpoint (through a loopback Function URL), the worker drains the FIFO queue as the SQS event
source would, and the nightly scheduler queues every stored portal for a sweep. Every portal is
set up to end one particular way; the demo exits 0 only if each one did.

The demo is hermetic: it sets every variable it depends on and clears the rest of the AWS,
Powertools and proxy settings of the caller's shell (an exported `B24_DRY_RUN`, `AWS_PROFILE` or
`AWS_ENDPOINT_URL` must not change what it shows), and it checks that its own emulator can be
reached before the first portal, so that a machine without a working loopback says so at once.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

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
TYPO = f"{APP}/events/"  # a near miss of the declared f"{APP}/events"

# What the demo clears from the caller's environment (and then sets what it needs itself): the
# AWS SDK's and Powertools' settings, the service's own, and proxies (requests would send the
# emulator's loopback traffic through them).
_CLEARED_PREFIXES = ("AWS_", "B24_", "POWERTOOLS_")
_CLEARED = {
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "LOG_LEVEL",
}


class DemoUnavailable(Exception):
    """The demo cannot run on this machine (its own emulator unreachable): one line, exit 2."""


def hermetic_environ(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    """The environment changes that make the demo independent of the caller's shell.

    Every AWS_*, B24_*, POWERTOOLS_* and proxy variable is cleared; the AWS config and credential
    files point at nothing (a profile's region, endpoint or credential process must not apply);
    the instance metadata service is never asked. What the demo needs it sets on top (sandbox()).
    """
    environ = dict(os.environ) if environ is None else environ
    changes: dict[str, str | None] = {
        key: None for key in environ if key.startswith(_CLEARED_PREFIXES) or key.upper() in _CLEARED
    }
    changes.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        NO_PROXY="*",
        no_proxy="*",
        POWERTOOLS_METRICS_NAMESPACE="B24Cleanup",
        POWERTOOLS_SERVICE_NAME="b24-cleanup",
        POWERTOOLS_TRACE_DISABLED="true",
    )
    return changes


def check_reachable(url: str, timeout: float = 2.0) -> None:
    """Connect once to the emulator's address; a refusal or an unreachable network is said at once.

    Without this, a machine whose loopback is down (a network namespace, a sandbox) spends a
    minute in retries and then reports every portal unexpected, with no hint why.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise DemoUnavailable(
            f"the demo's own Bitrix24 emulator at {host}:{port} cannot be reached ({exc.strerror or exc}): "
            "is the loopback interface up?"
        ) from None


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
    expect_held: int | None = None  # orphan rows the sweep must hold, not unbind (and they must survive)
    member_id: str = ""
    domain: str = ""
    endpoint: list[int] = field(default_factory=list)
    uninstall: str | None = None
    sweep: str | None = None
    detail: str = ""
    declared: int = 0  # declared handlers the sweep found bound (kept) ...
    missing: int = 0  # ... and declared ones it found missing
    removed: list[dict[str, Any]] = field(default_factory=list)  # rows gone from the portal after the night
    # Held orphans (not unbound yet, and why): filled from the job's summary once the engine
    # reports them (its `held` list of {event, handler, reason}); empty until then.
    held: list[dict[str, Any]] = field(default_factory=list)

    @property
    def held_survived(self) -> int:
        """Rows the sweep held that are still bound after the night (read off the portal)."""
        gone = {(str(r.get("event", "")).upper(), r.get("handler")) for r in self.removed}
        return sum(
            int(h.get("rows", 0)) for h in self.held if (str(h.get("event", "")).upper(), h.get("handler")) not in gone
        )

    @property
    def sweep_text(self) -> str:
        """The sweep's outcome as the operator should read it: `clean` with nothing declared bound is not clean."""
        if not self.sweep:
            return "-"
        if self.missing and not self.declared:
            return f"{self.sweep}: all {self.missing} declared missing"
        if self.missing:
            return f"{self.sweep}, {self.missing} missing"
        return self.sweep

    @property
    def ok(self) -> bool:
        return (
            (self.expect_endpoint is None or self.endpoint == [self.expect_endpoint])
            and self.uninstall == self.expect_uninstall
            and (self.sweep or "-") == (self.expect_sweep or "-")
            and (self.expect_held is None or self.held_survived == self.expect_held)
        )


def _post(url: str, pairs: list[tuple[str, str]]) -> int:
    return payloads.post_form(url, pairs)


def run_demo(out: TextIO, *, as_json: bool = False, verbose: bool = False) -> int:
    """Run the scenario; print the table, totals and metrics; 0 when every portal ended as expected.

    Raises DemoUnavailable when the machine cannot run it (the CLI says so in one line).
    """
    started = time.monotonic()
    logs = io.StringIO()
    emf: list[dict[str, Any]] = []
    saved_session = boto3.DEFAULT_SESSION
    with patched_environ(hermetic_environ()):
        boto3.DEFAULT_SESSION = None  # a session made before (under the caller's profile) must not be reused
        try:
            with sandbox(prefix="/b24-cleanup/demo", declared=DECLARED) as box:
                check_reachable(box.emulator.base_url)
                env = box.env(
                    B24_ACCEPT_INSTALL="true",
                    B24_OAUTH_URL=box.emulator.oauth_url,
                    B24_DRY_RUN="false",
                    # The demo's stale URLs were retired long ago: in its story their grace has run
                    # out. Near misses are held whatever the grace (the "typo" portal shows it).
                    B24_ORPHAN_GRACE_DAYS="0",
                )
                with patched_environ(env):
                    cases = _scenario(box, logs, emf)
                leaked = sum(1 for secret in box.emulator.secrets() if secret and secret in logs.getvalue())
        finally:
            boto3.DEFAULT_SESSION = saved_session
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
        _print(out, cases, metrics, emf, logs, leaked, elapsed, verbose=verbose)
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
        Case("bare", "none of the declared handlers bound (reported, not bound)", expect_sweep="clean"),
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
            "ONAPPUNINSTALL with a leaked token, app installed: unconfirmed, nothing changes",
            expect_endpoint=200,
            expect_uninstall="skipped",
            expect_sweep="cleaned",
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
        Case(
            "typo",
            "typo in the declared set: the live URL differs by a trailing slash; held, it survives",
            expect_sweep="clean",
            expect_held=1,
        ),
    ]
    by = {c.name: c for c in cases}
    seeded: dict[str, SeededPortal] = {}

    def seed(name: str, rows: list[dict[str, Any]], **kw: Any) -> SeededPortal:
        seeded[name] = box.add_portal(f"{name}.bitrix24.test", handlers=rows, **kw)
        by[name].member_id = seeded[name].member_id
        by[name].domain = seeded[name].portal.name  # the emulator serves it on a loopback host of its own
        return seeded[name]

    seed(
        "acme",
        _declared_rows()
        + [{"event": "ONCRMLEADADD", "handler": OLD, "user_id": u} for u in (0, 1, 2)]
        + [{"event": "ONCRMLEADUPDATE", "offline": True}],
    )
    seed("tidy", _declared_rows())
    seed("partial", _declared_rows(skip=1))
    seed("bare", [])
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
    # The declared set says .../events, this portal's live handler is .../events/: one of them is a
    # typo, and the sweep cannot know which, so it holds the row (a near miss) instead of cutting it.
    seed("typo", [*_declared_rows(skip=0), {"event": "ONCRMLEADADD", "handler": TYPO}])

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
        by["newcomer"].domain = newcomer.name
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
        portals = {**{n: sp.portal for n, sp in seeded.items()}, "newcomer": newcomer}
        before = {name: portal.handlers(box.app) for name, portal in portals.items()}
        call(scheduler.lambda_handler, {"scheduled_time": time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime())})
        drain(queue, box.queue_url, lambda e, c: call(worker.lambda_handler, e), FakeContext())
        for job in results.jobs:
            case = by_member.get(job["member_id"])
            if case is not None and job["action"] == "sweep":
                case.sweep = job["outcome"]
                case.declared, case.missing = job["kept"], job["missing"]
                case.held = list(job.get("held") or [])
                case.detail = (
                    f"found {job['found']}, unbound {job['unbound']}, kept {job['kept']}, "
                    f"missing {job['missing']}, refreshed {job['refreshed']}, REST {job['rest_calls']}"
                )
                if job["outcome"] in ("revoked", "incomplete"):
                    case.detail += f"; {job['reason']}"
        # What was removed is read off the portals themselves, not taken from the engine's word.
        for name, portal in portals.items():
            after = portal.handlers(box.app)
            by[name].removed = [row for row in before[name] if row not in after]
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


def _handler_text(row: dict[str, Any]) -> str:
    if row.get("handler"):
        return str(row["handler"])
    connector = row.get("connector_id")
    return f"(offline, connector {connector})" if connector else "(offline)"


def _print(
    out: TextIO,
    cases: list[Case],
    metrics: dict[str, dict[str, float]],
    emf: list[dict[str, Any]],
    logs: io.StringIO,
    leaked: int,
    elapsed: float,
    *,
    verbose: bool = False,
) -> None:
    out.write(f"b24-cleanup demo: {len(cases)} emulated portals, SSM and SQS in moto, the real Lambda handlers\n\n")
    rows = [
        (
            c.name,
            c.domain,
            c.member_id[:8],
            ",".join(map(str, c.endpoint)) or "-",
            c.uninstall or "-",
            c.sweep_text,
            "ok" if c.ok else "UNEXPECTED",
            c.story,
        )
        for c in cases
    ]
    header = ["portal", "domain", "member", "endpoint HTTP", "uninstall job", "nightly sweep", "as expected"]
    header.append("scenario")
    out.write(table(rows, header) + "\n")
    out.write("(endpoint HTTP: the status the uninstall endpoint answered the portal's POST; - = no event posted)\n\n")
    out.write("sweep detail:\n")
    out.write(table([(c.name, c.detail) for c in cases if c.detail], ("portal", "what the sweep did")) + "\n\n")
    removed = [
        (c.name, row["event"], _handler_text(row), row.get("auth_type", "-") if row.get("handler") else "-")
        for c in cases
        for row in c.removed
    ]
    out.write("rows removed from the portals (as the portals list them afterwards):\n")
    out.write(table(removed, ("portal", "event", "handler", "auth_type")) + "\n\n")
    held = [(c.name, h.get("event", ""), _handler_text(h), h.get("reason", "")) for c in cases for h in c.held]
    if held:
        out.write("orphans held (not unbound yet):\n")
        out.write(table(held, ("portal", "event", "handler", "why held")) + "\n\n")
    out.write("metrics as CloudWatch receives them (namespace B24Cleanup, dimension action):\n")
    mrows = [(action, name, int(value)) for action, values in metrics.items() for name, value in values.items()]
    out.write(table(mrows, ("action", "metric", "sum")) + "\n")
    if emf and verbose:
        sample = next((b for b in emf if b.get("action") == "sweep"), emf[0])
        out.write(f"\n{len(emf)} EMF blobs; one of them, as printed to stdout:\n{json.dumps(sample)}\n")
    elif emf:
        out.write(f"({len(emf)} EMF blobs printed by the handlers; --verbose shows one as CloudWatch gets it)\n")
    lines = len(logs.getvalue().splitlines())
    out.write(f"\nlog lines: {lines}; tokens, secrets or application tokens found in them: {leaked}\n")
    ok = sum(c.ok for c in cases)
    out.write(f"{ok}/{len(cases)} portals ended as expected in {elapsed:.1f} s\n")
