"""Benchmarks of b24-cleanup (issue 5): requests per portal, sweep throughput, pacing, cold start, scheduler.

Run from the repository root:

    .venv/bin/python -m bench.run            # the full run (several minutes)
    .venv/bin/python -m bench.run --quick    # smoke sizes (seconds); what tests/resilience/test_bench_smoke.py runs
    .venv/bin/python -m bench.run --only sweep --runs 5

Everything runs on loopback: the project's Bitrix24 emulator, moto in-process (the sandbox) and,
for the scheduler, a moto server in a child process. Nothing reaches the network. Each table
prints medians over `--runs` runs; see bench/README.md for what each measurement means.
The exit status is 1 when a portal's requests are off the design §5 bound (table 1).

Each table is one module of bench/ (NAME, TITLE, Sizes with FULL and QUICK, `measure(sizes, runs)`);
this one only runs them: a new table is one more entry in TABLES.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from types import ModuleType

from bench import cold_start, pacing, quota, races, requests_per_portal, scheduler, sweep
from bench.common import HANDLER_ENV, machine, quiet_handler_logs

# In the order they print; the key is the name `--only` takes.
TABLES: dict[str, ModuleType] = {
    table.NAME: table for table in (requests_per_portal, sweep, pacing, cold_start, scheduler, quota, races)
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes: seconds instead of minutes")
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement for medians (default 3, quick 1)")
    parser.add_argument("--only", choices=list(TABLES), action="append", help="run only this table (repeatable)")
    args = parser.parse_args(argv)
    runs = max(1, args.runs if args.runs is not None else (1 if args.quick else 3))
    for key, value in {**HANDLER_ENV, "POWERTOOLS_LOG_DEDUPLICATION_DISABLED": "1"}.items():
        os.environ.setdefault(key, value)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SSM", "AWS_ENDPOINT_URL_SQS", "AWS_PROFILE"):
        os.environ.pop(key, None)  # the sandbox's moto must intercept every call
    quiet_handler_logs()

    print(f"b24-cleanup benchmarks ({'quick' if args.quick else 'full'} run, {runs} run(s) per median)")
    for text_line in machine():
        print(text_line)
    ok = True
    started = time.perf_counter()
    for name in args.only or TABLES:
        table = TABLES[name]
        t0 = time.perf_counter()
        outcome = table.measure(table.QUICK if args.quick else table.FULL, runs)
        print(f"  ({name}: {time.perf_counter() - t0:.1f} s)")
        if outcome is False:
            ok = False
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    if not ok:
        print("FAILED: a portal's requests are off the design §5 bound (table 1)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
