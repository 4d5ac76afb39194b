"""The benchmarks cannot rot: `python -m bench.run --quick` runs end to end and sits on the request bound.

The full benchmark takes minutes and stays out of the suite; the quick one takes seconds.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
from fixtures.aws import ROOT

HEADERS = [
    "1. REST requests per portal",
    "2. Sweep throughput",
    "3. Pacing",
    "4. Cold start",
    "5. Scheduler at scale",
]


def _table(output: str, header: str) -> list[list[str]]:
    """The data rows of the table under `header` (columns split on two or more spaces)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    columns = len(re.split(r"\s{2,}", lines[start + 1].strip()))
    rows = []
    for line in lines[start + 3 :]:  # title, column names, dashes; the notes below have other shapes
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != columns:
            break
        rows.append(cells)
    return rows


@pytest.mark.slow
def test_quick_benchmark_runs_and_every_portal_sits_on_the_request_bound() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT_URL", "B24_"))}
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for header in HEADERS:
        assert header in out, f"missing table {header!r}"
    assert "CPU:" in out and "Python 3." in out

    rows = _table(out, HEADERS[0])
    assert {(int(r[0]), r[1]) for r in rows} == {(k, t) for k in (0, 10, 60, 300) for t in ("fresh", "expired")}
    for k_text, token, rest, oauth, total, bound, naive, _ratio, on_bound, _ms in rows:
        k, expired = int(k_text), token == "expired"
        assert int(rest) == 1 + math.ceil(k / 50), rows
        assert int(oauth) == int(expired), rows
        assert int(total) == int(bound) == 1 + math.ceil(k / 50) + int(expired), rows
        assert int(naive) == 1 + k + int(expired)
        assert on_bound == "yes", rows

    sweep = _table(out, HEADERS[1])
    assert sweep[0][5] == "2.00"  # requests per portal of the project's sweep: 1 event.get + 1 batch
    scheduler = _table(out, HEADERS[4])
    assert all(row[3] == "yes" for row in scheduler), scheduler
    # Sweeps at the AWS limit (bench/quota.py): one line per store, nothing lost or dead-lettered.
    quota = [line for line in out.splitlines() if line.startswith("quota: ")]
    assert [line.split()[1] for line in quota] == ["store=ssm", "store=dynamodb"], quota
    for line in quota:
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        assert set(fields) == {
            "store", "portals", "write_rate", "achieved", "ratio", "lost", "failed", "dlq", "wall", "bound"
        }  # fmt: skip
        assert (fields["lost"], fields["dlq"]) == ("0", "0"), line
    # Racing writers (bench/races.py): every shape for both stores; two writers one change each lose nothing.
    lines = [line for line in out.splitlines() if line.startswith("races: ")]
    races = [dict(part.split("=", 1) for part in line.split()[1:]) for line in lines]
    assert [(r["store"], r["writers"], r["changes"]) for r in races] == [
        (store, w, c) for store in ("ssm", "dynamodb") for w, c in (("2", "1"), ("3", "1"), ("2", "3"))
    ], races
    sure = [r for r in races if r["store"] == "dynamodb" or (r["writers"], r["changes"]) == ("2", "1")]
    assert all(r["lost"] == "0" for r in sure), races
