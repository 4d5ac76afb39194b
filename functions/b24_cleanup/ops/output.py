"""What the operator reads: plain tables, result rows and totals, and progress on long runs.

Tables stay plain text (readable in a terminal, a CI log and `grep`). Progress uses `rich` on a
terminal (a bar with ETA and running outcome counts) and periodic plain lines otherwise, so that
a sweep of thousands of portals in CI or under `nohup` is not silent for minutes. `rich` is an
operator-only dependency: only this module imports it, never the Lambda code.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TextIO

from ..jobs import JobResult, Outcome


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain text table: readable in a terminal and in a CI log."""
    cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


RESULT_HEADER = (
    "member_id",
    "domain",
    "outcome",
    "found",
    "unbound",
    "kept",
    "missing",
    "failed",
    "refreshed",
    "rest",
    "note",
)


def result_note(r: JobResult) -> str:
    """The reason, and what the counts alone would hide: `clean` with no declared handler bound."""
    notes = [r.reason] if r.reason else []
    if r.missing and not r.kept and r.outcome in (Outcome.CLEAN, Outcome.CLEANED):
        notes.append(f"none of the declared handlers is bound ({r.missing} missing)")
    return "; ".join(notes)


def result_row(r: JobResult) -> tuple[object, ...]:
    return (
        r.member_id,
        r.domain or "-",
        r.outcome.value,
        r.found,
        r.unbound,
        r.kept,
        r.missing,
        r.unbind_failed,
        r.refreshed,
        r.rest_calls,
        result_note(r),
    )


def totals(results: Iterable[JobResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        for name, value in r.metrics().items():
            out[name] = out.get(name, 0) + value
    return out


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Progress of a run over many portals; `advance` may be called from any thread.

    mode `bar`: a rich progress bar (ETA, running outcome counts); `lines`: a plain line every
    `interval` seconds and one at the end; `off`: nothing; `auto`: `bar` on a terminal, else
    `lines`. Everything goes to `stream` (stderr by default), so stdout stays the report.
    """

    def __init__(
        self,
        total: int,
        *,
        label: str = "portals",
        stream: TextIO | None = None,
        mode: str = "auto",
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.interval = interval
        self.clock = clock
        self.done = 0
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._started = clock()
        self._last_line = self._started
        self._bar: Any = None
        self._task: Any = None

    # -- context ----------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            console = Console(file=self.stream, force_terminal=True)
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[counts]}"),
                console=console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, counts="")
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.mode == "lines" and self.done:
            with self._lock:
                self._write_line()

    # -- progress ---------------------------------------------------------------------------
    def counts_text(self) -> str:
        return ", ".join(f"{name} {n}" for name, n in sorted(self.outcomes.items(), key=lambda kv: (-kv[1], kv[0])))

    def eta(self) -> float | None:
        """Seconds left at the pace so far; None before the first portal is done."""
        if not self.done:
            return None
        elapsed = self.clock() - self._started
        return elapsed / self.done * (self.total - self.done)

    def advance(self, outcome: str | None = None) -> None:
        """One portal done (with its outcome, if known). Thread-safe: counts never go backwards."""
        with self._lock:
            self.done += 1
            if outcome:
                self.outcomes[outcome] += 1
            if self._bar is not None:
                # Under the lock: two threads never interleave their updates (the bar never
                # shows an older count after a newer one).
                self._bar.update(self._task, completed=self.done, counts=self.counts_text())
            elif self.mode == "lines" and self.done < self.total and self.clock() - self._last_line >= self.interval:
                self._write_line()

    step = advance  # the name older callers use

    def _write_line(self) -> None:
        now = self.clock()
        self._last_line = now
        pct = 100 * self.done // max(self.total, 1)
        eta = self.eta()
        tail = (
            f", about {_duration(eta)} left"
            if eta is not None and self.done < self.total
            else f" in {_duration(now - self._started)}"
        )
        counts = self.counts_text()
        self.stream.write(f"{self.label}: {self.done}/{self.total} ({pct}%){': ' + counts if counts else ''}{tail}\n")
        self.stream.flush()
