"""Table 1, REST requests per portal: one sweep job per portal against the design §5 request bound
(1 event.get + ceil(k/50) batch, +1 OAuth refresh when the token is due), counted from the emulator's log.
The run fails (exit status 1) when a portal is off the bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bench.common import DECLARED, KEPT_ROWS, median, orphan_rows, print_table, request_bound

NAME = "requests"
TITLE = "1. REST requests per portal"


@dataclass(frozen=True)
class Sizes:
    orphans: tuple[int, ...]  # orphan rows per portal, one row of the table each (fresh and expired token)


FULL = Sizes(orphans=(0, 10, 60, 300))
QUICK = FULL


def measure(sizes: Sizes, runs: int) -> bool:
    """REST requests of one sweep job per portal, counted from the emulator log, against the bound."""
    from b24_cleanup.engine import Engine
    from b24_cleanup.jobs import Action, Job, Outcome
    from b24_cleanup.ops.sandbox import sandbox

    rows: list[list[Any]] = []
    all_on_bound = True
    with sandbox(prefix="/b24-cleanup/bench-requests", declared=DECLARED) as box:
        engine = Engine(box.store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0)
        for k in sizes.orphans:
            for expired in (False, True):
                rest, oauth, wall = [], [], []
                ok = True
                for run in range(runs):
                    seeded = box.add_portal(
                        f"req-{k}-{int(expired)}-{run}.bitrix24.test",
                        handlers=KEPT_ROWS + orphan_rows(k),
                        expired=expired,
                    )
                    box.emulator.clear_log()
                    started = time.perf_counter()
                    result = engine.run(Job(Action.SWEEP, seeded.member_id))
                    wall.append(time.perf_counter() - started)
                    n_rest = len(box.emulator.requests_log(member_id=seeded.member_id, kind="rest"))
                    n_oauth = len(box.emulator.requests_log(member_id=seeded.member_id, kind="oauth"))
                    rest.append(n_rest)
                    oauth.append(n_oauth)
                    expected_outcome = Outcome.CLEANED if k else Outcome.CLEAN
                    ok = ok and (
                        n_rest == request_bound(k)
                        and n_oauth == int(expired)
                        and result.rest_calls == n_rest
                        and result.outcome is expected_outcome
                        and result.unbound == k
                        and len(seeded.portal.handlers(box.app)) == len(KEPT_ROWS)
                    )
                all_on_bound = all_on_bound and ok
                project = max(rest) + max(oauth)
                naive = 1 + k + int(expired)
                rows.append(
                    [
                        k,
                        "expired" if expired else "fresh",
                        max(rest),
                        max(oauth),
                        project,
                        request_bound(k) + int(expired),
                        naive,
                        round(naive / project, 1),
                        "yes" if ok else "NO",
                        median(wall) * 1000,
                    ]
                )
    print_table(
        TITLE,
        f"one sweep job per portal, {len(KEPT_ROWS)} declared rows kept + k orphans on distinct URLs, "
        f"median of {runs} run(s)",
        ["orphans k", "token", "REST", "OAuth", "total", "bound", "naive", "naive/project", "on bound", "job ms"],
        rows,
        [
            "bound = 1 event.get + ceil(k/50) batch (+1 OAuth refresh when the token is due); "
            "naive = 1 event.get + k event.unbind (+1 OAuth).",
            "'on bound' = every run hit the bound exactly, the job's own RestCalls agrees with the emulator log, "
            "every orphan is gone and every declared row is still bound.",
        ],
    )
    return all_on_bound
