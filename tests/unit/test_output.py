"""The operator's progress and tables (ops/output.py): thread-safe, with ETA and running counts."""

from __future__ import annotations

import io
import re
import threading

import pytest

from b24_cleanup.jobs import Action, JobResult, Outcome
from b24_cleanup.ops.output import RESULT_HEADER, Progress, result_row, table


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_without_a_tty_progress_is_plain_lines_with_counts_and_eta() -> None:
    stream, clock = io.StringIO(), Clock()
    with Progress(10, label="sweep", stream=stream, interval=5.0, clock=clock) as progress:
        assert progress.mode == "lines"  # a StringIO is no terminal
        for i in range(10):
            clock.now += 1.0
            progress.advance("cleaned" if i % 2 else "clean")
    lines = stream.getvalue().splitlines()
    # one line after 5 s (5 of 10 done, 5 s to go at that pace) and one at the end
    assert lines[0] == "sweep: 5/10 (50%): clean 3, cleaned 2, about 5 s left"
    assert lines[-1] == "sweep: 10/10 (100%): clean 5, cleaned 5 in 10 s"
    assert len(lines) == 2


def test_progress_off_writes_nothing() -> None:
    stream = io.StringIO()
    with Progress(3, stream=stream, mode="off") as progress:
        for _ in range(3):
            progress.advance("clean")
    assert stream.getvalue() == ""
    with pytest.raises(ValueError, match="unknown progress mode"):
        Progress(1, mode="fancy")


def test_many_threads_never_make_the_count_go_backwards() -> None:
    stream = io.StringIO()
    total, threads = 400, 8
    with Progress(total, stream=stream, interval=0.0) as progress:

        def work() -> None:
            for _ in range(total // threads):
                progress.advance("clean")

        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    done = [int(m) for m in re.findall(r"portals: (\d+)/400", stream.getvalue())]
    assert done == sorted(done) and done[-1] == total
    assert progress.outcomes["clean"] == total


def test_on_a_terminal_a_rich_bar_shows_eta_and_outcome_counts() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    with Progress(4, label="sweep", stream=stream) as progress:
        assert progress.mode == "bar"
        for outcome in ("cleaned", "clean", "clean", "failed"):
            progress.advance(outcome)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())
    assert "4/4" in text and "ETA" in text
    assert "clean 2, cleaned 1, failed 1" in text


def test_the_result_table_shows_the_domain_and_flags_nothing_declared_bound() -> None:
    r = JobResult(Action.SWEEP, "a" * 32, Outcome.CLEAN, domain="shop.bitrix24.com", found=0, kept=0, missing=3)
    row = dict(zip(RESULT_HEADER, result_row(r), strict=True))
    assert row["domain"] == "shop.bitrix24.com"
    assert row["note"] == "none of the declared handlers is bound (3 missing)"
    text = table([result_row(r)], RESULT_HEADER)
    assert text.splitlines()[0].split()[:3] == ["member_id", "domain", "outcome"]
