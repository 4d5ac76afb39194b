"""The session-wide leak guard (tests/leakguard.py) catches what it is there for: a run in which a test
logs or prints a secret an emulator issued fails, names the test and the kind of output, and never
shows the secret; a run without a leak passes.

The end-to-end check runs pytest in a subprocess: a leak planted in this process would (rightly) fail
this very session.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from leakguard import LeakGuard

TESTS = Path(__file__).resolve().parents[1]
FUNCTIONS = TESTS.parent / "functions"

_INNER = """
import logging
from pathlib import Path

from b24_cleanup.ops.emulator.state import State


def _issued():
    state = State()
    app = state.add_app()
    inst = state.install(state.add_portal("leaky.bitrix24.test"), app)
    with Path("issued.txt").open("a") as issued:  # for the outer test: the secrets must not show
        issued.writelines(f"{secret}\\n" for secret in state.secrets())
    return state, app, inst


def test_logs_a_refresh_token():
    _, _, inst = _issued()
    logging.getLogger("b24_cleanup.inner").warning("refreshed with %s", inst.tokens.refresh_token)


def test_prints_a_client_secret():
    _, app, _ = _issued()
    print("configured", app.client_secret)


def test_names_only_the_portal():
    _, _, inst = _issued()
    logging.getLogger("b24_cleanup.inner").warning("refreshed portal %s", inst.portal.member_id)
    print("member", inst.portal.member_id)
"""


def _inner_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str) -> pytest.RunResult:
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}:{FUNCTIONS}")
    pytester.makepyfile(test_inner=_INNER)
    return pytester.runpytest_subprocess("-p", "leakguard", "-p", "no:cacheprovider", *args)


@pytest.mark.slow
def test_a_leaking_test_fails_the_run_and_the_secret_stays_hidden(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _inner_run(pytester, monkeypatch)

    assert result.ret == 1
    result.assert_outcomes(passed=3)  # the tests themselves pass: the guard fails the run
    err = result.stderr.str()
    assert "LEAK GUARD: secrets issued by the emulator appeared" in err
    assert "test_inner.py::test_logs_a_refresh_token: log records:" in err
    assert "test_inner.py::test_prints_a_client_secret: call: report and captured output:" in err
    assert "test_names_only_the_portal" not in err
    shown = result.stdout.str() + err
    issued = (pytester.path / "issued.txt").read_text().split()
    assert issued and not [secret for secret in issued if secret in shown]


@pytest.mark.slow
def test_a_run_without_a_leak_passes(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _inner_run(pytester, monkeypatch, "-k", "names_only_the_portal")

    assert result.ret == 0
    assert "LEAK GUARD" not in result.stderr.str()


def test_the_guard_records_a_logged_secret_with_its_test_and_masks_it() -> None:
    guard = LeakGuard()
    secret = "0123456789abcdef" * 4
    guard.track(SimpleNamespace(secrets=lambda: {secret}))  # any emulator-shaped object
    logger = logging.getLogger("leakguard.selftest")
    logger.propagate, logger.level = False, logging.DEBUG
    logger.addHandler(guard)
    try:
        logger.warning("pair %s", {"refresh_token": secret})
        logger.warning("nothing to see")
    finally:
        logger.removeHandler(guard)

    guard.scan("t.py::test_x", "log records", guard.take_texts(), guard.secrets())
    guard.scan("t.py::test_y", "call: report and captured output", ["no secret here"], guard.secrets())

    assert guard.findings == [("t.py::test_x", "log records", "0123... (64 chars)")]
    verdict = "\n".join(guard.verdict())
    assert "t.py::test_x: log records: 0123... (64 chars)" in verdict
    assert secret not in verdict
    assert LeakGuard().verdict() == []
