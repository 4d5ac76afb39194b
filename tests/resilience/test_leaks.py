"""Leak check (design §7): no token, refresh token, client secret or application token in a log line, a metric,
an exception message or a CLI output.

Each scenario below runs real code paths end to end (the demo, the worker through the queue, the
endpoint with registration on, the app-side token API, the CLI) including their failure paths (revoked,
transient failures and timeouts, invalid grant, an unreachable OAuth server, a renamed portal, rejected
registrations, CLI mistakes) while capturing everything they emit:

- stdout and stderr at the file-descriptor level (capfd): EMF metrics, JSON logs, CLI output;
- every log record of the root logger and the project's loggers, formatted with its extras and traceback;
- every exception they raise: str, repr and the formatted traceback with its causes;

and then searches all of it for every secret any emulator of the session has issued (raw, percent-decoded
and inside base64 runs). The session-wide guard (tests/leakguard.py) keeps doing the same for every other test.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

import boto3
import pytest
from fixtures.sandbox import APP_URL, DECLARED, OLD_URL, SHORT_TIMEOUTS
from leakguard import STANDARD_RECORD_KEYS, emulator_secrets, find_secrets

from b24_cleanup import runtime
from b24_cleanup.access import TokenAccess
from b24_cleanup.engine import Engine
from b24_cleanup.errors import JobFailedError
from b24_cleanup.jobs import Action, Job, Outcome
from b24_cleanup.oauth import OAuthClient
from b24_cleanup.ops import cli
from b24_cleanup.ops.emulator import payloads
from b24_cleanup.ops.functionurl import FakeContext, function_url_event
from b24_cleanup.ops.sandbox import Sandbox, drain
from b24_cleanup.payload import parse_event_body
from b24_cleanup.registration import register

pytestmark = pytest.mark.box(declared=DECLARED, timeout_delay=0.05, env=True)
DEAD_OAUTH = "http://127.0.0.1:9/oauth/token/"  # nothing listens on the discard port
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{24,}={0,2}")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        return True  # not Powertools' deduplication filter either: every record counts

    def emit(self, record: logging.LogRecord) -> None:
        extras = {k: v for k, v in record.__dict__.items() if k not in STANDARD_RECORD_KEYS}
        self.texts.append(f"{self.format(record)} {extras!r}")


class Seen:
    """Everything a scenario printed, logged or raised."""

    LOGGERS = ("", "b24_cleanup")  # the Powertools logger `b24-cleanup` propagates to the root

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.records = _Records()
        self.texts: list[str] = []
        self.exceptions = 0

    def __enter__(self) -> Seen:
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self.records)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self.records)

    def add(self, *texts: str) -> None:
        self.texts.extend(texts)

    def exception(self, exc: BaseException) -> None:
        """An exception as logs and crash reports show it: message, repr, traceback with its causes."""
        self.exceptions += 1
        chain: BaseException | None = exc
        while chain is not None:
            self.texts += [str(chain), repr(chain), *map(repr, chain.args)]
            chain = chain.__cause__ or (None if chain.__suppress_context__ else chain.__context__)
        self.texts.append("".join(traceback.format_exception(exc)))

    def expect(self, kind: type[BaseException] | tuple[type[BaseException], ...], call: Callable[[], Any]) -> Any:
        """Run `call`, which must raise `kind`; keep the exception's texts."""
        with pytest.raises(kind) as caught:
            call()
        self.exception(caught.value)
        return caught.value

    def everything(self) -> str:
        out, err = self.capfd.readouterr()
        self.texts += [out, err]
        return "\n".join([*self.texts, *self.records.texts])

    def leaks(self, secrets: set[str] | None = None) -> list[str]:
        """The secrets found (masked), in the text as it is, percent-decoded, and inside base64 runs."""
        secrets = emulator_secrets() if secrets is None else secrets
        text = self.everything()
        decoded = [unquote(text)]
        for run in _BASE64_RUN.findall(text):
            try:
                decoded.append(base64.b64decode(run + "=" * (-len(run) % 4)).decode("latin-1"))
            except (binascii.Error, ValueError):
                continue
        found = find_secrets("\n".join([text, *decoded]), secrets)
        return sorted(f"{s[:4]}... ({len(s)} chars)" for s in found)

    def assert_clean(self, *, min_records: int = 1) -> None:
        assert len(self.records.texts) >= min_records, "the scenario logged less than expected: is capture on?"
        assert self.leaks() == []


@pytest.fixture
def seen(capfd: pytest.CaptureFixture[str]) -> Iterator[Seen]:
    with Seen(capfd) as watcher:
        yield watcher


def install_body(box: Sandbox, inst: Any) -> dict[str, Any]:
    return parse_event_body(
        urlencode(payloads.install_form(box.emulator.state, inst)).encode(), "application/x-www-form-urlencoded"
    )


# ---------------------------------------------------------------------------------------------- the checker


def test_the_checker_finds_what_it_looks_for(seen: Seen) -> None:
    """Planted strings (not emulator secrets, so the session guard stays quiet) are found wherever they hide."""
    a, b, c = "p" * 8 + "0123456789abcdef" * 2, "Q" * 50, "deadbeef" * 8
    planted = {a, b, c}
    logging.getLogger("b24_cleanup.test").warning("context %s", "x" + a + "y")
    logging.getLogger("some.library").error("extras", extra={"detail": {"nested": b}})
    print("encoded:", base64.b64encode(f"k={c}".encode()).decode())
    try:
        raise RuntimeError("wrapped") from ValueError(f"cause {a}")
    except RuntimeError as exc:
        seen.exception(exc)
    assert len(seen.leaks(planted)) == 3
    assert find_secrets("no secrets here " + a[:-1], planted) == set()
    assert find_secrets("prefix" + a + "suffix", planted) == {a}  # inside a longer alphanumeric run
    assert find_secrets(f"?refresh_token={c}&x=1", planted) == {c}


# ---------------------------------------------------------------------------------------------- scenarios


def test_the_demo_leaks_nothing(seen: Seen, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo: install registrations, genuine and spoofed uninstalls, sweeps, an expired token, a renamed
    portal, a revoked one, a WRONG_LICENSE queue; its JSON logs, EMF metrics and table."""
    from b24_cleanup.handlers import observability
    from b24_cleanup.ops.demo import run_demo

    before = len(emulator_secrets())
    out = io.StringIO()
    for handler in observability.logger.handlers:  # the demo re-points these streams; undo it afterwards
        if hasattr(handler, "stream"):
            monkeypatch.setattr(handler, "stream", handler.stream)
    run_demo(out)
    run_demo(json_out := io.StringIO(), as_json=True)
    seen.add(out.getvalue(), json_out.getvalue())

    assert "portals ended as expected" in out.getvalue()
    assert json.loads(json_out.getvalue())["secrets_in_logs"] == 0
    assert len(emulator_secrets()) > before + 20  # the demo's emulators are among the secrets searched
    seen.assert_clean(min_records=20)


def test_worker_failure_paths_leak_nothing(box: Sandbox, seen: Seen) -> None:
    """Through the queue and the real worker: revoked, invalid grant, transient failures, timeouts, an OAuth
    server that does not answer, a renamed portal, a permanent unbind failure, a malformed job."""
    from b24_cleanup.handlers import worker

    orphans = [
        {"event": "ONCRMLEADADD", "handler": APP_URL},
        {"event": "ONCRMLEADADD", "handler": OLD_URL, "user_id": 1},
    ]
    revoked = box.add_portal("gone.bitrix24.test", handlers=orphans)
    box.emulator.uninstall(revoked.portal, box.app)
    spent = box.add_portal("spent.bitrix24.test", handlers=orphans, expired=True)
    OAuthClient(box.store.app_credentials()).refresh(box.emulator.oauth_url, spent.installation.refresh_token)
    flaky = box.add_portal("flaky.bitrix24.test", handlers=orphans)
    flaky.portal.fail_next(100, "INTERNAL_SERVER_ERROR")
    slow = box.add_portal("slow.bitrix24.test", handlers=orphans)
    slow.portal.fail_next(100, "timeout")
    blocked = box.add_portal("blocked.bitrix24.test", handlers=orphans)
    blocked.portal.fail_next(100, "OVERLOAD_LIMIT")
    moved = box.add_portal("moved.bitrix24.test", handlers=orphans, expired=True)
    moved.portal.rename("moved-new.bitrix24.test")
    locked = box.add_portal(
        "locked.bitrix24.test", handlers=[*orphans, {"event": "ONCRMLEADADD", "offline": True, "connector_id": "erp"}]
    )
    locked.portal.license_auth_connector = False
    stale = box.add_portal("stale.bitrix24.test", handlers=orphans)
    stale.portal.expire_tokens(box.app)
    members = [p.member_id for p in (revoked, spent, flaky, slow, blocked, moved, locked, stale)]

    sqs = boto3.client("sqs")
    for i, member_id in enumerate(members):
        sqs.send_message(
            QueueUrl=box.queue_url,
            MessageBody=json.dumps(Job(Action.SWEEP, member_id).to_message()),
            MessageGroupId=member_id,
            MessageDeduplicationId=f"leak-{i}",
        )
    sqs.send_message(
        QueueUrl=box.queue_url, MessageBody="{not json", MessageGroupId="bad", MessageDeduplicationId="leak-bad"
    )
    runtime.use_engine(Engine(box.store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=SHORT_TIMEOUTS))
    drain(sqs, box.queue_url, worker.lambda_handler, FakeContext())

    # The same failures raised directly, as the CLI and the app's own code see them.
    engine = Engine(box.store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=SHORT_TIMEOUTS)
    for seeded in (flaky, slow, blocked):
        failed = seen.expect(JobFailedError, lambda s=seeded: engine.run(Job(Action.SWEEP, s.member_id)))
        assert failed.result.outcome is Outcome.FAILED
    expired = box.add_portal("expired.bitrix24.test", expired=True)
    dead = Engine(box.store, orphan_grace_days=0, oauth_url=DEAD_OAUTH, options=SHORT_TIMEOUTS)
    failed = seen.expect(JobFailedError, lambda: dead.run(Job(Action.SWEEP, expired.member_id)))
    assert "OAUTH_UNREACHABLE" in str(failed)
    seen.expect(
        Exception,
        lambda: OAuthClient(box.store.app_credentials()).refresh(
            box.emulator.oauth_url, spent.installation.refresh_token
        ),
    )  # invalid_grant, spent token
    seen.expect(
        Exception,
        lambda: OAuthClient(box.store.app_credentials()).refresh(
            DEAD_OAUTH, box.record(expired.member_id).refresh_token
        ),
    )

    outcomes = {
        r.member_id: r.outcome
        for r in [engine.run(Job(Action.SWEEP, m)) for m in (revoked.member_id, spent.member_id, locked.member_id)]
    }
    assert outcomes == {
        revoked.member_id: Outcome.REVOKED,
        spent.member_id: Outcome.REVOKED,
        locked.member_id: Outcome.INCOMPLETE,
    }
    seen.assert_clean(min_records=10)


def test_endpoint_registration_and_token_access_leak_nothing(
    box: Sandbox, seen: Seen, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Genuine and spoofed uninstalls and installs through the endpoint; rejected registrations; the app-side
    token API refreshing, after expired_token, for an unknown portal and for an uninstalled one."""
    from b24_cleanup.access import PortalNotFoundError
    from b24_cleanup.errors import RegistrationInvalidError, RegistrationRejectedError
    from b24_cleanup.handlers import endpoint

    monkeypatch.setenv("B24_ACCEPT_INSTALL", "true")
    monkeypatch.setenv("B24_OAUTH_URL", box.emulator.oauth_url)
    runtime.reset()

    def post(pairs: list[tuple[str, str]]) -> int:
        event = function_url_event(
            "POST", "/", {"content-type": "application/x-www-form-urlencoded"}, urlencode(pairs).encode()
        )
        return endpoint.lambda_handler(event, FakeContext())["statusCode"]

    state = box.emulator.state
    home = box.add_portal("home.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": APP_URL}])
    assert post(payloads.uninstall_form(state, home.portal, "f" * 32, clean=True)) == 401
    assert post(payloads.uninstall_form(state, home.portal, home.installation.application_token, clean=True)) == 200
    joined = box.emulator.install(box.emulator.add_portal("joined.bitrix24.test"), box.app)
    assert post(payloads.install_form(state, joined)) == 200
    assert post(payloads.install_form(state, joined)) == 401  # replayed: its refresh token is spent
    other = box.emulator.install(box.emulator.add_portal("other.bitrix24.test"), box.emulator.add_app())
    assert post(payloads.install_form(state, other)) == 401  # another app's genuine tokens
    updated = box.emulator.update(joined.portal, box.app)
    assert post(payloads.install_form(state, updated)) == 200
    no_refresh = [(k, v) for k, v in payloads.install_form(state, other) if k != "auth[refresh_token]"]
    assert post(no_refresh) == 400

    fresh = box.emulator.install(box.emulator.add_portal("lib.bitrix24.test"), box.app)
    body = install_body(box, fresh)
    seen.expect(RegistrationRejectedError, lambda: register(body, box.store, oauth_url=DEAD_OAUTH))
    seen.expect(
        RegistrationRejectedError,
        lambda: register(install_body(box, other), box.store, oauth_url=box.emulator.oauth_url),
    )
    liar = install_body(box, box.emulator.install(box.emulator.add_portal("liar.bitrix24.test"), box.app))
    liar["auth"]["member_id"] = "0" * 32  # the OAuth server's answer names another portal
    seen.expect(RegistrationRejectedError, lambda: register(liar, box.store, oauth_url=box.emulator.oauth_url))
    seen.expect(
        RegistrationInvalidError, lambda: register({"event": "ONAPPINSTALL", "auth": {"refresh_token": "x"}}, box.store)
    )
    register(body, box.store, oauth_url=box.emulator.oauth_url)

    tokens = TokenAccess(box.store, oauth_url=box.emulator.oauth_url, settle_seconds=0.01)
    access = tokens.get(fresh.member_id)
    fresh.portal.expire_tokens(box.app)
    again = tokens.after_expired(fresh.member_id, access.access_token)
    seen.add(repr(access), str(access), repr(again))
    seen.expect(PortalNotFoundError, lambda: tokens.get("0" * 32))
    gone = box.add_portal("gone.bitrix24.test", expired=True)
    box.emulator.uninstall(gone.portal, box.app)
    seen.expect(Exception, lambda: tokens.get(gone.member_id))  # refused by the OAuth server, after the re-read
    seen.add(repr(box.record(fresh.member_id)), repr(Job(Action.UNINSTALL, home.member_id, "t" * 32)))
    runtime.reset()
    seen.assert_clean(min_records=8)


def test_cli_outputs_and_errors_leak_nothing(
    box: Sandbox, seen: Seen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command's table and --json output, and the one-line errors of the usual mistakes."""
    dirty = box.add_portal(
        "dirty.bitrix24.test",
        handlers=[{"event": "ONCRMLEADADD", "handler": APP_URL}, {"event": "ONCRMLEADADD", "handler": OLD_URL}],
        expired=True,
    )
    box.add_portal("tidy.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": APP_URL}])
    gone = box.add_portal("gone.bitrix24.test")
    box.emulator.uninstall(gone.portal, box.app)
    genuine = tmp_path / "install.txt"
    genuine.write_text(
        urlencode(
            payloads.install_form(
                box.emulator.state, box.emulator.install(box.emulator.add_portal("cli.bitrix24.test"), box.app)
            )
        )
    )
    as_json = tmp_path / "install.json"
    inst = box.emulator.install(box.emulator.add_portal("cli-json.bitrix24.test"), box.app)
    as_json.write_text(json.dumps(install_body(box, inst)))
    spoofed = tmp_path / "spoofed.txt"
    spoofed.write_text(
        urlencode(
            payloads.install_form(
                box.emulator.state,
                box.emulator.install(box.emulator.add_portal("x.bitrix24.test"), box.emulator.add_app()),
            )
        )
    )
    oauth = ["--oauth-url", box.emulator.oauth_url]
    codes: list[int] = []

    def run(*argv: str) -> None:
        out, err = io.StringIO(), []
        codes.append(cli.main(list(argv), out=out, err=err.append))
        seen.add(out.getvalue(), *err)

    run("plan", "--member-id", dirty.member_id, *oauth)
    run("plan", "--member-id", dirty.member_id, "--json", *oauth)
    run("sweep", "--dry-run", *oauth)
    run("sweep", "--json", *oauth)
    run("sweep", "--member-id", gone.member_id, *oauth)
    run("register", str(genuine), *oauth)
    run("register", str(as_json), "--json", *oauth)
    run("register", str(genuine), *oauth)  # replayed: rejected
    run("register", str(spoofed), *oauth)
    run("register", str(tmp_path / "missing.txt"), *oauth)
    run("plan", "--member-id", "../../app/credentials", *oauth)
    run("plan", "--member-id", "0" * 32, *oauth)
    expired = box.add_portal("dead-oauth.bitrix24.test", expired=True)
    run("sweep", "--member-id", expired.member_id, "--oauth-url", DEAD_OAUTH)
    box.put_declared('{"handlers": [{"event": "ONCRMLEADADD", "handler": "ftp://x"}]}')
    run("sweep", *oauth)
    monkeypatch.delenv("B24_SSM_PREFIX")
    run("sweep")

    assert codes == [0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 1, 2, 2], codes
    seen.assert_clean(min_records=3)


def test_debug_logging_leaks_nothing(box: Sandbox, capfd: pytest.CaptureFixture[str]) -> None:
    from b24_cleanup.handlers import worker

    seeded = box.add_portal(
        "debug.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": OLD_URL}], expired=True
    )
    sqs = boto3.client("sqs")
    sqs.send_message(
        QueueUrl=box.queue_url,
        MessageBody=json.dumps(Job(Action.SWEEP, seeded.member_id).to_message()),
        MessageGroupId=seeded.member_id,
        MessageDeduplicationId="debug",
    )
    runtime.use_engine(Engine(box.store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=SHORT_TIMEOUTS))
    root = logging.getLogger()
    records = _Records()
    # Only this handler sees the DEBUG records: the session guard and pytest's log capture are set aside, so
    # that this known leak is reported by this test alone.
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers[:] = [records]
    root.setLevel(logging.DEBUG)
    try:
        drain(sqs, box.queue_url, worker.lambda_handler, FakeContext())
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    capfd.readouterr()
    leaked = len(find_secrets("\n".join(records.texts), emulator_secrets()))
    records.texts.clear()
    assert leaked == 0, "secrets in DEBUG log records"
