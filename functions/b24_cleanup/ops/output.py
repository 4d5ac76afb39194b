"""What the operator reads: plain tables, result rows and totals, a progress line on a TTY."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

from ..jobs import JobResult


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain text table: readable in a terminal and in a CI log."""
    cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


RESULT_HEADER = ("member_id", "outcome", "found", "unbound", "kept", "missing", "failed", "refreshed", "rest", "note")


def result_row(r: JobResult) -> tuple[object, ...]:
    return (
        r.member_id,
        r.outcome.value,
        r.found,
        r.unbound,
        r.kept,
        r.missing,
        r.unbind_failed,
        r.refreshed,
        r.rest_calls,
        r.reason,
    )


def totals(results: Iterable[JobResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        for name, value in r.metrics().items():
            out[name] = out.get(name, 0) + value
    return out


class Progress:
    """A one-line progress bar on stderr, only where a person is watching (a TTY)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, enabled: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // max(self.total, 1)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
