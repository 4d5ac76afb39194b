"""`b24-cleanup plan` and `plan --all` against moto and the emulator (design §8, issue 17 item 3).

A plan is what tonight's sweep would do: declared / orphan / held (with why and until when) /
missing, read-only apart from a token refresh it had to store (and says so).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from b24_cleanup.held import DAY, ledger_key
from b24_cleanup.ops.cli import main
from b24_cleanup.ops.plan import limit_ssm_rate
from b24_cleanup.ops.sandbox import Sandbox, sandbox

APP = "https://app.example.com/b24/events"
OLD = "https://old.example.com/b24/events"
NEW = "https://app.example.com/b24/v2/events"
DECLARED = [
    {"event": "ONCRMLEADADD", "handler": APP + "/"},  # the typo: every portal's live handler is a near miss
    {"event": "ONCRMDEALADD", "event_type": "offline"},
    {"event": "ONCRMCONTACTADD", "handler": APP},  # bound nowhere: missing
]


@pytest.fixture
def box(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    with sandbox(declared=DECLARED) as sb:
        monkeypatch.setenv("B24_SSM_PREFIX", sb.prefix)
        monkeypatch.setenv("B24_OAUTH_URL", sb.emulator.oauth_url)  # the emulator is no trusted OAuth host
        monkeypatch.setenv("B24_ORPHAN_GRACE_DAYS", "2")
        yield sb


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), []
    code = main(list(argv), out=out, err=err.append)
    return code, out.getvalue(), "\n".join(err)


def seed_fleet(box: Sandbox) -> list[Any]:
    """Three portals: the typo everywhere, an old orphan known for weeks, a URL first seen now, an expired token."""
    live = [{"event": "ONCRMLEADADD", "handler": APP, "user_id": u} for u in (0, 1)] + [
        {"event": "ONCRMDEALADD", "offline": True}
    ]
    portals = [
        box.add_portal("a.bitrix24.test", handlers=[*live, {"event": "ONCRMLEADADD", "handler": OLD}]),
        box.add_portal("b.bitrix24.test", handlers=[*live, {"event": "ONCRMLEADADD", "handler": OLD}], expired=True),
        box.add_portal("c.bitrix24.test", handlers=[*live, {"event": "ONCRMLEADADD", "handler": NEW}]),
    ]
    ledger = {"orphans": {ledger_key("ONCRMLEADADD", OLD): int(time.time() - 30 * DAY)}}
    box.store.client.put_parameter(
        Name=f"{box.prefix}/app/orphans", Value=json.dumps(ledger), Type="String", Overwrite=True
    )
    return portals


def versions(box: Sandbox) -> dict[str, int]:
    pages = box.store.client.get_paginator("describe_parameters").paginate()
    return {p["Name"]: p["Version"] for page in pages for p in page["Parameters"]}


def test_plan_all_prints_one_fleet_table_and_changes_nothing_but_a_due_refresh(box: Sandbox) -> None:
    a, b, c = seed_fleet(box)
    before = versions(box)
    handlers_before = [p.portal.handlers(box.app) for p in (a, b, c)]

    code, out, err = run("plan", "--all")

    assert code == 0, err
    table = {
        (cells[0], cells[1]): line for line in out.splitlines() if (cells := line.split()) and cells[0].startswith("ON")
    }
    lead = [line for (event, url), line in table.items() if (event, url) == ("ONCRMLEADADD", APP)]
    assert len(lead) == 1 and f"held: near miss of {APP}/" in lead[0] and lead[0].split()[-2:] == ["3", "6"]
    assert "orphan: will be unbound" in table[("ONCRMLEADADD", OLD)] and table[("ONCRMLEADADD", OLD)].split()[-2:] == [
        "2",
        "2",
    ]
    assert "held: first seen now" in table[("ONCRMLEADADD", NEW)]
    assert "declared" in table[("ONCRMDEALADD", "(offline)")] and table[("ONCRMDEALADD", "(offline)")].split()[-2:] == [
        "3",
        "3",
    ]
    assert "missing" in table[("ONCRMCONTACTADD", APP)]
    assert "portals: 3 (planned 3)" in out
    assert "rows: declared 3, will be unbound 2, held 7 (on 3 portals)" in out
    assert "token refreshes stored in SSM: 1" in out
    # Read-only: nothing unbound, no ledger written; the one write is b's rotated pair.
    assert [p.portal.handlers(box.app) for p in (a, b, c)] == handlers_before
    after = versions(box)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {box.store.portal_name(b.member_id)}


def test_plan_all_json_is_the_same_table_as_data(box: Sandbox) -> None:
    seed_fleet(box)
    code, out, _ = run("plan", "--all", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"groups", "totals", "problems"}
    groups = {(g["event"], g["handler"], g["kind"]): g for g in data["groups"]}
    near = groups[("ONCRMLEADADD", APP, "held")]
    assert (near["reason"], near["portals"], near["rows"], near["until"]) == ("near_miss", 3, 6, None)
    assert groups[("ONCRMLEADADD", OLD, "orphan")]["status"] == "orphan: will be unbound"
    assert groups[("ONCRMDEALADD", None, "declared")]["offline"] is True
    assert groups[("ONCRMCONTACTADD", APP, "missing")]["portals"] == 3
    assert data["totals"]["token_refreshes_stored_in_ssm"] == 1
    assert data["totals"]["rows_held"] == 7 and data["problems"] == []


def test_plan_one_portal_lists_declared_orphan_held_and_missing_with_reasons(box: Sandbox) -> None:
    _, b, _ = seed_fleet(box)
    code, out, _ = run("plan", "--member-id", b.member_id)
    assert code == 0
    record = box.record(b.member_id)
    assert record is not None and f"portal {b.member_id} ({record.domain}): planned" in out
    assert "declared (kept):" in out and "ONCRMDEALADD" in out
    assert "orphans (the sweep will unbind them):" in out and OLD in out
    assert "held (orphans, not unbound yet):" in out
    assert f"near miss of the declared {APP}/; held until the declared set changes" in out
    assert "declared but missing" in out and "ONCRMCONTACTADD" in out
    assert "the rotated pair was written to SSM" in out and box.store.portal_name(b.member_id) in out


def test_plan_json_is_a_plan_not_a_sweep_result(box: Sandbox) -> None:
    _, _, c = seed_fleet(box)
    code, out, _ = run("plan", "--member-id", c.member_id, "--json")
    assert code == 0
    data = json.loads(out)
    assert "action" not in data and "outcome" not in data and "unbound" not in data
    assert data["status"] == "planned"
    assert [(d["event"], d["handler"]) for d in data["declared"]] == [("ONCRMDEALADD", None)]
    assert data["orphans"] == []
    held = {(h["handler"], h["reason"]) for h in data["held"]}
    assert held == {(APP, "near_miss"), (NEW, "first_seen_within_grace")}
    assert [m["event"] for m in data["missing"]] == ["ONCRMLEADADD", "ONCRMCONTACTADD"]
    assert (data["token_refreshed"], data["token_refresh_stored_in_ssm"]) == (False, False)


def test_grace_zero_for_one_cli_run_releases_all_but_near_misses(box: Sandbox, monkeypatch: Any) -> None:
    _, _, c = seed_fleet(box)
    monkeypatch.setenv("B24_ORPHAN_GRACE_DAYS", "0")
    code, out, _ = run("plan", "--member-id", c.member_id, "--json")
    assert code == 0
    data = json.loads(out)
    assert [o["handler"] for o in data["orphans"]] == [NEW]
    assert [h["reason"] for h in data["held"]] == ["near_miss"]


def test_plan_needs_one_of_member_id_or_all(box: Sandbox, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["plan"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        main(["plan", "--all", "--ssm-rate", "0"])
    assert "--ssm-rate" in capsys.readouterr().err


def test_the_ssm_rate_is_bounded(box: Sandbox) -> None:
    client = box.store.client
    limit_ssm_rate(client, 20.0)
    started = time.monotonic()
    for _ in range(30):  # a burst of 20, then 20/s
        client.get_parameter(Name=f"{box.prefix}/app/handlers")
    assert time.monotonic() - started >= 0.45
