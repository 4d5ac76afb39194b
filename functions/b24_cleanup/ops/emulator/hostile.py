"""Hostile-host modes: what a portal (or the OAuth server) run by someone unfriendly can do on the wire.

Each portal has `portal.hostile`, the OAuth server has `emulator.oauth_hostile`; one mode at a time,
for every request or for the next `times` requests:

- `drip(interval)`: the real answer (the request is executed), sent one byte every `interval`
  seconds — status line and headers included, so a per-read timeout never fires;
- `stall(delay=None)`: the request is read and then nothing is answered, ever (`delay=None`: the
  connection is held until the client goes away or the emulator stops) or only after `delay`
  seconds; `execute=True` runs the request first (a slow portal), else it never runs;
- `huge(size)`: the real answer padded to `size` bytes of valid JSON (default 10 MiB);
  `declare_length=False` sends no Content-Length and ends the body by closing the connection;
- `redirect(location=None)`: 302 to another host without executing; by default to the
  emulator's *foreign host*, a loopback address that answers everything with a plausible success
  and logs (kind `foreign`) what arrived there — whether a token came along included;
- `downgrade()`: a request that arrived over https answers 302 to the same address over plain
  http (the emulator serves both on one port), without executing; over http it runs normally, so a
  client that followed is seen arriving without TLS (`LogEntry.scheme == "http"`).

The modes work on the HTTP layer only; what a mode did is in the request log (`LogEntry.hostile`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

MODES = ("drip", "stall", "huge", "redirect", "downgrade")
DEFAULT_HUGE = 10 * 1024 * 1024


@dataclass(frozen=True)
class Plan:
    """What one request gets (a snapshot: changing the mode later does not affect it)."""

    mode: str
    interval: float = 0.5
    delay: float | None = None
    execute: bool = False
    size: int = DEFAULT_HUGE
    declare_length: bool = True
    location: str | None = None


class Hostility:
    """The hostile mode of one host; settable from tests at any time, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plan: Plan | None = None
        self._remaining: int | None = None

    def __repr__(self) -> str:
        return f"Hostility({self._plan!r}, remaining={self._remaining})"

    @property
    def mode(self) -> str | None:
        with self._lock:
            return self._plan.mode if self._plan else None

    def _set(self, plan: Plan, times: int | None) -> None:
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None: every request)")
        with self._lock:
            self._plan, self._remaining = plan, times

    def drip(self, interval: float = 0.5, *, times: int | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._set(Plan("drip", interval=interval), times)

    def stall(self, delay: float | None = None, *, execute: bool = False, times: int | None = None) -> None:
        if delay is not None and delay < 0:
            raise ValueError("delay must be >= 0")
        self._set(Plan("stall", delay=delay, execute=execute), times)

    def huge(self, size: int = DEFAULT_HUGE, *, declare_length: bool = True, times: int | None = None) -> None:
        if size < 1024:
            raise ValueError("a huge answer is at least 1 KiB")
        self._set(Plan("huge", size=size, declare_length=declare_length), times)

    def redirect(self, location: str | None = None, *, times: int | None = None) -> None:
        """302 to `location` (a URL prefix: the request's path tail and query are appended when it
        ends with `/`), default the emulator's foreign host."""
        self._set(Plan("redirect", location=location), times)

    def downgrade(self, *, times: int | None = None) -> None:
        self._set(Plan("downgrade"), times)

    def clear(self) -> None:
        with self._lock:
            self._plan, self._remaining = None, None

    def take(self) -> Plan | None:
        """The plan for the request now arriving (counts it against `times`)."""
        with self._lock:
            plan = self._plan
            if plan is None:
                return None
            if self._remaining is not None:
                self._remaining -= 1
                if self._remaining <= 0:
                    self._plan, self._remaining = None, None
            return replace(plan)
