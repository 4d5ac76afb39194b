"""`b24-cleanup`: the operator's command line (design §8).

`plan` and `sweep` run the worker's engine in-process against the configured SSM store (standard
AWS credentials and region); `demo` and `emulator` need nothing but this machine. Output is a
table, or JSON with `--json`; the exit status is 1 when a portal ended `failed` or `incomplete`
and 2 for a usage or configuration mistake. Usual mistakes get one line on stderr, never a
traceback, and never a token. Mistakes that would fail every portal alike (AWS setup, an
unreachable SSM, the app's parameters) are checked once before the first portal (ops/checks.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from ..errors import B24Error, ConfigError, JobFailedError, TransientError
from ..jobs import Action, Job, JobResult, Outcome
from ..record import valid_member_id
from .output import RESULT_HEADER, Progress, result_row, table, totals

EXIT_OK, EXIT_PORTAL_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what `sweep --json | head` would get from a C tool
MAX_WORKERS = 64  # each worker holds a connection per portal and shares SSM's ~40 reads/s
BAD_OUTCOMES = frozenset({Outcome.FAILED, Outcome.INCOMPLETE})


class CliError(Exception):
    """A usual mistake: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------ commands


def _settings(args: argparse.Namespace) -> Any:
    from ..config import Settings

    env = dict(os.environ)
    if args.prefix is not None:
        prefix = args.prefix.strip()
        if not prefix.startswith("/") or len(prefix.rstrip("/")) < 2:
            raise CliError(f"--prefix must be an absolute SSM path such as /b24-cleanup/prod, not {args.prefix!r}")
        env["B24_SSM_PREFIX"] = prefix
    if getattr(args, "oauth_url", None):
        env["B24_OAUTH_URL"] = args.oauth_url
    if getattr(args, "dry_run", False):
        env["B24_DRY_RUN"] = "true"
    if not env.get("B24_SSM_PREFIX"):
        raise CliError("no SSM prefix: pass --prefix /b24-cleanup/prod or set B24_SSM_PREFIX")
    return Settings.from_env(env)


def _preflight(settings: Any, *, declared: bool = True) -> None:
    """Once, before the first portal: AWS setup, SSM reachable, the app's parameters present."""
    from .checks import check_app_parameters, check_aws_setup

    check_aws_setup()
    check_app_parameters(settings.ssm_prefix, declared=declared)


def _engine(args: argparse.Namespace) -> Any:
    from ..engine import Engine

    settings = _settings(args)
    _preflight(settings)
    return Engine.from_settings(settings)


def _member_ids(engine: Any, member_id: str | None) -> list[str]:
    if member_id is not None:
        if not valid_member_id(member_id):
            raise CliError(f"malformed member id {member_id!r}")
        if engine.store.get(member_id) is None:
            raise CliError(
                f"unknown member id {member_id}: no record at {engine.store.portal_name(member_id)} "
                "(is the prefix right?)"
            )
        return [member_id]
    ids = list(engine.store.iter_member_ids())
    if not ids:
        raise CliError(f"no portals stored under {engine.store.portals_path} (is the prefix right?)")
    return ids


def run_jobs(
    engine: Any, jobs: Sequence[Job], *, workers: int = 8, progress: Progress | None = None
) -> list[JobResult]:
    """Run jobs concurrently (different portals), in the order given for the report."""

    def one(job: Job) -> JobResult:
        result: JobResult | None = None
        try:
            result = engine.run(job)
            return result
        except JobFailedError as failed:
            result = failed.result
            return result
        finally:
            if progress:
                progress.advance(result.outcome.value if result else None)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        return list(pool.map(one, jobs))


def cmd_sweep(args: argparse.Namespace, out: TextIO) -> int:
    engine = _engine(args)
    ids = _member_ids(engine, args.member_id)
    # Progress goes to stderr, so it is shown with --json too (stdout stays the document).
    with Progress(len(ids), label="sweep", mode="auto" if len(ids) > 1 else "off") as progress:
        results = run_jobs(engine, [Job(Action.SWEEP, m) for m in ids], workers=args.workers, progress=progress)
    summary = totals(results)
    if args.json:
        json.dump(
            {"dry_run": engine.dry_run, "portals": [r.summary() for r in results], "totals": summary}, out, indent=2
        )
        out.write("\n")
    else:
        out.write(table([result_row(r) for r in results], RESULT_HEADER) + "\n\n")
        by_outcome = {o.value: sum(1 for r in results if r.outcome is o) for o in Outcome}
        out.write("outcomes: " + ", ".join(f"{k} {v}" for k, v in by_outcome.items() if v) + "\n")
        out.write(
            f"handlers: found {summary.get('HandlersFound', 0)}, "
            f"{'would unbind' if engine.dry_run else 'unbound'} {summary.get('HandlersUnbound', 0)}, "
            f"kept {summary.get('HandlersKept', 0)}, missing {summary.get('HandlersMissing', 0)}, "
            f"unbind failed {summary.get('UnbindFailed', 0)}\n"
        )
        if engine.dry_run:
            out.write("dry run: nothing was unbound, marked or deleted (token refreshes were persisted)\n")
    return EXIT_PORTAL_FAILED if any(r.outcome in BAD_OUTCOMES for r in results) else EXIT_OK


def cmd_plan(args: argparse.Namespace, out: TextIO) -> int:
    from . import plan as planning

    engine = _engine(args)
    engine.dry_run = True  # plan is read-only, apart from persisting a refresh it had to make
    if args.all:
        planning.limit_ssm_rate(engine.store.client, args.ssm_rate)  # the listing's pages included
        ids = _member_ids(engine, None)
        # Progress goes to stderr (a bar on a terminal, lines otherwise): stdout stays the table or JSON.
        with Progress(len(ids), label="plan", mode="auto") as progress:
            plans = planning.plan_all(
                engine, ids, workers=args.workers, on_done=lambda planned: progress.advance(planned.status)
            )
        if args.json:
            json.dump(planning.fleet_json(plans), out, indent=2)
            out.write("\n")
        else:
            out.write(planning.render_fleet(plans))
        return EXIT_PORTAL_FAILED if any(p.outcome in BAD_OUTCOMES for p in plans) else EXIT_OK
    (member_id,) = _member_ids(engine, args.member_id)
    planned = planning.plan_one(engine, member_id)
    if args.json:
        json.dump(planned.as_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(planning.render_portal(planned))
    return EXIT_PORTAL_FAILED if planned.outcome in BAD_OUTCOMES else EXIT_OK


def cmd_register(args: argparse.Namespace, out: TextIO) -> int:
    from ..errors import RegistrationInvalidError, RegistrationRejectedError
    from ..payload import PayloadError, parse_event_body
    from ..registration import register

    settings = _settings(args)
    _preflight(settings, declared=False)  # registering needs the app's credentials, not the declared set
    raw = sys.stdin.buffer.read() if args.payload == "-" else _read_file(args.payload)
    stripped = raw.lstrip()
    content_type = "application/json" if stripped.startswith((b"{", b"[")) else "application/x-www-form-urlencoded"
    try:
        payload = parse_event_body(raw, content_type)
        registration = register(payload, settings.store(), oauth_url=settings.oauth_url)
    except (PayloadError, RegistrationInvalidError) as exc:
        raise CliError(f"not a registration body: {exc}") from None
    except RegistrationRejectedError as exc:
        hint = ""
        if "no trusted OAuth server" in str(exc) and not settings.oauth_url:
            hint = (
                " (only https://oauth.bitrix.info and https://oauth.bitrix24.tech are trusted by default: "
                "for another OAuth server, such as the emulator's, pass --oauth-url or set B24_OAUTH_URL)"
            )
        raise CliError(f"registration rejected, nothing stored: {exc}{hint}") from None
    if args.json:
        json.dump(
            {"member_id": registration.member_id, "event": registration.event, "created": registration.created}, out
        )
        out.write("\n")
    else:
        verb = "registered (new record)" if registration.created else "registered (record replaced)"
        out.write(f"{registration.event} for portal {registration.member_id}: {verb}\n")
    return EXIT_OK


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def cmd_emulator(args: argparse.Namespace, out: TextIO) -> int:
    from .world import WorldError, serve_world, start_world

    if args.prefix is not None and not args.prefix.startswith("/"):
        raise CliError(f"--prefix must be an absolute SSM path such as /b24-cleanup/local, not {args.prefix!r}")
    try:
        world = start_world(
            args.portals,
            port=args.port,
            aws=args.aws,
            aws_port=args.aws_port,
            prefix=(args.prefix or "/b24-cleanup/local").rstrip("/"),
        )
    except WorldError as exc:
        raise CliError(str(exc)) from None
    serve_world(world, out=lambda line: print(line, file=out, flush=True), stop=_STOP)
    return EXIT_OK


_STOP: threading.Event | None = None  # tests and embedders may set it to stop `emulator`


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    try:
        import moto  # noqa: F401 - the demo's AWS side; only a dependency of the `demo` extra
    except ImportError:
        raise CliError("the demo needs moto: pip install 'b24-cleanup[demo]'") from None
    from .demo import DemoUnavailable, run_demo

    try:
        return run_demo(out=out, as_json=args.json, verbose=args.verbose)
    except DemoUnavailable as exc:
        raise CliError(str(exc)) from None


# ------------------------------------------------------------------------------------------ parser


def cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    """design §3a: copy each record into the table (absent only), then tombstone its SSM parameter."""
    from ..dynamostore import DynamoPortalStore
    from ..store import PortalStore
    from .migrate import Migration

    settings = _settings(args)
    table_name = args.table or os.environ.get("B24_TABLE", "").strip()
    if not table_name:
        raise CliError("no table: pass --table NAME or set B24_TABLE (the stack's PortalTableName output)")
    source = PortalStore(settings.ssm_prefix)  # records are read from SSM whatever B24_STORE says
    target = DynamoPortalStore(settings.ssm_prefix, table_name)
    ids = list(source.iter_member_ids())
    with Progress(len(ids), label="migrate", mode="auto" if len(ids) > 1 else "off") as progress:
        counts = Migration(
            source,
            target,
            dry_run=args.dry_run,
            settle_seconds=args.settle,
            progress=lambda *_: progress.advance(),
        ).run(ids)
    if args.json:
        json.dump(
            {
                "dry_run": args.dry_run,
                "table": table_name,
                "moved": counts.moved,
                "already_moved": counts.already_moved,
                "failed": counts.failed,
                "failures": counts.failures,
            },
            out,
            indent=2,
        )
        out.write("\n")
    else:
        if counts.failures:
            out.write(table(sorted(counts.failures.items()), ("member_id", "not moved because")) + "\n\n")
        verb = "would move" if args.dry_run else "moved"
        out.write(
            f"{verb} {counts.moved}, already moved {counts.already_moved}, failed {counts.failed} "
            f"(SSM {settings.ssm_prefix}/portals/ → DynamoDB {table_name})\n"
        )
        if args.dry_run:
            out.write("dry run: nothing was copied or overwritten\n")
        elif not counts.failed:
            out.write("next: deploy with TokenStore=dynamodb (B24_STORE=dynamodb) and point the app's backend at it\n")
    return EXIT_PORTAL_FAILED if counts.failed else EXIT_OK


def _version() -> str:
    from .. import __version__  # the one place the version is set (pyproject reads it too)

    return __version__


def _int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}, not {value}")
        return value

    return parse


def _positive_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < rate <= 1000:
        raise argparse.ArgumentTypeError("must be above 0 and at most 1000 requests per second")
    return rate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="b24-cleanup",
        description="Clean up Bitrix24 event handlers: the operator's side of the service.",
        epilog="Exit status: 0 done, 1 a portal ended failed or incomplete, 2 a usage or configuration mistake.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, prefix: bool = True) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        if prefix:
            p.add_argument(
                "--prefix", help="SSM prefix of the stack, e.g. /b24-cleanup/prod (default: $B24_SSM_PREFIX)"
            )
            p.add_argument(
                "--oauth-url",
                help="OAuth token URL to refresh at (default: $B24_OAUTH_URL, else derived from each record's "
                "server_endpoint; needed for an OAuth server other than Bitrix24's, e.g. the emulator's)",
            )

    p = sub.add_parser("demo", help="run the whole service on the embedded emulator and moto (no AWS, no network)")
    common(p, prefix=False)
    p.add_argument("--verbose", action="store_true", help="also print one raw EMF blob as CloudWatch receives it")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "plan",
        help="what tonight's sweep would do, per portal or fleet-wide: declared / orphan / held / missing",
        description="Read-only, apart from storing a token refresh a portal needed (it says so). Run --all before "
        "the first real sweep and after every change of the declared set.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--member-id", help="plan one portal (its member_id): every owned row, held rows with why and until when"
    )
    which.add_argument("--all", action="store_true", help="plan every portal and print one table for the fleet")
    p.add_argument(
        "--workers",
        type=_int_in(1, MAX_WORKERS, "--workers"),
        default=8,
        help=f"portals planned at once with --all, 1-{MAX_WORKERS} (default 8)",
    )
    p.add_argument(
        "--ssm-rate",
        type=_positive_rate,
        default=10.0,
        help="SSM requests per second with --all (default 10: SSM's ~40/s are shared with the service)",
    )
    common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sweep", help="run the sweep for one portal or all, in-process")
    p.add_argument("--member-id", help="sweep only this portal (default: every stored portal)")
    p.add_argument("--dry-run", action="store_true", help="plan and report only: unbind and delete nothing")
    p.add_argument(
        "--workers",
        type=_int_in(1, MAX_WORKERS, "--workers"),
        default=8,
        help=f"portals worked on at once, 1-{MAX_WORKERS} (default 8)",
    )
    common(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("emulator", help="run the Bitrix24 emulator (and, with --aws, SSM and SQS) as a local world")
    p.add_argument(
        "--port", type=_int_in(0, 65535, "--port"), default=0, help="emulator port on 127.0.0.1 (default: any free)"
    )
    p.add_argument(
        "--portals", type=_int_in(0, 10_000, "--portals"), default=3, help="portals to seed, 0-10000 (default 3)"
    )
    p.add_argument("--aws", action="store_true", help="also start an AWS side (moto server) seeded with the records")
    p.add_argument(
        "--aws-port", type=_int_in(0, 65535, "--aws-port"), default=0, help="moto server port (default: any free)"
    )
    p.add_argument("--prefix", help="SSM prefix of the seeded records with --aws (default /b24-cleanup/local)")
    p.set_defaults(func=cmd_emulator)

    p = sub.add_parser("register", help="register an install from a saved ONAPPINSTALL/ONAPPUPDATE body")
    p.add_argument("payload", help="a file with the raw POST body (form-encoded or JSON) Bitrix24 sent, or - for stdin")
    common(p)
    p.set_defaults(func=cmd_register)

    from .migrate import DEFAULT_SETTLE_SECONDS

    p = sub.add_parser("migrate", help="move portal records from SSM to the DynamoDB table (resumable)")
    p.add_argument("--to", required=True, choices=["dynamodb"], help="where the records go")
    p.add_argument("--table", help="the DynamoDB table of portal records (default: $B24_TABLE)")
    p.add_argument("--dry-run", action="store_true", help="count what would move; copy and overwrite nothing")
    p.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE_SECONDS,
        help=f"seconds to wait for in-flight SSM writers before the final check (default {DEFAULT_SETTLE_SECONDS:g})",
    )
    common(p)
    p.set_defaults(func=cmd_migrate)
    return parser


def _quiet_broken_pipe() -> None:
    """The reader went away (`… | head`): stop writing, and let the interpreter's final flush hit /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests): nothing to flush
        pass


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: Callable[[str], None] | None = None) -> int:
    out = out or sys.stdout
    say = err or (lambda line: print(line, file=sys.stderr))
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args, out))
        out.flush()
        return code
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        say("b24-cleanup: interrupted")
        return 130
    except (CliError, ConfigError) as exc:
        say(f"b24-cleanup: {exc}")
        return EXIT_USAGE
    except TransientError as exc:
        say(f"b24-cleanup: AWS or Bitrix24 did not answer well, try again: {exc}")
        return EXIT_PORTAL_FAILED
    except B24Error as exc:
        say(f"b24-cleanup: {exc}")
        return EXIT_PORTAL_FAILED


if __name__ == "__main__":
    sys.exit(main())
