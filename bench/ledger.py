"""What the held-orphan rules cost in SSM over nights of the campaign's fleet (design §3, issue 14).

    .venv/bin/python -m bench.ledger [--portals 200] [--nights 3] [--seed 7]

The campaign's portal mix (declared rows, its orphan kinds) on the sandbox, the real scheduler and
worker handlers, the production grace of 2 days, and no orphan ledger yet: night 1 is the first
night after this version is deployed. Each later night is a day later for the orphan rules (the
worker's orphan clock moves; moto cannot date parameter versions in the past). Per night it prints
the worker invocations and jobs, the rules' SSM calls (GetParameterHistory of app/handlers,
GetParameter and PutParameter of app/orphans), per invocation and per job, and the rows held and
unbound. Expected: every orphan held on nights 1-2 (first seen night 1), unbound on night 3;
ledger writes only on night 1 (a few: one per invocation that met keys not yet in it).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import boto3

from b24_cleanup import runtime
from b24_cleanup.handlers import scheduler, worker
from b24_cleanup.held import DAY
from b24_cleanup.ops.functionurl import FakeContext
from b24_cleanup.ops.sandbox import collect_results, drain, patched_environ, sandbox
from bench.campaign import DECLARED, _declared_rows, _orphan_rows


def run(portals: int, nights: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    with sandbox(declared=DECLARED) as box:
        for i in range(portals):
            box.add_portal(f"p{i}.bitrix24.test", handlers=_declared_rows(rng) + _orphan_rows(rng))
        env = box.env(B24_ORPHAN_GRACE_DAYS="2", B24_OAUTH_URL=box.emulator.oauth_url)
        started = time.time()
        with patched_environ(env), collect_results() as results:
            runtime.reset()
            calls: Counter[tuple[str, str]] = Counter()
            invocations = 0

            def count(params: dict[str, Any], model: Any, **_: Any) -> None:
                name = str(params.get("Name", ""))
                calls[(model.name, name.rsplit("/", 1)[-1] if "/app/" in name else "portal")] += 1

            runtime.engine().store.client.meta.events.register("before-parameter-build.ssm.*", count)

            def deliver(event: dict[str, Any], context: Any) -> dict[str, Any]:
                nonlocal invocations
                invocations += 1
                return worker.lambda_handler(event, context)

            sqs = boto3.client("sqs")
            for night in range(1, nights + 1):
                calls.clear()
                invocations = 0
                results.jobs.clear()
                offset = (night - 1) * DAY
                runtime.engine().orphan_records.clock = lambda offset=offset: time.time() + offset
                stamp = time.strftime("%Y-%m-%dT02:00:00Z", time.gmtime(started + offset))
                scheduler.lambda_handler({"scheduled_time": stamp}, FakeContext())
                drain(sqs, box.queue_url, deliver, FakeContext())
                sweeps = [j for j in results.jobs if j["action"] == "sweep"]
                extra = calls[("GetParameterHistory", "handlers")] + sum(
                    n for (op, name), n in calls.items() if name == "orphans"
                )
                rows.append(
                    {
                        "night": night,
                        "invocations": invocations,
                        "jobs": len(sweeps),
                        "history_reads": calls[("GetParameterHistory", "handlers")],
                        "ledger_reads": calls[("GetParameter", "orphans")],
                        "ledger_writes": calls[("PutParameter", "orphans")],
                        "extra_per_invocation": round(extra / max(1, invocations), 2),
                        "extra_per_job": round(extra / max(1, len(sweeps)), 3),
                        "held_rows": sum(j.get("held_rows", 0) for j in sweeps),
                        "unbound_rows": sum(j["unbound"] for j in sweeps),
                    }
                )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--portals", type=int, default=200)
    parser.add_argument("--nights", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rows = run(args.portals, args.nights, args.seed)
    header = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(header, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
