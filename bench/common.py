"""What the benchmark tables share: the app's declared set, the rows every seeded portal carries, the
fake AWS environment, the table printer and the small statistics.

Each table is its own module (bench/requests_per_portal.py, sweep.py, pacing.py, cold_start.py,
scheduler.py); bench/run.py runs them. A new table is a module with NAME, TITLE, Sizes, FULL, QUICK and
`measure(sizes, runs)`, listed once in bench/run.py's TABLES.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

APP_URL = "https://app.example.com/b24/events"
UNINSTALL_URL = "https://app.example.com/b24/uninstall"
# The app's declared set; every seeded portal also carries these five rows (kept by the sweep).
DECLARED = [
    {"event": "ONAPPUNINSTALL", "handler": UNINSTALL_URL},
    {"event": "ONCRMLEADADD", "handler": APP_URL},
    {"event": "ONCRMDEALADD", "handler": APP_URL},
    {"event": "ONCRMCONTACTADD", "handler": APP_URL},
    {"event": "ONCRMDEALUPDATE", "event_type": "offline"},
]
KEPT_ROWS = [
    {"event": "ONAPPUNINSTALL", "handler": UNINSTALL_URL},
    {"event": "ONCRMLEADADD", "handler": APP_URL},
    {"event": "ONCRMDEALADD", "handler": APP_URL},
    {"event": "ONCRMCONTACTADD", "handler": APP_URL},
    {"event": "ONCRMDEALUPDATE", "offline": True},
]
BATCH_LIMIT = 50  # commands per `batch` request (design §10.9)
SQS_BATCH = 10  # records per worker invocation (the SQS event source's batch size)
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
HANDLER_ENV = {
    "POWERTOOLS_SERVICE_NAME": "b24-cleanup",
    "POWERTOOLS_METRICS_NAMESPACE": "B24Cleanup",
    "POWERTOOLS_TRACE_DISABLED": "1",
}


# ------------------------------------------------------------------------------------------ output


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_table(
    title: str, subtitle: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()
) -> None:
    """Plain text, columns separated by at least two spaces; numbers right-aligned."""
    cells = [[_fmt(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows) if rows else False
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))]
        return "  ".join(parts).rstrip()

    print()
    print(f"{title} — {subtitle}")
    print(line(list(headers)))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))
    for note in notes:
        print(f"  {note}")
    sys.stdout.flush()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def machine() -> list[str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for text_line in Path("/proc/cpuinfo").read_text().splitlines():
            if text_line.lower().startswith("model name"):
                model = text_line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        f"CPU: {model}, {os.cpu_count()} cores ({usable} usable); load average at start {load}",
        f"Python {platform.python_version()} ({platform.python_implementation()}) on {platform.system()} "
        f"{platform.release()} {platform.machine()}",
    ]


# ------------------------------------------------------------------------------------------ helpers


def quiet_handler_logs() -> None:
    """The handlers' Powertools logger writes one JSON line per job to stdout: send it nowhere."""
    from b24_cleanup.handlers.observability import logger

    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logger.handlers:
        if hasattr(handler, "stream"):
            handler.stream = sink


def orphan_rows(k: int, tag: str = "old") -> list[dict[str, Any]]:
    """k orphan rows on distinct URLs: each needs its own unbind command."""
    return [{"event": "ONCRMLEADADD", "handler": f"https://{tag}-{i}.example.com/b24/events"} for i in range(k)]


def rebind(box: Any, seeded: Any, rows: Sequence[dict[str, Any]]) -> None:
    for row in rows:
        seeded.portal.bind(box.app, row["event"], row.get("handler"))


def request_bound(k: int) -> int:
    return 1 + math.ceil(k / BATCH_LIMIT)
