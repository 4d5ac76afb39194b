"""The session-wide leak guard (design §7): a plugin that fails the run when any test leaked a secret.

Why a guard on top of tests/resilience/test_leaks.py: that module checks the failure paths it names; the
guard checks every other test too, for free, so a leak that a new feature adds to a path nobody wrote a
leak scenario for still fails CI. It knows every token, refresh token, client secret and application
token that any emulator of this session issued (each emulator registers itself: a small wrap of
`State.__init__`), keeps a handler on the root and `b24_cleanup` loggers (message, extras, traceback),
and scans each test's log records, its captured output and a failed test's report as the test ends, so
memory stays flat. A hit fails the session (exit status 1) and names the test and the kind of output,
never the secret. tests/resilience/test_leakguard.py proves that a leaking test does fail the run.

Registered from tests/conftest.py (`pytest_plugins`); test_leaks.py uses `find_secrets` and
`emulator_secrets` for its own, deeper search.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
import weakref
from typing import Any

import pytest

_SECRET_RUN = re.compile(r"[A-Za-z0-9]{16,}")
STANDARD_RECORD_KEYS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def find_secrets(text: str, secrets: set[str] | frozenset[str]) -> set[str]:
    """The members of `secrets` that occur in `text`, in one pass over the text.

    Emulator secrets are long runs of letters and digits (hex tokens, 50-character client secrets), so
    each maximal alphanumeric run of the text is checked against them by length; any other secret of
    8 characters or more is searched for directly.
    """
    plain = {s for s in secrets if len(s) >= 16 and s.isascii() and s.isalnum()}
    found = {s for s in secrets if len(s) >= 8 and s not in plain and s in text}
    if not plain:
        return found
    lengths = sorted({len(s) for s in plain})
    for match in _SECRET_RUN.finditer(text):
        run = match.group()
        for size in lengths:
            if size > len(run):
                break
            for start in range(len(run) - size + 1):
                if run[start : start + size] in plain:
                    found.add(run[start : start + size])
    return found


def _issued(parts: tuple[Any, ...]) -> set[str]:
    """What a State held when it died (its token tables, apps and application tokens)."""
    access, refresh, apps, application_tokens = parts
    return set(access) | set(refresh) | {app.client_secret for app in apps.values()} | set(application_tokens)


class LeakGuard(logging.Handler):
    """Keeps the formatted records of the running test and every secret the session's emulators issued."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.texts: list[str] = []
        self.tracked: list[tuple[Any, tuple[Any, ...] | None]] = []
        self.harvested: set[str] = set()
        self.findings: list[tuple[str, str, str]] = []  # (where, what, masked secret)
        self._last: logging.LogRecord | None = None
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        # Powertools adds a filter to every root handler that drops its own records on their way up
        # (log deduplication); the guard must see them all.
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if record is self._last:  # the same record again, on its way up to the root logger
            return
        self._last = record
        try:
            text = self.format(record)
        except Exception:
            text = f"{record.msg!r} {record.args!r}"
        extras = {k: v for k, v in record.__dict__.items() if k not in STANDARD_RECORD_KEYS}
        if extras:
            text += " " + repr(extras)
        with self._lock:
            self.texts.append(text)

    def track(self, state: Any) -> None:
        # The tables, not the State: a dead emulator's log and servers are freed, its secrets kept.
        try:
            parts: tuple[Any, ...] | None = (state._access, state._refresh, state.apps, state._application_tokens)
            ref: Any = weakref.ref(state)
        except AttributeError:  # the emulator changed shape: hold it, and ask it through secrets()
            parts, ref = None, (lambda: state)
        with self._lock:
            self.tracked.append((ref, parts))

    def secrets(self) -> set[str]:
        """Every secret issued so far (live emulators through their public `secrets()`)."""
        with self._lock:
            tracked, self.tracked = self.tracked, []
        keep = []
        for ref, parts in tracked:
            state = ref()
            self.harvested |= state.secrets() if state is not None else _issued(parts or ((), (), {}, ()))
            if state is not None:
                keep.append((ref, parts))
        with self._lock:
            self.tracked = keep + self.tracked
        return set(self.harvested)

    def scan(self, where: str, what: str, texts: list[str], secrets: set[str]) -> None:
        if not texts or not secrets:
            return
        for secret in sorted(find_secrets("\n".join(texts), secrets)):
            self.findings.append((where, what, f"{secret[:4]}... ({len(secret)} chars)"))

    def take_texts(self) -> list[str]:
        with self._lock:
            texts, self.texts = self.texts, []
        return texts

    def verdict(self) -> list[str]:
        """The lines that fail the session (none when nothing leaked): where, what kind, the secret masked."""
        if not self.findings:
            return []
        lines = [f"LEAK GUARD: secrets issued by the emulator appeared {len(self.findings)} time(s) (design §7):"]
        return lines + [f"  {where}: {what}: {masked}" for where, what, masked in self.findings]


_LEAK_GUARD = LeakGuard()
# The root logger sees what propagates (the Powertools logger `b24-cleanup` included); `b24_cleanup` does
# not propagate. The guard stays off the Powertools logger itself: code that re-points that logger's
# stream handlers (the demo, the benchmarks) walks its handler list.
_GUARDED_LOGGERS = ("", "b24_cleanup")


def emulator_secrets() -> set[str]:
    """Every token, client secret and application token issued by any emulator of this session so far."""
    return _LEAK_GUARD.secrets()


def _register_emulators() -> None:
    from b24_cleanup.ops.emulator import state as emulator_state

    original = emulator_state.State.__init__
    if getattr(original, "_leak_guard", False):
        return

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _LEAK_GUARD.track(self)

    init._leak_guard = True  # type: ignore[attr-defined]
    emulator_state.State.__init__ = init  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    _register_emulators()
    for name in _GUARDED_LOGGERS:
        logging.getLogger(name).addHandler(_LEAK_GUARD)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    texts = [content for _, content in report.sections]
    if report.failed:
        texts.append(report.longreprtext)
    _LEAK_GUARD.scan(report.nodeid, f"{report.when}: report and captured output", texts, _LEAK_GUARD.secrets())


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _LEAK_GUARD.scan(nodeid, "log records", _LEAK_GUARD.take_texts(), _LEAK_GUARD.secrets())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    guard = _LEAK_GUARD
    guard.scan("(outside tests)", "log records", guard.take_texts(), guard.secrets())
    for name in _GUARDED_LOGGERS:
        logging.getLogger(name).removeHandler(guard)
    lines = guard.verdict()
    if lines:
        print("\n" + "\n".join(lines), file=sys.stderr)
        session.exitstatus = 1
