"""The event body parser (payload.py): PHP bracket forms, JSON, limits, and the UninstallPost view."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from fixtures.aws import APPLICATION_TOKEN, MEMBER_ID, load_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b24_cleanup.payload import (
    FORM_TYPE,
    MAX_BODY_BYTES,
    MAX_DEPTH,
    MAX_FIELDS,
    ONAPPINSTALL,
    ONAPPUNINSTALL,
    ONAPPUPDATE,
    InstallPost,
    PayloadError,
    PayloadTooLargeError,
    RegistrationInvalidError,
    UninstallPost,
    parse_event_body,
    parse_post,
)

SECRET = "S3CR3T-VALUE-0123456789abcdef"

EXPECTED_UNINSTALL = {
    "event": "ONAPPUNINSTALL",
    "data": {"LANGUAGE_ID": "en", "CLEAN": "1"},
    "ts": "1795172400",
    "auth": {
        "domain": "example.bitrix24.com",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "client_endpoint": "https://example.bitrix24.com/rest/",
        "member_id": MEMBER_ID,
        "application_token": APPLICATION_TOKEN,
    },
}


def form_body_of(name: str) -> bytes:
    event = load_event(name)
    assert event["isBase64Encoded"] is True
    return base64.b64decode(event["body"])


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """What PHP's http_build_query does to nested arrays (indexed lists, as Bitrix24 sends them)."""
    if isinstance(value, dict):
        items = value.items()
    else:
        return [(prefix, value)]
    pairs: list[tuple[str, str]] = []
    for key, child in items:
        name = f"{prefix}[{key}]" if prefix else key
        pairs.extend(flatten(child, name))
    return pairs


# -- the sample events ---------------------------------------------------------------------------


def test_bitrix24_form_body_becomes_nested_dict() -> None:
    assert parse_event_body(form_body_of("uninstall_form.json"), FORM_TYPE) == EXPECTED_UNINSTALL


def test_json_body_has_the_same_structure() -> None:
    event = load_event("uninstall_json.json")
    assert parse_event_body(event["body"].encode(), "application/json") == EXPECTED_UNINSTALL


def test_event_post_from_form_and_json_agree() -> None:
    form = UninstallPost.from_payload(parse_event_body(form_body_of("uninstall_form.json"), FORM_TYPE))
    as_json = UninstallPost.from_payload(
        parse_event_body(load_event("uninstall_json.json")["body"].encode(), "application/json")
    )
    assert form == as_json
    assert form.event == "ONAPPUNINSTALL"
    assert form.member_id == MEMBER_ID
    assert form.application_token == APPLICATION_TOKEN
    assert form.ts == "1795172400"
    assert form.clean is True
    assert form.auth["domain"] == "example.bitrix24.com"
    assert form.data == {"LANGUAGE_ID": "en", "CLEAN": "1"}


def test_repr_never_shows_tokens() -> None:
    body = form_body_of("uninstall_form.json") + b"&auth%5Baccess_token%5D=" + SECRET.encode()
    post = UninstallPost.from_payload(parse_event_body(body, FORM_TYPE))
    for text in (repr(post), str(post), f"{post}", f"{post!r}"):
        assert APPLICATION_TOKEN not in text
        assert SECRET not in text
        assert MEMBER_ID in text


# -- bracket keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("a[]=1&a[]=2", {"a": ["1", "2"]}),
        ("data[FIELDS][ID]=7", {"data": {"FIELDS": {"ID": "7"}}}),
        ("a[0]=x&a[1]=y", {"a": {"0": "x", "1": "y"}}),
        ("b[][x]=1&b[][y]=2", {"b": [{"x": "1"}, {"y": "2"}]}),
        ("c[d][]=3&c[d][]=4&c[e]=5", {"c": {"d": ["3", "4"], "e": "5"}}),
        ("a[b=1", {"a[b": "1"}),  # not bracket syntax: one flat key, like nothing else
        ("a]=1", {"a]": "1"}),
        ("a[b]c=1", {"a[b]c": "1"}),
        ("empty=&x=%20y+z", {"empty": "", "x": " y z"}),
        ("name=%D0%9F%D1%80%D0%B8%D0%B2%D0%B5%D1%82", {"name": "Привет"}),
        ("a%5Bb%5D%5B%5D=1", {"a": {"b": ["1"]}}),
    ],
)
def test_unflattening(body: str, expected: dict[str, Any]) -> None:
    assert parse_event_body(body.encode(), FORM_TYPE) == expected


@pytest.mark.parametrize(
    "body",
    [
        f"auth={SECRET}&auth[a]={SECRET}",  # the same name as a value and as a container
        f"auth[a]={SECRET}&auth={SECRET}",
        f"a={SECRET}&a={SECRET}",  # the same name twice
        f"auth[member_id]={SECRET}&auth[member_id]={SECRET}",
        f"a[]={SECRET}&a[x]={SECRET}",  # [] mixed with named keys
        f"a[x]={SECRET}&a[]={SECRET}",
        f"a[x][]={SECRET}&a[x][y]={SECRET}",
        f"a[]={SECRET}&a={SECRET}",
    ],
)
def test_conflicting_keys_are_refused_without_echoing(body: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_event_body(body.encode(), FORM_TYPE)
    assert SECRET not in str(caught.value)


def test_depth_limit() -> None:
    ok = "a" + "[x]" * MAX_DEPTH + "=1"
    parse_event_body(ok.encode(), FORM_TYPE)
    with pytest.raises(PayloadError, match="nested"):
        parse_event_body(("a" + "[x]" * (MAX_DEPTH + 1) + "=1").encode(), FORM_TYPE)


def test_field_count_limit() -> None:
    ok = "&".join(f"k{i}=v" for i in range(MAX_FIELDS))
    assert len(parse_event_body(ok.encode(), FORM_TYPE)) == MAX_FIELDS
    with pytest.raises(PayloadError, match="more than"):
        parse_event_body((ok + "&one=more").encode(), FORM_TYPE)


@pytest.mark.parametrize(
    "body",
    [f"{SECRET}", f"a=1&&b={SECRET}", f"a={SECRET}&", f"&a={SECRET}", f"{SECRET}&a=1", "&", "&&"],
)
def test_strict_form_syntax(body: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_event_body(body.encode(), FORM_TYPE)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"a=\xff\xfe", "UTF-8"),
        (b"a=%ff%fe", "UTF-8"),
    ],
)
def test_encoding_problems(body: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        parse_event_body(body, FORM_TYPE)


def test_size_limit_is_enforced_by_the_core_too() -> None:
    body = b"a=" + b"x" * (MAX_BODY_BYTES - 2)
    parse_event_body(body, FORM_TYPE)
    with pytest.raises(PayloadTooLargeError):
        parse_event_body(body + b"x", FORM_TYPE)


# -- content types and JSON -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "Application/X-WWW-Form-UrlEncoded; charset=UTF-8", None, ""],
)
def test_form_content_types(content_type: str | None) -> None:
    assert parse_event_body(form_body_of("uninstall_form.json"), content_type) == EXPECTED_UNINSTALL


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", None, "application/vnd.b24+json"]
)
def test_json_content_types(content_type: str | None) -> None:
    body = json.dumps(EXPECTED_UNINSTALL).encode()
    assert parse_event_body(body, content_type) == EXPECTED_UNINSTALL


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data; boundary=x", "application/xml"])
def test_other_content_types_are_refused(content_type: str) -> None:
    with pytest.raises(PayloadError, match="content type"):
        parse_event_body(form_body_of("uninstall_form.json"), content_type)


@pytest.mark.parametrize(
    "body",
    [
        f'["{SECRET}"]',
        f'"{SECRET}"',
        "42",
        "null",
        f'{{"a": "{SECRET}",}}',
        f'{{"a": "{SECRET}", "a": "{SECRET}"}}',  # duplicate key: parsers disagree on the winner
        f'{{"auth": {{"member_id": "{SECRET}", "member_id": "x"}}}}',
    ],
)
def test_bad_json_is_refused_without_echoing(body: str) -> None:
    with pytest.raises(PayloadError) as caught:
        parse_event_body(body.encode(), "application/json")
    assert SECRET not in str(caught.value)


def test_json_depth_and_size_limits() -> None:
    # Like the form's `a[x]...[x]=1`: the innermost object MAX_DEPTH levels below the top one.
    nested: Any = "leaf"
    for _ in range(MAX_DEPTH + 1):
        nested = {"k": nested}
    parse_event_body(json.dumps(nested).encode(), "application/json")
    with pytest.raises(PayloadError, match="nested"):
        parse_event_body(json.dumps({"k": nested}).encode(), "application/json")
    # Far beyond the interpreter's recursion limit: refused, not a RecursionError.
    deep = b"{" + b'"a":[' * 30000
    with pytest.raises(PayloadError):
        parse_event_body(deep, "application/json")
    deep_list = b'{"a":' + b"[" * 60000 + b"]" * 60000 + b"}"
    with pytest.raises(PayloadError):
        parse_event_body(deep_list[:MAX_BODY_BYTES], "application/json")
    with pytest.raises(PayloadError, match="more than"):
        parse_event_body(json.dumps({"a": list(range(MAX_FIELDS + 1))}).encode(), "application/json")


# -- UninstallPost --------------------------------------------------------------------------------------


def _payload(**changes: Any) -> dict[str, Any]:
    payload = json.loads(json.dumps(EXPECTED_UNINSTALL))
    for key, value in changes.items():
        if key.startswith("auth_"):
            name = key.removeprefix("auth_")
            if value is None:
                payload["auth"].pop(name, None)
            else:
                payload["auth"][name] = value
        elif value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"auth_member_id": None}, r"auth\[member_id\]"),
        ({"auth_member_id": ""}, r"auth\[member_id\]"),
        ({"auth_member_id": 12}, r"auth\[member_id\]"),
        ({"auth_application_token": None}, r"auth\[application_token\]"),
        ({"auth_application_token": "  "}, r"auth\[application_token\]"),
        ({"auth_application_token": ["x"]}, r"auth\[application_token\]"),
        ({"auth": None}, r"auth\[member_id\]"),
        ({"auth": SECRET}, r"auth\[member_id\]"),
        ({"event": None}, "event"),
        ({"event": ""}, "event"),
        ({"event": {"x": SECRET}}, "event"),
        ({"data": SECRET}, "data"),
        ({"ts": {"x": SECRET}}, "ts"),
        ({"ts": True}, "ts"),
    ],
)
def test_event_post_refuses_what_the_uninstall_path_cannot_use(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(PayloadError, match=reason) as caught:
        UninstallPost.from_payload(_payload(**changes))
    assert SECRET not in str(caught.value)
    assert APPLICATION_TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("clean", "expected"),
    [("1", True), ("0", False), ("Y", True), ("N", False), (1, True), (0, False), (True, True), ("maybe", None)],
)
def test_clean_flag(clean: Any, expected: bool | None) -> None:
    payload = _payload()
    payload["data"]["CLEAN"] = clean
    assert UninstallPost.from_payload(payload).clean is expected


def test_optional_fields() -> None:
    post = UninstallPost.from_payload(_payload(ts=None, data=None, event="onappuninstall"))
    assert post.ts is None
    assert post.clean is None
    assert post.data == {}
    assert post.event == "ONAPPUNINSTALL"
    assert UninstallPost.from_payload(_payload(ts=1795172400)).ts == "1795172400"
    assert UninstallPost.from_payload(_payload(ts="")).ts is None


def test_token_is_not_stripped() -> None:
    # Compared byte for byte with the stored one: padding must not turn a wrong token into a right one.
    post = UninstallPost.from_payload(_payload(auth_application_token=f" {APPLICATION_TOKEN} "))
    assert post.application_token == f" {APPLICATION_TOKEN} "


# -- properties ------------------------------------------------------------------------------------

_names = st.text(
    alphabet=st.characters(exclude_characters="[]&=%+#", exclude_categories=("Cs",)), min_size=1, max_size=8
)
_values = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
_trees = st.recursive(
    _values,
    lambda children: st.dictionaries(_names, children, min_size=1, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_names, _trees, min_size=1, max_size=5))
def test_http_build_query_round_trip(tree: dict[str, Any]) -> None:
    """Whatever PHP's http_build_query makes of a nested array, we read back as that array."""
    pairs = flatten(tree)
    body = urlencode(pairs, quote_via=quote)
    depth_ok = all(key.count("[") <= MAX_DEPTH for key, _ in pairs)
    if not depth_ok or len(body) > MAX_BODY_BYTES:
        return
    assert parse_event_body(body.encode(), FORM_TYPE) == tree


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.text(alphabet='ab[]=&%5BD+{}":,x0', max_size=200).map(str.encode),
        st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    ),
    st.sampled_from([None, "", FORM_TYPE, "application/json", "text/plain", "application/x-www-form-urlencoded; x"]),
)
def test_parser_only_ever_raises_payload_error(body: bytes, content_type: str | None) -> None:
    try:
        result = parse_event_body(body, content_type)
    except PayloadError:
        return
    assert isinstance(result, dict)
    with contextlib.suppress(PayloadError):
        UninstallPost.from_payload(result)


# -- parse_post: one typed post per body -------------------------------------------------------------


def test_parse_post_gives_an_uninstall_post_for_an_uninstall() -> None:
    post = parse_post(_payload())
    assert isinstance(post, UninstallPost)
    assert post.event == ONAPPUNINSTALL


@pytest.mark.parametrize("event", [ONAPPINSTALL, ONAPPUPDATE, " onappinstall "])
def test_parse_post_gives_an_install_post_for_an_install_or_update(event: str) -> None:
    post = parse_post(_payload(event=event, auth_refresh_token=f" {SECRET} ", auth_scope="crm"))
    assert isinstance(post, InstallPost)
    assert post.event == event.strip().upper()
    assert post.refresh_token == SECRET  # stripped, as registration always did
    assert post.scope == "crm"
    assert SECRET not in repr(post) and SECRET not in str(post)


def test_an_install_body_without_its_tokens_is_registration_invalid() -> None:
    with pytest.raises(RegistrationInvalidError, match=r"auth\[refresh_token\] is missing") as caught:
        parse_post(_payload(event=ONAPPINSTALL))
    assert isinstance(caught.value, PayloadError)  # a 400, like every other unusable body


def test_parse_post_refuses_other_events() -> None:
    with pytest.raises(PayloadError, match="event is not ONAPPUNINSTALL"):
        parse_post(_payload(event="ONCRMLEADADD"))
