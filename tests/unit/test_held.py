"""Held orphans, the pure rules (design §3): near misses, the ledger, the history windows, the decision."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from b24_cleanup.held import (
    DAY,
    DeclaredHistory,
    Evidence,
    HoldReason,
    Ledger,
    Version,
    decide,
    declared_entries,
    ledger_key,
    near_miss_of,
    normalise_url,
    row_key,
    split,
)
from b24_cleanup.planner import DeclaredSet, HandlerRow

URL = "https://app.example.com/b24/events"
OLD = "https://old.example.com/b24/events"
NOW = 1_800_000_000.0


def declared(*entries: dict[str, Any]) -> DeclaredSet:
    return DeclaredSet.parse(json.dumps({"handlers": list(entries)}))


def text(*entries: dict[str, Any]) -> str:
    return json.dumps({"handlers": list(entries)})


def online(event: str, handler: str, auth_type: str = "0") -> HandlerRow:
    return HandlerRow.from_api({"event": event, "handler": handler, "auth_type": auth_type, "offline": 0})


def offline(event: str, connector_id: str = "") -> HandlerRow:
    return HandlerRow.from_api({"event": event, "connector_id": connector_id, "offline": 1})


def history(*versions: tuple[float, str], first: int = 1) -> DeclaredHistory:
    return DeclaredHistory.from_versions([Version(first + i, t, s) for i, (t, s) in enumerate(versions)])


LEAD = {"event": "ONCRMLEADADD", "handler": URL}
CURRENT = declared(LEAD)
# The set has been what it is for a long time: no version within any grace names anything else.
SETTLED = history((NOW - 100 * DAY, text(LEAD)))


def evidence(ledger: Ledger | None = None, hist: DeclaredHistory | None = SETTLED, grace: int = 2) -> Evidence:
    return Evidence(grace_days=grace, now=NOW, history=hist, ledger=ledger if ledger is not None else Ledger({}))


def old_ledger(*rows: HandlerRow, age_days: float = 10) -> Ledger:
    return Ledger({row_key(r): int(NOW - age_days * DAY) for r in rows})


# ------------------------------------------------------------------------------------------ normalise


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("https://app.example.com/b24/events/", URL),  # trailing slash
        ("https://APP.Example.COM/b24/events", URL),  # host case
        ("HTTPS://app.example.com/b24/events", URL),  # scheme case
        ("https://app.example.com:443/b24/events", URL),  # default port
        ("http://app.example.com:80/x", "http://app.example.com/x"),
        ("https://app.example.com/a%2fb", "https://app.example.com/a%2Fb"),  # escape case
        ("https://app.example.com/", "https://app.example.com"),
        ("https://[::1]:443/x/", "https://[::1]/x"),
    ],
)
def test_near_misses_normalise_equal(a: str, b: str) -> None:
    assert normalise_url(a) == normalise_url(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("https://app.example.com/B24/events", URL),  # path case is a different resource
        ("http://app.example.com/b24/events", URL),  # another scheme
        ("https://app.example.com:8443/b24/events", URL),  # a non-default port
        ("https://app.example.com/b24/events?x=1", URL),  # a query
        ("https://user@app.example.com/b24/events", URL),  # user info kept
        ("https://app.example.com/a%2fb", "https://app.example.com/a/b"),  # an escape is not its character
    ],
)
def test_other_differences_are_not_near_misses(a: str, b: str) -> None:
    assert normalise_url(a) != normalise_url(b)


def test_an_unparseable_url_only_equals_itself() -> None:
    assert normalise_url("https://app.example.com:99999/x") == "https://app.example.com:99999/x"


@given(st.from_regex(r"https?://[a-zA-Z0-9.]{1,20}(:[0-9]{1,4})?(/[a-zA-Z0-9%/]{0,20})?", fullmatch=True))
def test_normalising_is_idempotent(url: str) -> None:
    assert normalise_url(normalise_url(url)) == normalise_url(url)


def test_near_miss_names_the_declared_url_of_the_same_event_only() -> None:
    s = declared(LEAD, {"event": "ONCRMDEALADD", "handler": OLD})
    assert near_miss_of(online("ONCRMLEADADD", URL + "/"), s) == URL
    assert near_miss_of(online("oncrmleadadd", URL.upper().replace("/B24/EVENTS", "/b24/events")), s) == URL
    assert near_miss_of(online("ONCRMDEALADD", URL + "/"), s) is None  # another event's URL
    assert near_miss_of(online("ONCRMLEADADD", OLD), s) is None
    assert near_miss_of(offline("ONCRMLEADADD"), s) is None


# ------------------------------------------------------------------------------------------ ledger


def test_ledger_key_is_spec_exact() -> None:
    assert ledger_key("oncrmleadadd", URL) == hashlib.sha256(f"ONCRMLEADADD\n{URL}".encode()).hexdigest()[:16]
    assert ledger_key("OnCrmDealAdd", None) == hashlib.sha256(b"ONCRMDEALADD\noffline").hexdigest()[:16]
    # The URL is taken as the row has it: a near miss is its own key.
    assert ledger_key("ONCRMLEADADD", URL + "/") != ledger_key("ONCRMLEADADD", URL)
    assert row_key(offline("ONCRMDEALADD", "erp")) == row_key(offline("ONCRMDEALADD"))


def test_ledger_round_trips_in_the_spec_format() -> None:
    ledger = Ledger({"0123456789abcdef": 1700000000, "fedcba9876543210": 1700000001})
    assert json.loads(ledger.to_text()) == {"orphans": {"0123456789abcdef": 1700000000, "fedcba9876543210": 1700000001}}
    parsed = Ledger.parse(ledger.to_text())
    assert not parsed.broken and parsed.first_seen == ledger.first_seen
    assert not Ledger.parse('{"orphans": {}}').broken


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "",
        "not json",
        "[]",
        "{}",
        '{"orphans": []}',
        '{"orphans": {"0123456789abcdef": "1700000000"}}',
        '{"orphans": {"0123456789abcdef": true}}',
        '{"orphans": {"0123456789abcdef": -1}}',
        '{"orphans": {"0123456789abcdef": NaN}}',
        '{"orphans": {"not-a-key": 1700000000}}',
        '{"orphans": {"0123456789ABCDEF": 1700000000}}',
    ],
)
def test_a_ledger_not_in_the_format_is_broken(bad: str | None) -> None:
    ledger = Ledger.parse(bad)
    assert ledger.broken and ledger.problem
    # ...and every key counts as first seen now, so everything is held.
    assert ledger.seen_at("0123456789abcdef", NOW) == NOW
    assert ledger.new_keys(["0123456789abcdef"]) == {"0123456789abcdef"}


def test_merge_adds_new_keys_and_keeps_first_seen_times() -> None:
    ledger = Ledger({"a" * 16: 1000})
    merged = ledger.merged({"a" * 16, "b" * 16}, NOW)
    assert merged.first_seen == {"a" * 16: 1000, "b" * 16: int(NOW)}


def test_merge_of_a_broken_ledger_is_a_fresh_one() -> None:
    merged = Ledger.unreadable("x").merged({"a" * 16}, NOW)
    assert merged.first_seen == {"a" * 16: int(NOW)} and not merged.broken


def test_merge_drops_keys_unseen_for_60_days_but_never_seen_ones() -> None:
    old, recent, seen = "a" * 16, "b" * 16, "c" * 16
    ledger = Ledger({old: int(NOW - 61 * DAY), recent: int(NOW - 59 * DAY), seen: int(NOW - 90 * DAY)})
    merged = ledger.merged({seen}, NOW)
    assert merged.first_seen == {recent: int(NOW - 59 * DAY), seen: int(NOW - 90 * DAY)}


def test_merge_keeps_within_the_size_limit_by_dropping_the_oldest_unseen() -> None:
    entries = {f"{i:016x}": int(NOW - DAY) + i for i in range(300)}
    merged = Ledger(entries).merged({f"{0:016x}"}, NOW, max_bytes=4096)
    assert len(merged.to_text()) <= 4096
    assert f"{0:016x}" in merged.first_seen  # seen now: kept although oldest
    assert f"{299:016x}" in merged.first_seen  # the newest survive
    assert f"{1:016x}" not in merged.first_seen
    with pytest.raises(ValueError, match="cannot hold"):
        Ledger({}).merged(set(entries), NOW, max_bytes=100)


# ------------------------------------------------------------------------------------------ history


def test_declared_until_uses_each_versions_window() -> None:
    removed_at = NOW - 1 * DAY
    hist = history((NOW - 30 * DAY, text(LEAD, {"event": "ONCRMDEALADD", "handler": OLD})), (removed_at, text(LEAD)))
    row = online("ONCRMDEALADD", OLD)
    assert hist.declared_until(row, NOW - 2 * DAY, NOW) == removed_at
    assert hist.declared_until(row, NOW - 0.5 * DAY, NOW) is None  # removed before the grace began
    assert hist.declared_until(online("ONCRMLEADADD", URL), NOW - 2 * DAY, NOW) == NOW  # still current
    assert hist.declared_until(online("oncrmdealadd", OLD), NOW - 2 * DAY, NOW) == removed_at  # event case
    assert hist.declared_until(online("ONCRMDEALADD", OLD + "/"), NOW - 2 * DAY, NOW) is None  # exact URL


def test_offline_rows_follow_the_history_by_event() -> None:
    hist = history(
        (NOW - 30 * DAY, text(LEAD, {"event": "ONCRMDEALADD", "event_type": "offline"})), (NOW - DAY, text(LEAD))
    )
    assert hist.declared_until(offline("ONCRMDEALADD", "erp"), NOW - 2 * DAY, NOW) == NOW - DAY
    assert hist.declared_until(online("ONCRMDEALADD", URL), NOW - 2 * DAY, NOW) is None


def test_an_invalid_version_still_counts_its_well_formed_entries() -> None:
    broken = json.dumps({"handlers": [{"event": "ONCRMDEALADD", "handler": OLD}, {"event": ""}]})
    assert [(e.event, e.handler) for e in declared_entries(broken)] == [("ONCRMDEALADD", OLD)]
    assert declared_entries("not json") == ()
    assert declared_entries('{"handlers": 3}') == ()


def test_a_history_that_lost_its_first_versions_covers_only_what_it_kept() -> None:
    hist = history((NOW - DAY, text(LEAD)), first=5)
    assert not hist.covers(NOW - 2 * DAY)
    assert hist.covers(NOW - 0.5 * DAY)
    assert history((NOW - DAY, text(LEAD))).covers(NOW - 1000 * DAY)  # version 1 is there


# ------------------------------------------------------------------------------------------ decide


def test_the_trailing_slash_accident_is_held_whatever_the_grace() -> None:
    # The operator typed URL + "/" into the set; the portals have the live handler at URL.
    typo = declared({"event": "ONCRMLEADADD", "handler": URL + "/"})
    for grace in (0, 2, 365):
        hold = decide(online("ONCRMLEADADD", URL), typo, evidence(old_ledger(online("ONCRMLEADADD", URL)), grace=grace))
        assert hold is not None and hold.reason is HoldReason.NEAR_MISS and hold.until is None
        assert hold.near_miss_of == URL + "/"
        assert "until the declared set changes" in hold.describe()


def test_an_entry_removed_today_is_held_until_grace_after_the_removal() -> None:
    removed_at = NOW - 3600
    hist = history((NOW - 30 * DAY, text(LEAD, {"event": "ONCRMDEALADD", "handler": OLD})), (removed_at, text(LEAD)))
    row = online("ONCRMDEALADD", OLD)
    hold = decide(row, CURRENT, evidence(old_ledger(row), hist))
    assert hold is not None and hold.reason is HoldReason.DECLARED_WITHIN_GRACE
    assert hold.declared_until == removed_at and hold.until == removed_at + 2 * DAY
    assert hold.status().startswith("held: declared until ")
    # Two days and a second later the same evidence releases it.
    later = Evidence(grace_days=2, now=removed_at + 2 * DAY + 1, history=hist, ledger=old_ledger(row))
    assert decide(row, CURRENT, later) is None


def test_a_url_first_seen_today_is_held_until_grace_after_it_was_first_seen() -> None:
    row = online("ONCRMLEADADD", "https://app.example.com/b24/v2/events")
    hold = decide(row, CURRENT, evidence(Ledger({})))  # not in the ledger: first seen now
    assert hold is not None and hold.reason is HoldReason.FIRST_SEEN_WITHIN_GRACE
    assert hold.first_seen == NOW and hold.until == NOW + 2 * DAY
    # Portals planned a minute apart group under one status: a first sighting has no time yet.
    later = decide(row, CURRENT, Evidence(2, NOW + 60, SETTLED, Ledger({})))
    assert later is not None and later.status() == hold.status() == (
        "held: first seen now (not in the orphan ledger yet; grace 2 days)"
    )
    seen = Ledger({row_key(row): int(NOW - DAY)})
    assert decide(row, CURRENT, evidence(seen)).until == NOW + DAY  # type: ignore[union-attr]
    assert decide(row, CURRENT, evidence(Ledger({row_key(row): int(NOW - 2 * DAY)}))) is None


def test_a_broken_ledger_holds_every_orphan() -> None:
    row = online("ONCRMLEADADD", OLD)
    hold = decide(row, CURRENT, evidence(Ledger.parse("garbage")))
    assert hold is not None and hold.reason is HoldReason.FIRST_SEEN_WITHIN_GRACE
    assert "parseable" in hold.describe()


def test_an_unknown_history_holds_every_orphan() -> None:
    row = online("ONCRMLEADADD", OLD)
    hold = decide(row, CURRENT, Evidence(2, NOW, None, old_ledger(row), history_problem="history unreadable"))
    assert hold is not None and hold.reason is HoldReason.HISTORY_UNKNOWN and "unreadable" in hold.status()
    short = history((NOW - DAY, text(LEAD)), first=7)
    assert decide(row, CURRENT, evidence(old_ledger(row), short)).reason is HoldReason.HISTORY_UNKNOWN  # type: ignore[union-attr]


def test_grace_zero_releases_everything_but_near_misses() -> None:
    row = online("ONCRMLEADADD", OLD)
    assert decide(row, CURRENT, Evidence(0, NOW, None, Ledger.parse(None))) is None
    assert decide(online("ONCRMLEADADD", URL + "/"), CURRENT, Evidence(0, NOW)) is not None


def test_the_latest_ending_time_rule_is_the_one_reported() -> None:
    row = online("ONCRMDEALADD", OLD)
    hist = history((NOW - 30 * DAY, text(LEAD, {"event": "ONCRMDEALADD", "handler": OLD})), (NOW - DAY, text(LEAD)))
    hold = decide(row, CURRENT, evidence(Ledger({}), hist))  # declared until NOW-1d, first seen NOW
    assert hold is not None and hold.reason is HoldReason.FIRST_SEEN_WITHIN_GRACE and hold.until == NOW + 2 * DAY


def test_offline_orphans_follow_the_time_rules_by_event() -> None:
    row = offline("ONCRMDEALADD", "erp")
    assert decide(row, CURRENT, evidence(Ledger({}))) is not None
    assert decide(row, CURRENT, evidence(old_ledger(offline("ONCRMDEALADD")))) is None


def test_split_keeps_a_pair_together_and_reports_held_pairs() -> None:
    typo_rows = [online("ONCRMLEADADD", URL + "/", a) for a in ("0", "1")]
    old = online("ONCRMDEALADD", OLD)
    result = split([*typo_rows, old], CURRENT, evidence(old_ledger(*typo_rows, old)))
    assert result.release == (old,)
    assert [row for row, _ in result.held] == typo_rows
    (pair,) = result.held_pairs()
    assert pair["rows"] == 2 and pair["reason"] == "near_miss" and pair["near_miss_of"] == URL
    assert pair["until"] is None
    assert result.seen_keys == {row_key(typo_rows[0]), row_key(old)}


# ------------------------------------------------------------------------------------------ settings


def test_orphan_grace_days_default_and_validation() -> None:
    from b24_cleanup.config import Settings
    from b24_cleanup.errors import ConfigError

    assert Settings.from_env({"B24_SSM_PREFIX": "/p"}).orphan_grace_days == 2
    assert Settings.from_env({"B24_SSM_PREFIX": "/p", "B24_ORPHAN_GRACE_DAYS": " 0 "}).orphan_grace_days == 0
    assert Settings.from_env({"B24_SSM_PREFIX": "/p", "B24_ORPHAN_GRACE_DAYS": "14"}).orphan_grace_days == 14
    for bad in ("two", "-1", "1.5", "366"):
        with pytest.raises(ConfigError, match="B24_ORPHAN_GRACE_DAYS") as info:
            Settings.from_env({"B24_SSM_PREFIX": "/p", "B24_ORPHAN_GRACE_DAYS": bad})
        assert bad.strip() in str(info.value)
