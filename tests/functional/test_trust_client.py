"""Trust under adversity, the client's half (issue 13): where tokens may go, and what a hostile host can do.

Over real loopback HTTP against the emulator (its hostile modes: drip, stall, huge answer, redirect
to another host, https → http) and moto; the worker tests go through the real worker handler.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import FakeLambdaContext, load_event

from b24_cleanup import runtime, transport
from b24_cleanup.access import TokenAccess
from b24_cleanup.engine import Engine, EngineOptions
from b24_cleanup.errors import UntrustedTargetError
from b24_cleanup.handlers import worker
from b24_cleanup.jobs import Action, Job, Outcome
from b24_cleanup.ops.cli import main as cli_main
from b24_cleanup.ops.sandbox import Sandbox, SeededPortal, sandbox
from b24_cleanup.pacing import Backoff

APP_URL = "https://app.example.com/b24/events"
OLD_URL = "https://old-deploy.example.com/b24/events"
DECLARED = [{"event": "ONCRMLEADADD", "handler": APP_URL}]
ROWS = [{"event": "ONCRMLEADADD", "handler": APP_URL}, {"event": "ONCRMLEADADD", "handler": OLD_URL}]
LIMIT = 2.0  # the total time limit of one request in these tests (production: 30 s, OAuth 15 s)
FAST = EngineOptions(
    backoff=Backoff(attempts=3, base=0.01, cap=0.02),
    settle_seconds=0.05,
    timeout=(1.0, LIMIT),
    oauth_timeout=(1.0, LIMIT),
)


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox(declared=DECLARED, rate_limit=False) as sb:
        yield sb


def engine(box: Sandbox, **kwargs: Any) -> Engine:
    kwargs.setdefault("oauth_url", box.emulator.oauth_url)
    kwargs.setdefault("options", FAST)
    kwargs.setdefault("orphan_grace_days", 0)  # the orphans here may go at once (test_held_orphans.py holds them)
    return Engine(box.store, **kwargs)


def sweep(seeded: SeededPortal) -> Job:
    return Job(Action.SWEEP, seeded.member_id)


def foreign_arrivals(box: Sandbox) -> list[Any]:
    return box.emulator.requests_log(kind="foreign")


# ------------------------------------------------------------------------------- item 7: redirects


def test_redirect_to_another_host_is_not_followed_without_oauth_confirmation(box: Sandbox) -> None:
    seeded = box.add_portal("moved.bitrix24.test", handlers=ROWS)
    before = box.record(seeded.member_id)
    seeded.portal.hostile.redirect()  # 302 to the emulator's foreign host, which logs what arrives

    result = engine(box).run(sweep(seeded))

    assert result.outcome is Outcome.INCOMPLETE
    assert "moved to an address the OAuth server does not confirm" in result.reason
    assert foreign_arrivals(box) == []  # the token never went there
    assert result.refreshed == 1  # the one OAuth call that could have confirmed the move
    after = box.record(seeded.member_id)
    assert (after.client_endpoint, after.domain) == (before.client_endpoint, before.domain)
    assert len(seeded.portal.handlers(box.app)) == 2  # nothing unbound


def test_redirect_to_another_host_confirmed_by_the_oauth_server_is_followed_and_stored(box: Sandbox) -> None:
    seeded = box.add_portal("old-name.bitrix24.test", handlers=ROWS)
    old_host = seeded.portal.host
    seeded.portal.rename("new-name.bitrix24.test")  # the old address answers 302 to the new one

    result = engine(box).run(sweep(seeded))

    assert result.outcome is Outcome.CLEANED and result.refreshed == 1
    record = box.record(seeded.member_id)
    assert record.client_endpoint == seeded.portal.client_endpoint and record.domain == seeded.portal.host
    assert seeded.portal.host != old_host
    assert foreign_arrivals(box) == []


def test_a_refresh_made_just_now_decides_a_move_without_another_oauth_call(box: Sandbox) -> None:
    seeded = box.add_portal("due.bitrix24.test", handlers=ROWS, expired=True)
    seeded.portal.hostile.redirect()

    result = engine(box).run(sweep(seeded))

    assert result.outcome is Outcome.INCOMPLETE and result.refreshed == 1  # the due refresh, nothing more
    assert foreign_arrivals(box) == []


def test_an_unconfirmed_redirect_of_a_dry_run_or_an_uninstall_sends_nothing_either(box: Sandbox) -> None:
    seeded = box.add_portal("dry.bitrix24.test", handlers=ROWS)
    seeded.portal.hostile.redirect()
    dry = engine(box, dry_run=True).run(sweep(seeded))
    uninstall = engine(box).run(
        Job(Action.UNINSTALL, seeded.member_id, application_token=seeded.installation.application_token, ts="1")
    )
    assert dry.outcome is Outcome.INCOMPLETE and uninstall.outcome is Outcome.INCOMPLETE
    assert foreign_arrivals(box) == []
    assert box.record(seeded.member_id) is not None  # an uninstall that proved nothing deletes nothing


def test_https_redirect_to_http_is_never_followed() -> None:
    with sandbox(declared=DECLARED, rate_limit=False, tls=True) as box:
        seeded = box.add_portal("tls.bitrix24.test", handlers=ROWS)
        assert seeded.portal.client_endpoint.startswith("https://")
        seeded.portal.hostile.downgrade()  # 302 to the same address over plain http
        http = transport.session()
        http.trust_env = False  # else a CA bundle named in the environment wins over `verify`
        http.verify = box.emulator.ca_file

        result = engine(box, session=http).run(sweep(seeded))

        assert result.outcome is Outcome.INCOMPLETE and "https to http" in result.reason
        arrivals = box.emulator.requests_log(member_id=seeded.member_id, kind="rest")
        assert arrivals and all(entry.scheme == "https" for entry in arrivals)  # nothing came in clear text
        assert result.refreshed == 0  # no OAuth server can make a downgrade acceptable


# ----------------------------------------------------------------- item 8: the trusted OAuth URL

UNTRUSTED_SERVER_ENDPOINTS = [
    "http://oauth.bitrix.info/rest/",
    "https://oauth.bitrix.info:8443/rest/",
    "https://user:pw@oauth.bitrix.info/rest/",
    "https://oauth.bitrix.info.evil.example/rest/",
    "https://oauth.bitrix.info@evil.example/rest/",
    "https://evil.example/oauth.bitrix.info/rest/",
    "https://\u043eauth.bitrix.info/rest/",
    "//oauth.bitrix.info/rest/",
    "https://127.0.0.1/rest/",
    "not a url",
    "",
]


@pytest.mark.parametrize("where", ["the emulator's own OAuth server", "a foreign host", *UNTRUSTED_SERVER_ENDPOINTS])
def test_untrusted_server_endpoint_in_any_record_never_receives_the_client_secret(box: Sandbox, where: str) -> None:
    """A record the app's own install flow wrote (not registration): no B24_OAUTH_URL, a due token."""
    server_endpoint = {
        "the emulator's own OAuth server": box.emulator.server_endpoint,
        "a foreign host": box.emulator.foreign_endpoint(),
    }.get(where, where)
    seeded = box.add_portal("app-wrote-it.bitrix24.test", handlers=ROWS, expired=True)
    box.store.modify(seeded.member_id, lambda record: record.data.update(server_endpoint=server_endpoint) is None)

    result = engine(box, oauth_url=None).run(sweep(seeded))

    assert result.outcome is Outcome.INCOMPLETE and "untrusted server_endpoint" in result.reason
    assert box.emulator.requests_log(kind="oauth") == [] and foreign_arrivals(box) == []
    assert box.emulator.requests_log(kind="rest") == []  # a due token is not used either
    assert result.refreshed == 0


def test_token_access_refuses_an_untrusted_server_endpoint(box: Sandbox) -> None:
    seeded = box.add_portal("backend.bitrix24.test", expired=True)
    with pytest.raises(UntrustedTargetError) as caught:
        TokenAccess(box.store).get(seeded.member_id)  # the record names the emulator, no B24_OAUTH_URL
    assert "untrusted server_endpoint" in str(caught.value)
    assert box.emulator.requests_log(kind="oauth") == []
    assert TokenAccess(box.store, oauth_url=box.emulator.oauth_url).get(seeded.member_id).access_token


# ---------------------------------------------------------- item 9: a hostile portal, through the worker


def _worker_event(jobs: list[Job]) -> dict[str, Any]:
    template = load_event("worker_sweep.json")["Records"][0]
    records = []
    for number, job in enumerate(jobs):
        record = copy.deepcopy(template)
        record["messageId"] = f"m-{number}"
        record["body"] = json.dumps(job.to_message())
        record["attributes"]["MessageGroupId"] = job.member_id
        records.append(record)
    return {"Records": records}


HOSTILE_MODES = {
    "drip": lambda hostile: hostile.drip(0.25),
    "stall": lambda hostile: hostile.stall(),
    "slow then silent": lambda hostile: hostile.stall(LIMIT * 4, execute=True),
    "huge": lambda hostile: hostile.huge(12 * 1024 * 1024),
    "huge, no length": lambda hostile: hostile.huge(12 * 1024 * 1024, declare_length=False),
}


@pytest.mark.parametrize("mode", list(HOSTILE_MODES))
def test_a_hostile_portal_fails_only_its_own_job_in_a_batch_of_ten(box: Sandbox, mode: str) -> None:
    portals = [box.add_portal(f"p{i}.bitrix24.test", handlers=ROWS) for i in range(10)]
    hostile = portals[3]
    HOSTILE_MODES[mode](hostile.portal.hostile)
    runtime.use_engine(engine(box))
    try:
        started = time.monotonic()
        answer = worker.process(_worker_event([sweep(p) for p in portals]), FakeLambdaContext())
        elapsed = time.monotonic() - started
    finally:
        runtime.reset()

    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-3"}]}  # transient: SQS retries it
    for seeded in portals:
        expected = 2 if seeded is hostile else 1
        assert len(seeded.portal.handlers(box.app)) == expected, seeded.portal.domain
    # One request's limit (never retried within the job) plus the nine others' work, never more.
    assert elapsed < LIMIT + 3.0, elapsed


def test_a_hostile_oauth_server_fails_the_refresh_transiently_and_in_time(box: Sandbox) -> None:
    portals = [box.add_portal(f"o{i}.bitrix24.test", handlers=ROWS, expired=(i == 0)) for i in range(3)]
    box.emulator.oauth_hostile.drip(0.25)
    runtime.use_engine(engine(box))
    try:
        started = time.monotonic()
        answer = worker.process(_worker_event([sweep(p) for p in portals]), FakeLambdaContext())
        elapsed = time.monotonic() - started
    finally:
        runtime.reset()
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-0"}]}
    assert elapsed < 3 * LIMIT + 2.0, elapsed  # bounded tries of a bounded request


def _endless_server() -> tuple[str, threading.Event]:
    """Answers every request with headers and then a body that never ends (no length), 1 MiB at a time."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    block = b"[" + b"0," * (512 * 1024)

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
                try:
                    while not stop.is_set():
                        conn.sendall(block)
                except OSError:
                    continue  # the client hung up: what it should do
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/rest/event.get", stop


def test_an_endless_answer_is_read_no_further_than_the_size_cap() -> None:
    url, stop = _endless_server()
    try:
        tracemalloc.start()
        with pytest.raises(transport.AnswerTooLargeError):
            transport.bounded(transport.session(), "POST", url, limit=30.0, json={})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        stop.set()
    assert peak < transport.MAX_ANSWER_BYTES + 4 * 1024 * 1024  # the cap and a chunk, not the stream


# ---------------------------------------------------------------- item 12: the worker logs no event


@pytest.fixture
def worker_with_log_event_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # Powertools reads POWERTOOLS_LOGGER_LOG_EVENT when the handler is decorated: at import.
    monkeypatch.setenv("POWERTOOLS_LOGGER_LOG_EVENT", "true")
    module = importlib.reload(worker)
    yield module
    monkeypatch.delenv("POWERTOOLS_LOGGER_LOG_EVENT")
    importlib.reload(worker)


def test_the_worker_never_logs_its_event_even_with_log_event_on(
    box: Sandbox, worker_with_log_event_on: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    for key, value in box.env().items():
        monkeypatch.setenv(key, value)
    runtime.reset()
    seeded = box.add_portal("logged.bitrix24.test", handlers=ROWS)
    token = seeded.installation.application_token
    job = Job(Action.UNINSTALL, seeded.member_id, application_token=token, ts="1")
    try:
        worker_with_log_event_on.lambda_handler(_worker_event([job]), FakeLambdaContext())
    finally:
        runtime.reset()
    out = capsys.readouterr().out
    assert seeded.member_id in out  # the handler did log its work
    assert token not in out


# -------------------------------------------- suspected: answers no real server gives, after the token is spent


@pytest.mark.parametrize(
    "patch",
    [
        {"expires": float("inf"), "expires_in": float("inf")},
        {"expires": float("nan"), "expires_in": "soon"},
        {"expires": 10**30, "expires_in": -5},
        {"expires": True},
    ],
    ids=["Infinity", "NaN", "absurd", "bool"],
)
def test_an_oauth_answer_with_an_absurd_expires_still_stores_the_pair(box: Sandbox, patch: dict[str, Any]) -> None:
    seeded = box.add_portal("inf.bitrix24.test", handlers=ROWS, expired=True)
    box.emulator.state.oauth_patch.update(patch)

    result = engine(box).run(sweep(seeded))

    assert result.outcome is Outcome.CLEANED and result.refreshed == 1
    record = box.record(seeded.member_id)
    assert record.refresh_token == box.emulator.state.latest_tokens(seeded.installation.chain).refresh_token
    assert time.time() < record.expires <= time.time() + 3700  # believed as the hour a token lives


@pytest.mark.parametrize("endpoint", ["http://[not-a-url", "not a url", "https://", "https://u@evil.example/rest/", 42])
def test_an_oauth_answer_with_a_non_url_client_endpoint_keeps_the_stored_address(box: Sandbox, endpoint: Any) -> None:
    seeded = box.add_portal("nonurl.bitrix24.test", handlers=ROWS, expired=True)
    before = box.record(seeded.member_id)
    box.emulator.state.oauth_patch["client_endpoint"] = endpoint

    result = engine(box).run(sweep(seeded))

    assert result.outcome is Outcome.CLEANED
    record = box.record(seeded.member_id)
    assert (record.client_endpoint, record.domain) == (before.client_endpoint, before.domain)
    assert record.refresh_token == box.emulator.state.latest_tokens(seeded.installation.chain).refresh_token


def test_a_batch_count_of_infinity_reaches_an_outcome(box: Sandbox) -> None:
    seeded = box.add_portal("count.bitrix24.test", handlers=ROWS)
    seeded.portal.patch_result("event.unbind", count=float("inf"))

    result = engine(box).run(sweep(seeded))

    assert result.outcome is Outcome.CLEANED and result.unbound == 0  # an unreadable count removed nothing
    assert len(seeded.portal.handlers(box.app)) == 1


def test_remote_error_description_is_scrubbed_in_reasons_logs_and_cli_output(
    box: Sandbox, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    seeded = box.add_portal("echo.bitrix24.test", handlers=ROWS)
    token = box.record(seeded.member_id).access_token
    echo = f"your token {token} and\nyour app {seeded.installation.application_token} are refused"
    seeded.portal.fail_next(2, "ACCESS_DENIED", 403, methods={"event.get"}, description=echo)

    result = engine(box).run(sweep(seeded))
    assert result.outcome is Outcome.INCOMPLETE and "ACCESS_DENIED" in result.reason
    assert token not in result.reason and "[redacted]" in result.reason and "\n" not in result.reason

    monkeypatch.setenv("B24_SSM_PREFIX", box.prefix)
    out, err = io.StringIO(), []
    code = cli_main(["sweep", "--member-id", seeded.member_id, "--json"], out=out, err=err.append)
    printed = out.getvalue() + "\n".join(err) + capsys.readouterr().out
    assert code != 0 and "ACCESS_DENIED" in printed
    assert token not in printed and seeded.installation.application_token not in printed
