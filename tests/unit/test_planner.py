"""The declared set's validity rules, classification and unbind commands (design §3, §5 step 5)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from b24_cleanup.commands import Command
from b24_cleanup.errors import ConfigError, InvalidDeclaredSetError, PermanentError
from b24_cleanup.planner import (
    DeclaredHandler,
    DeclaredSet,
    HandlerRow,
    Listing,
    Plan,
    classify,
    plan,
    plan_uninstall,
    unbind_commands,
)

URL = "https://app.example.com/b24/events"
OLD_URL = "https://old.example.com/b24/events"


def declared(*entries: dict[str, Any]) -> DeclaredSet:
    return DeclaredSet.parse(json.dumps({"handlers": list(entries)}))


def online(event: str, handler: str, auth_type: str = "0") -> HandlerRow:
    return HandlerRow.from_api({"event": event, "handler": handler, "auth_type": auth_type, "offline": 0})


def offline(event: str, connector_id: str = "") -> HandlerRow:
    return HandlerRow.from_api({"event": event, "connector_id": connector_id, "offline": 1})


def invalid(text: str | None) -> str:
    with pytest.raises(InvalidDeclaredSetError) as info:
        DeclaredSet.parse(text)
    return str(info.value)


def invalid_entry(entry: object, *, before: int = 1) -> str:
    """The reason for a set whose entry number `before` is `entry`, after valid ones."""
    good = [{"event": "ONCRMLEADADD", "handler": URL}] * before
    return invalid(json.dumps({"handlers": [*good, entry]}))


# --- the declared set: valid forms -------------------------------------------------------------


def test_spec_example_parses() -> None:
    text = json.dumps(
        {
            "handlers": [
                {"event": "ONCRMLEADADD", "handler": "https://app.example.com/b24/events"},
                {"event": "ONCRMDEALUPDATE", "event_type": "offline"},
            ]
        }
    )
    assert DeclaredSet.parse(text) == DeclaredSet(
        (
            DeclaredHandler("ONCRMLEADADD", "https://app.example.com/b24/events", False),
            DeclaredHandler("ONCRMDEALUPDATE", None, True),
        )
    )


def test_event_is_stripped_and_upper_cased_handler_kept_exactly() -> None:
    result = declared({"event": "  onCrmLeadAdd\t", "handler": "https://App.Example.com/B24?x=1"})
    assert result.handlers == (DeclaredHandler("ONCRMLEADADD", "https://App.Example.com/B24?x=1", False),)


@pytest.mark.parametrize("event_type", ["online", "ONLINE", "Online"])
def test_event_type_online_any_case(event_type: str) -> None:
    result = declared({"event": "ONX", "event_type": event_type, "handler": URL})
    assert result.handlers == (DeclaredHandler("ONX", URL, False),)


@pytest.mark.parametrize("event_type", ["offline", "OFFLINE", "OffLine"])
def test_event_type_offline_any_case(event_type: str) -> None:
    assert declared({"event": "ONX", "event_type": event_type}).handlers == (DeclaredHandler("ONX", None, True),)


@pytest.mark.parametrize(
    "url",
    ["http://app.example.com/h", "HTTPS://app.example.com/h", "Http://127.0.0.1:8080/h", "https://[::1]/h"],
)
def test_scheme_any_case_and_loopback_hosts(url: str) -> None:
    assert declared({"event": "ONX", "handler": url}).handlers[0].handler == url


def test_extra_keys_are_allowed_and_ignored() -> None:
    result = DeclaredSet.parse(
        json.dumps(
            {
                "version": 3,
                "handlers": [{"event": "ONX", "handler": URL, "comment": "why", "auth_type": 15}],
            }
        )
    )
    assert result.handlers == (DeclaredHandler("ONX", URL, False),)


def test_exact_duplicates_collapse_in_order() -> None:
    result = declared(
        {"event": "ONB", "handler": URL},
        {"event": "ONA", "event_type": "offline"},
        {"event": "onb", "handler": URL},
    )
    assert [h.event for h in result.handlers] == ["ONB", "ONA"]


# --- the declared set: every invalid form, one at a time ---------------------------------------


def test_missing_parameter_is_invalid() -> None:
    assert "missing" in invalid(None)


@pytest.mark.parametrize("text", ["", "{", "handlers: []", "{'handlers': []}", "[1,]"])
def test_unparseable_is_invalid(text: str) -> None:
    assert "not parseable" in invalid(text)


def test_deeply_nested_is_invalid_not_a_crash() -> None:
    reason = invalid("[" * 100_000)  # an InvalidDeclaredSetError, never a RecursionError
    assert "nested too deeply" in reason or "not parseable" in reason


@pytest.mark.parametrize("text", ["[]", '"handlers"', "null", "42", "true", '[{"handlers": []}]'])
def test_not_an_object_is_invalid(text: str) -> None:
    assert "not a JSON object" in invalid(text)


def test_no_handlers_key_is_invalid() -> None:
    assert "no 'handlers'" in invalid(json.dumps({"handler": []}))


@pytest.mark.parametrize("value", [None, {}, {"0": {"event": "ONX", "handler": URL}}, "ONX", 1])
def test_handlers_not_a_list_is_invalid(value: object) -> None:
    assert "not a list" in invalid(json.dumps({"handlers": value}))


def test_empty_list_is_invalid() -> None:
    assert "empty" in invalid(json.dumps({"handlers": []}))


@pytest.mark.parametrize("entry", [None, "ONX", 1, [], ["ONX", URL], True])
def test_non_object_entry_is_invalid(entry: object) -> None:
    assert "handlers[1] is not an object" in invalid_entry(entry)


def test_missing_event_is_invalid() -> None:
    assert "handlers[1] has no 'event'" in invalid_entry({"handler": URL})


@pytest.mark.parametrize("event", [None, 1, True, ["ONX"], {"name": "ONX"}])
def test_non_string_event_is_invalid(event: object) -> None:
    assert "'event' is not a string" in invalid_entry({"event": event, "handler": URL})


@pytest.mark.parametrize("event", ["", " ", "\t\n ", "\u00a0"])
def test_empty_or_whitespace_event_is_invalid(event: str) -> None:
    assert "'event' is empty" in invalid_entry({"event": event, "handler": URL})


def test_online_without_handler_is_invalid() -> None:
    assert "online entry has no 'handler'" in invalid_entry({"event": "ONX"})
    assert "online entry has no 'handler'" in invalid_entry({"event": "ONX", "event_type": "online"})


def test_null_handler_is_invalid() -> None:
    assert "'handler' is present but not a string" in invalid_entry({"event": "ONX", "handler": None})


def test_empty_handler_is_invalid() -> None:
    assert "'handler' is present but empty" in invalid_entry({"event": "ONX", "handler": ""})


@pytest.mark.parametrize("handler", [1, True, [URL], {"url": URL}])
def test_non_string_handler_is_invalid(handler: object) -> None:
    assert "not a string" in invalid_entry({"event": "ONX", "handler": handler})


@pytest.mark.parametrize(
    "handler",
    ["ftp://app.example.com/h", "app.example.com/h", "/b24/events", "mailto:x@example.com", "javascript:1"],
)
def test_non_http_url_is_invalid(handler: str) -> None:
    assert "not an http:// or https:// URL" in invalid_entry({"event": "ONX", "handler": handler})


@pytest.mark.parametrize("handler", ["https://", "https:///path", "http://:8080/h", "https:app.example.com/h"])
def test_url_without_host_is_invalid(handler: str) -> None:
    assert "has no host" in invalid_entry({"event": "ONX", "handler": handler})


@pytest.mark.parametrize("handler", ["https://[::1/h", "https://app.example.com:port/h", "http://h:99999/"])
def test_unparseable_url_is_invalid(handler: str) -> None:
    assert "not a parseable URL" in invalid_entry({"event": "ONX", "handler": handler})


@pytest.mark.parametrize("handler", [f" {URL}", f"{URL} ", f"{URL}\n", "https://app.example.com/a b", f"{URL}\x00"])
def test_url_with_whitespace_or_control_is_invalid(handler: str) -> None:
    assert "white space or control" in invalid_entry({"event": "ONX", "handler": handler})


@pytest.mark.parametrize("handler", [URL, "", None, "ftp://x/"])
def test_offline_with_any_handler_key_is_invalid(handler: object) -> None:
    reason = invalid_entry({"event": "ONX", "event_type": "offline", "handler": handler})
    assert "offline entry must not have a 'handler'" in reason


def test_null_event_type_is_invalid() -> None:
    assert "'event_type' is present but not a string" in invalid_entry(
        {"event": "ONX", "event_type": None, "handler": URL}
    )


def test_empty_event_type_is_invalid() -> None:
    assert "'event_type' is present but empty" in invalid_entry({"event": "ONX", "event_type": "", "handler": URL})


@pytest.mark.parametrize("event_type", ["both", "webhook", " offline", "offline ", "on line"])
def test_unknown_event_type_is_invalid(event_type: str) -> None:
    assert "neither 'online' nor 'offline'" in invalid_entry({"event": "ONX", "event_type": event_type})


@pytest.mark.parametrize("event_type", [1, 0, True, ["offline"]])
def test_non_string_event_type_is_invalid(event_type: object) -> None:
    assert "'event_type' is present but not a string" in invalid_entry({"event": "ONX", "event_type": event_type})


@pytest.mark.parametrize(
    "text",
    [
        '{"handlers": [{"event": "ONX", "handler": "https://a.example/h", "handler": "https://b.example/h"}]}',
        '{"handlers": [{"event": "ONX", "event_type": "online", "event_type": "offline"}]}',
        '{"handlers": [{"event": "ONX", "handler": "https://a.example/h"}], "handlers": []}',
    ],
)
def test_repeated_keys_are_ambiguous(text: str) -> None:
    assert "ambiguous" in invalid(text)


def test_one_bad_entry_among_good_ones_invalidates_the_whole_set() -> None:
    reason = invalid_entry({"event": "ONX", "handler": "ftp://x/"}, before=5)
    assert "handlers[5]" in reason


def test_reasons_name_the_rule_and_index_but_no_value() -> None:
    secret_url = "ftp://user:hunter2@app.example.com/secret-path"
    reason = invalid_entry({"event": "ONSECRETEVENT", "handler": secret_url}, before=2)
    assert "handlers[2]" in reason
    assert "hunter2" not in reason
    assert "secret" not in reason.lower()
    assert "ONSECRETEVENT" not in reason


def test_invalid_declared_set_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        DeclaredSet.parse("{}")


# --- rows of event.get -------------------------------------------------------------------------


def test_online_row_from_api() -> None:
    row = HandlerRow.from_api({"event": "ONCRMLEADADD", "handler": URL, "auth_type": "15", "offline": 0})
    assert row == HandlerRow("ONCRMLEADADD", URL, "15", False, "")
    assert row.as_dict() == {
        "event": "ONCRMLEADADD",
        "handler": URL,
        "auth_type": "15",
        "offline": False,
        "connector_id": "",
    }


def test_offline_row_from_api() -> None:
    row = HandlerRow.from_api({"event": "ONCRMDEALUPDATE", "connector_id": "erp", "offline": 1})
    assert row == HandlerRow("ONCRMDEALUPDATE", None, None, True, "erp")
    assert row.as_dict()["offline"] is True
    assert row.as_dict()["connector_id"] == "erp"


@pytest.mark.parametrize("flag", [1, "1", True, "true", "Y"])
def test_offline_flag_true_spellings(flag: object) -> None:
    assert HandlerRow.from_api({"event": "ONX", "connector_id": "", "offline": flag}).offline is True


@pytest.mark.parametrize("flag", [0, "0", False, "false", "N", ""])
def test_offline_flag_false_spellings(flag: object) -> None:
    assert HandlerRow.from_api({"event": "ONX", "handler": URL, "auth_type": "0", "offline": flag}).offline is False


def test_absent_offline_flag_follows_the_keys() -> None:
    assert HandlerRow.from_api({"event": "ONX", "handler": URL}).offline is False
    assert HandlerRow.from_api({"event": "ONX", "connector_id": ""}).offline is True


def test_integer_auth_type_becomes_a_string() -> None:
    assert HandlerRow.from_api({"event": "ONX", "handler": URL, "auth_type": 15, "offline": 0}).auth_type == "15"


@pytest.mark.parametrize(
    "item",
    [
        None,
        "ONX",
        ["ONX", URL],
        {},
        {"handler": URL, "offline": 0},
        {"event": "", "handler": URL, "offline": 0},
        {"event": None, "handler": URL, "offline": 0},
        {"event": "ONX", "offline": 0},
        {"event": "ONX", "handler": "", "offline": 0},
        {"event": "ONX", "handler": URL, "offline": 2},
        {"event": "ONX", "handler": URL, "offline": "maybe"},
        {"event": "ONX"},
    ],
)
def test_unusable_items_raise_value_error(item: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is not part of the contract
        HandlerRow.from_api(item)


# --- classification ----------------------------------------------------------------------------


def test_declared_online_row_and_stale_url_orphan() -> None:
    rows = [online("ONCRMLEADADD", URL), online("ONCRMLEADADD", OLD_URL)]
    plan = classify(rows, declared({"event": "ONCRMLEADADD", "handler": URL}))
    assert plan == Plan(declared=(rows[0],), orphans=(rows[1],), missing=())


def test_events_compare_case_insensitively() -> None:
    rows = [online("ONCRMLEADADD", URL), offline("ONCRMDEALUPDATE")]
    plan = classify(
        rows,
        declared({"event": "onCrmLeadAdd", "handler": URL}, {"event": "oncrmdealupdate", "event_type": "offline"}),
    )
    assert plan.declared == tuple(rows)
    assert not plan.orphans
    lower_rows = [HandlerRow("oncrmleadadd", URL, "0", False, "")]
    assert classify(lower_rows, declared({"event": "ONCRMLEADADD", "handler": URL})).declared == tuple(lower_rows)


@pytest.mark.parametrize(
    "row_url",
    [
        URL.upper(),
        "HTTPS://app.example.com/b24/events",
        "https://APP.example.com/b24/events",
        URL + "/",
        URL + "?",
        "http://app.example.com/b24/events",
    ],
)
def test_urls_compare_exactly(row_url: str) -> None:
    plan = classify([online("ONCRMLEADADD", row_url)], declared({"event": "ONCRMLEADADD", "handler": URL}))
    assert len(plan.orphans) == 1
    assert plan.missing == (DeclaredHandler("ONCRMLEADADD", URL, False),)


def test_undeclared_event_is_an_orphan() -> None:
    plan = classify([online("ONCRMLEADDELETE", URL)], declared({"event": "ONCRMLEADADD", "handler": URL}))
    assert [r.event for r in plan.orphans] == ["ONCRMLEADDELETE"]


def test_offline_rows_match_offline_entries_only() -> None:
    rows = [offline("ONCRMDEALUPDATE"), offline("ONCRMDEALUPDATE", "erp"), offline("ONCRMLEADADD")]
    plan = classify(
        rows,
        declared({"event": "ONCRMDEALUPDATE", "event_type": "offline"}, {"event": "ONCRMLEADADD", "handler": URL}),
    )
    assert plan.declared == (rows[0], rows[1])  # any connector of a declared offline event is kept
    assert plan.orphans == (rows[2],)  # an online entry never covers an offline row
    assert plan.missing == (DeclaredHandler("ONCRMLEADADD", URL, False),)


def test_offline_entry_does_not_cover_online_rows() -> None:
    rows = [online("ONCRMDEALUPDATE", URL)]
    plan = classify(rows, declared({"event": "ONCRMDEALUPDATE", "event_type": "offline"}))
    assert plan.orphans == tuple(rows)
    assert plan.missing == (DeclaredHandler("ONCRMDEALUPDATE", None, True),)


def test_auth_type_never_matters() -> None:
    rows = [
        online("ONX", URL, "0"),
        online("ONX", URL, "15"),
        online("ONX", OLD_URL, "0"),
        online("ONX", OLD_URL, "7"),
    ]
    plan = classify(rows, declared({"event": "ONX", "handler": URL}))
    assert plan.declared == (rows[0], rows[1])
    assert plan.orphans == (rows[2], rows[3])


def test_onappuninstall_kept_when_not_declared() -> None:
    rows = [online("ONAPPUNINSTALL", OLD_URL), online("ONCRMLEADADD", OLD_URL), offline("ONAPPUNINSTALL")]
    plan = classify(rows, declared({"event": "ONCRMLEADADD", "handler": URL}))
    assert plan.declared == (rows[0], rows[2])
    assert plan.orphans == (rows[1],)


def test_onappuninstall_orphan_when_declared_differently() -> None:
    uninstall_url = "https://app.example.com/b24/uninstall"
    rows = [
        online("ONAPPUNINSTALL", uninstall_url),
        online("ONAPPUNINSTALL", OLD_URL),
        offline("ONAPPUNINSTALL"),
    ]
    plan = classify(rows, declared({"event": "onAppUninstall", "handler": uninstall_url}))
    assert plan.declared == (rows[0],)
    assert plan.orphans == (rows[1], rows[2])
    assert plan.missing == ()


def test_missing_lists_declared_entries_no_row_matches() -> None:
    entries = declared(
        {"event": "ONCRMLEADADD", "handler": URL},
        {"event": "ONCRMDEALUPDATE", "event_type": "offline"},
        {"event": "ONAPPUNINSTALL", "handler": URL},
    )
    plan = classify([online("ONCRMLEADADD", URL, "15")], entries)
    assert plan.missing == (
        DeclaredHandler("ONCRMDEALUPDATE", None, True),
        DeclaredHandler("ONAPPUNINSTALL", URL, False),
    )
    assert classify([], entries).missing == entries.handlers


def test_plan_uninstall_orphans_everything() -> None:
    rows = [online("ONAPPUNINSTALL", URL), online("ONX", URL), offline("ONY", "c")]
    assert plan_uninstall(rows) == Plan(declared=(), orphans=tuple(rows), missing=())
    assert plan_uninstall([]) == Plan((), (), ())


def test_plan_classifies_a_sweep_and_orphans_everything_for_an_uninstall() -> None:
    rows = [online("ONCRMLEADADD", URL), online("ONCRMLEADADD", OLD_URL)]
    entries = declared({"event": "ONCRMLEADADD", "handler": URL})
    assert plan(rows, entries) == classify(rows, entries)
    assert plan(rows, None) == plan_uninstall(rows)


# --- reading event.get ---------------------------------------------------------------------------


def test_listing_reads_rows_and_keeps_unreadable_items_aside() -> None:
    items = [
        {"event": "ONX", "handler": URL, "auth_type": "0", "offline": 0},
        {"event": "ONX"},  # neither online nor offline
        "not an object",
        {"event": "ONY", "connector_id": "erp", "offline": 1},
        {"handler": URL},  # no event
    ]
    listing = Listing.parse(items)
    assert listing.rows == (online("ONX", URL), offline("ONY", "erp"))
    assert listing.unreadable == ({"event": "ONX"}, "not an object", {"handler": URL})
    assert listing.found == 5


def test_listing_reads_a_php_array_with_gaps_sent_as_an_object() -> None:
    listing = Listing.parse({"0": {"event": "ONX", "handler": URL}, "2": {"event": "ONY", "offline": 1}})
    assert [row.event for row in listing.rows] == ["ONX", "ONY"]
    assert Listing.parse([]) == Listing((), ())


@pytest.mark.parametrize("answer", [None, "rows", 3, True])
def test_listing_refuses_an_answer_that_is_not_a_list(answer: object) -> None:
    with pytest.raises(PermanentError) as caught:
        Listing.parse(answer)
    assert (caught.value.code, caught.value.method) == ("BAD_ANSWER", "event.get")


# --- unbind commands ---------------------------------------------------------------------------


def _is_offline(command: Command) -> bool:
    return command.params.get("event_type") == "offline"


def _removes(command: Command, row: HandlerRow) -> bool:
    """Whether `command` is the one that unbinds `row` (what the portal matches, design §5 step 5)."""
    if command.params["event"] != row.event.upper() or _is_offline(command) != row.offline:
        return False
    if row.offline:
        return command.params.get("auth_connector", "") == row.connector_id
    return command.params["handler"] == row.handler


def test_online_pair_across_auth_types_is_one_command_without_auth_type() -> None:
    orphans = [online("ONX", OLD_URL, "0"), online("ONX", OLD_URL, "15"), online("ONX", OLD_URL, "0")]
    (command,) = unbind_commands(orphans)
    assert command.method == "event.unbind"
    assert dict(command.params) == {"event": "ONX", "handler": OLD_URL}
    assert "auth_type" not in command.params
    assert all(_removes(command, row) for row in orphans)
    assert not _is_offline(command)


def test_offline_commands_group_per_connector() -> None:
    orphans = [offline("ONY"), offline("ONY", "erp"), offline("ONY"), offline("ONZ", "erp")]
    commands = unbind_commands(orphans)
    assert [dict(c.params) for c in commands] == [
        {"event": "ONY", "event_type": "offline"},
        {"event": "ONY", "event_type": "offline", "auth_connector": "erp"},
        {"event": "ONZ", "event_type": "offline", "auth_connector": "erp"},
    ]
    assert [sum(_removes(c, row) for row in orphans) for c in commands] == [2, 1, 1]
    assert all("handler" not in c.params and _is_offline(c) for c in commands)


def test_commands_in_order_of_first_appearance_with_safe_keys() -> None:
    orphans = [
        online("ONB", OLD_URL),
        offline("ONA"),
        online("ONA", OLD_URL),
        online("onb", OLD_URL, "3"),  # same pair as the first row: event names are case-insensitive
        online("ONB", URL),
    ]
    commands = unbind_commands(orphans)
    assert [(c.params["event"], c.params.get("handler"), sum(_removes(c, r) for r in orphans)) for c in commands] == [
        ("ONB", OLD_URL, 2),
        ("ONA", None, 1),
        ("ONA", OLD_URL, 1),
        ("ONB", URL, 1),
    ]
    assert [c.key for c in commands] == ["u0", "u1", "u2", "u3"]


def test_keys_stay_non_numeric_and_unique_beyond_one_batch() -> None:
    commands = unbind_commands([online("ONX", f"https://app.example.com/{i}") for i in range(120)])
    keys = [c.key for c in commands]
    assert len(set(keys)) == 120
    assert not any(k.isdigit() or k.lstrip("-").isdigit() for k in keys)
    assert all(k.isascii() and k.isalnum() and len(k) <= 8 for k in keys)


def test_params_are_strings_and_read_only() -> None:
    (command,) = unbind_commands([offline("ONY", "erp")])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in command.params.items())
    with pytest.raises(TypeError):
        command.params["event"] = "ONZ"  # type: ignore[index]
    assert isinstance(hash(command), int)
    with pytest.raises(AttributeError):
        command.key = "u1"  # type: ignore[misc]


def test_batch_query_round_trips() -> None:
    url = "https://app.example.com/h?a=1&b=x y#frag"
    (command,) = unbind_commands([HandlerRow("ONX", url, "0", False, "")])
    method, _, query = command.batch_query().partition("?")
    assert method == "event.unbind"
    assert dict(parse_qsl(query, keep_blank_values=True)) == {"event": "ONX", "handler": url}


def test_no_orphans_no_commands() -> None:
    assert unbind_commands([]) == []


def test_an_online_row_without_a_handler_is_refused_not_guessed() -> None:
    with pytest.raises(ValueError, match="without a handler"):
        unbind_commands([HandlerRow("ONX", None, "0", False, "")])


# --- properties --------------------------------------------------------------------------------

EVENTS = ["ONCRMLEADADD", "ONCRMDEALUPDATE", "ONAPPUNINSTALL", "ONTASKADD"]
URLS = [URL, OLD_URL, "http://127.0.0.1:9/h", "HTTPS://app.example.com/b24/events"]
CONNECTORS = ["", "erp", "crm"]

event_names = st.sampled_from(EVENTS).flatmap(lambda e: st.sampled_from([e, e.lower(), e.title()]))

online_rows = st.builds(
    lambda e, u, a: HandlerRow(e, u, a, False, ""),
    event_names,
    st.sampled_from(URLS),
    st.sampled_from(["0", "1", "15"]),
)
offline_rows = st.builds(lambda e, c: HandlerRow(e, None, None, True, c), event_names, st.sampled_from(CONNECTORS))
rows_strategy = st.lists(st.one_of(online_rows, offline_rows), max_size=30)

entries_strategy = st.lists(
    st.one_of(
        st.builds(lambda e, u: {"event": e, "handler": u}, event_names, st.sampled_from(URLS)),
        st.builds(lambda e, t: {"event": e, "event_type": t}, event_names, st.sampled_from(["offline", "OFFLINE"])),
    ),
    min_size=1,
    max_size=8,
)


def _matches(row: HandlerRow, entry: DeclaredHandler) -> bool:
    if row.event.upper() != entry.event:
        return False
    return row.offline if entry.offline else (not row.offline and row.handler == entry.handler)


@settings(max_examples=300)
@given(rows=rows_strategy, entries=entries_strategy)
def test_classification_properties(rows: list[HandlerRow], entries: list[dict[str, str]]) -> None:
    declared_set = DeclaredSet.parse(json.dumps({"handlers": entries}))
    plan = classify(rows, declared_set)

    # a partition of the rows, order kept within each side
    assert Counter(plan.declared) + Counter(plan.orphans) == Counter(rows)
    # a row that matches an entry is never an orphan (design §7: a declared handler is never unbound)
    for row in plan.orphans:
        assert not any(_matches(row, entry) for entry in declared_set.handlers)
    # a kept row matches an entry, or is an ONAPPUNINSTALL row the set does not mention; for an
    # online row, only an online ONAPPUNINSTALL entry counts as mentioning it (design §3)
    uninstall_declared = any(e.event == "ONAPPUNINSTALL" for e in declared_set.handlers)
    online_uninstall_declared = any(e.event == "ONAPPUNINSTALL" and not e.offline for e in declared_set.handlers)
    for row in plan.declared:
        mentioned = uninstall_declared if row.offline else online_uninstall_declared
        assert any(_matches(row, e) for e in declared_set.handlers) or (
            row.event.upper() == "ONAPPUNINSTALL" and not mentioned
        )
    # and every ONAPPUNINSTALL row the set does not mention is kept (a forgotten entry cuts nothing)
    for row in plan.orphans:
        if row.event.upper() == "ONAPPUNINSTALL":
            assert uninstall_declared if row.offline else online_uninstall_declared
    # auth_type never matters: a pair is all declared or all orphan
    kept_pairs = {(r.event.upper(), r.handler) for r in plan.declared if not r.offline}
    orphan_pairs = {(r.event.upper(), r.handler) for r in plan.orphans if not r.offline}
    assert not kept_pairs & orphan_pairs
    # missing = entries no row matches
    assert set(plan.missing) == {e for e in declared_set.handlers if not any(_matches(r, e) for r in rows)}


@settings(max_examples=300)
@given(orphans=rows_strategy)
def test_unbind_command_properties(orphans: list[HandlerRow]) -> None:
    commands = unbind_commands(orphans)

    online_pairs = [(r.event.upper(), r.handler) for r in orphans if not r.offline]
    online_commands = [(c.params["event"], c.params["handler"]) for c in commands if not _is_offline(c)]
    # every orphan online pair gets exactly one command, and no other command exists
    assert sorted(online_commands) == sorted(set(online_pairs))
    assert len(online_commands) == len(set(online_commands))
    # every offline (event, connector) group gets exactly one command; an empty connector is not sent
    offline_groups = [(r.event.upper(), r.connector_id) for r in orphans if r.offline]
    offline_commands = [(c.params["event"], c.params.get("auth_connector", "")) for c in commands if _is_offline(c)]
    assert sorted(offline_commands) == sorted(set(offline_groups))
    for command in commands:
        if _is_offline(command):
            assert command.params["event_type"] == "offline"
            assert command.params.get("auth_connector", "x") != ""
            assert set(command.params) <= {"event", "event_type", "auth_connector"}
        else:
            assert set(command.params) == {"event", "handler"}
        assert all(isinstance(v, str) for v in command.params.values())
    # every row is removed by exactly one command (a dry run counts the orphan rows as unbound)
    assert all(sum(_removes(c, row) for c in commands) == 1 for row in orphans)
    # keys unique and never numeric
    keys = [c.key for c in commands]
    assert len(set(keys)) == len(keys)
    assert not any(k.isdigit() for k in keys)


@settings(max_examples=200)
@given(entries=entries_strategy, index=st.integers(min_value=0, max_value=7), data=st.data())
def test_one_malformed_entry_always_invalidates(entries: list[dict[str, Any]], index: int, data: st.DataObject) -> None:
    broken = data.draw(
        st.sampled_from(
            [
                {"event": "ONX", "handler": None},
                {"event": "ONX", "handler": ""},
                {"event": "ONX", "event_type": "offline", "handler": URL},
                {"event": "ONX", "handler": "ftp://app.example.com/h"},
                {"event": "ONX", "handler": "https:///h"},
                {"event": "   ", "handler": URL},
                {"event": "ONX", "event_type": None, "handler": URL},
                {"event": "ONX", "event_type": "sometimes"},
                {"event": 5, "handler": URL},
                "ONX",
            ]
        )
    )
    position = min(index, len(entries))
    broken_entries = [*entries[:position], broken, *entries[position:]]
    with pytest.raises(InvalidDeclaredSetError, match=rf"handlers\[{position}\]"):
        DeclaredSet.parse(json.dumps({"handlers": broken_entries}))


def test_only_connector_keyed_offline_commands_go_alone() -> None:
    """design §5 step 5: a connector-keyed offline unbind is a single call, never a batch command."""
    orphans = [online("ONX", OLD_URL), offline("ONY"), offline("ONY", "erp"), offline("ONZ", "shop")]
    commands = unbind_commands(orphans)
    assert [(c.params.get("auth_connector", ""), c.alone) for c in commands] == [
        ("", False),
        ("", False),
        ("erp", True),
        ("shop", True),
    ]


def test_an_offline_uninstall_entry_does_not_expose_online_uninstall_rows() -> None:
    """design §3: online and offline are apart for the ONAPPUNINSTALL exception."""
    s = declared({"event": "ONCRMLEADADD", "handler": URL}, {"event": "ONAPPUNINSTALL", "event_type": "offline"})
    live = online("ONAPPUNINSTALL", "https://app.example.com/b24/uninstall")
    result = classify([live, offline("ONAPPUNINSTALL")], s)
    assert live in result.declared and result.orphans == ()
    # ...while an online entry still makes other online ONAPPUNINSTALL URLs (and offline rows) orphans.
    s = declared({"event": "ONAPPUNINSTALL", "handler": URL})
    result = classify([live, offline("ONAPPUNINSTALL")], s)
    assert result.orphans == (live, offline("ONAPPUNINSTALL"))
