"""Table 3, pacing: one sweep job with `batch` refused (one event.unbind per orphan), against the leaky
bucket's bound; the goal is no 503 at all.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from bench.common import DECLARED, KEPT_ROWS, median, orphan_rows, print_table

NAME = "pacing"
TITLE = "3. Pacing"


@dataclass(frozen=True)
class Sizes:
    orphans: int
    real_rate: bool  # the real 2/s bucket (about two minutes), run once
    fast_rate: float
    burst: int


FULL = Sizes(orphans=300, real_rate=True, fast_rate=50.0, burst=50)
QUICK = dataclasses.replace(FULL, real_rate=False, fast_rate=100.0)


def measure(sizes: Sizes, runs: int) -> None:
    from b24_cleanup.engine import Engine, EngineOptions
    from b24_cleanup.jobs import Action, Job
    from b24_cleanup.ops.sandbox import sandbox
    from b24_cleanup.pacing import HEADROOM

    k, burst = sizes.orphans, sizes.burst
    configs: list[tuple[float, int, str]] = []
    if sizes.real_rate:
        configs.append((2.0, 1, "real default"))
    configs.append((sizes.fast_rate, runs, "fast bucket"))
    rows: list[list[Any]] = []
    with sandbox(prefix="/b24-cleanup/bench-pacing", declared=DECLARED) as box:
        for rate, n_runs, label in configs:
            engine = Engine(
                box.store,
                oauth_url=box.emulator.oauth_url,
                orphan_grace_days=0,
                options=EngineOptions(rate=rate, burst=burst),
            )
            walls, requests_made, refused, limited, unbound = [], [], [], [], []
            for run in range(n_runs):
                seeded = box.add_portal(f"pace-{rate:g}-{run}.bitrix24.test", handlers=KEPT_ROWS + orphan_rows(k))
                seeded.portal.refuse_batch = True
                seeded.portal.rate, seeded.portal.burst = rate, burst
                box.emulator.clear_log()
                started = time.perf_counter()
                result = engine.run(Job(Action.SWEEP, seeded.member_id))
                walls.append(time.perf_counter() - started)
                log = box.emulator.requests_log(member_id=seeded.member_id, kind="rest")
                requests_made.append(len(log))
                refused.append(sum(1 for e in log if e.status == 503))
                limited.append(result.rate_limited)
                unbound.append(result.unbound)
            req = int(median(requests_made))
            wall = median(walls)
            bound = (req - burst) / rate
            expected = (req - (burst - HEADROOM)) / rate
            rows.append(
                [
                    f"{label}: {rate:g}/s burst {burst}",
                    n_runs,
                    req,
                    wall,
                    bound,
                    wall - bound,
                    expected,
                    wall / bound,
                    max(refused),
                    max(limited),
                    f"{min(unbound)}/{k}",
                ]
            )
    print_table(
        TITLE,
        f"one sweep job, {k} orphans, `batch` refused (single-call fallback), emulator latency 0",
        [
            "bucket",
            "runs",
            "requests",
            "wall s",
            "bound s",
            "over s",
            "with headroom s",
            "wall/bound",
            "503s",
            "RateLimited",
            "unbound",
        ],
        rows,
        [
            f"requests = 1 event.get + 1 refused batch + {k} event.unbind; bound = (requests - burst) / rate: the "
            f"first {burst} go at once, the rest at the drain rate.",
            f"the client keeps HEADROOM={HEADROOM} units below the portal's burst, so it expects "
            f"(requests - {burst - HEADROOM}) / rate: {HEADROOM}/rate s over the bound; goal: no 503 at all.",
        ],
    )
