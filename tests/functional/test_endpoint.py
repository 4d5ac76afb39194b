"""The uninstall endpoint (handlers/endpoint.py): design §5's status matrix, side effects, metrics, logs."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any
from urllib.parse import parse_qsl, urlencode

import hypothesis
import pytest
from botocore.exceptions import ClientError
from fixtures.aws import APPLICATION_TOKEN, FORM, MEMBER_ID, WRONG_TOKEN, AwsAccount, Stdout, load_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from b24_cleanup import payload, queue, runtime, uninstall
from b24_cleanup.handlers import endpoint
from b24_cleanup.payload import MAX_BODY_BYTES, InstallPost

TS = "1795172400"
UNAUTHORIZED_BODY = json.dumps({"error": "unauthorized"}, separators=(",", ":"))
EXPECTED_JOB = {
    "action": "uninstall",
    "member_id": MEMBER_ID,
    "application_token": APPLICATION_TOKEN,
    "clean": True,
    "ts": TS,
}
SEEDED_PARAMETERS = (
    "/b24-cleanup/test/app/credentials",
    "/b24-cleanup/test/app/handlers",
    f"/b24-cleanup/test/portals/{MEMBER_ID}",
)
SIDE_EFFECT_CALLS = {"sqs.SendMessage", "sqs.SendMessageBatch", "ssm.PutParameter", "ssm.DeleteParameter"}


@pytest.fixture(autouse=True)
def _fresh_endpoint() -> Any:
    runtime.reset()
    yield
    runtime.reset()


def genuine_pairs() -> list[tuple[str, str]]:
    """The ONAPPUNINSTALL form fields of events/uninstall_form.json, in Bitrix24's order."""
    raw = base64.b64decode(load_event("uninstall_form.json")["body"]).decode()
    return parse_qsl(raw, keep_blank_values=True, strict_parsing=True)


def form_body(**changes: str | None) -> bytes:
    """The genuine body with fields replaced (`auth_member_id="x"` → auth[member_id]) or dropped (`=None`)."""
    pairs = genuine_pairs()
    for short, value in changes.items():
        base, _, rest = short.partition("_")
        key = f"{base}[{rest}]" if rest else base
        pairs = [(k, v) for k, v in pairs if k != key]
        if value is not None:
            pairs.append((key, value))
    return urlencode(pairs).encode()


def http_event(
    body: bytes | str | None,
    *,
    b64: bool = True,
    content_type: str | None = FORM,
    method: str = "POST",
    base: str = "uninstall_form.json",
) -> dict[str, Any]:
    event = load_event(base)
    event["requestContext"]["http"]["method"] = method
    if content_type is None:
        event["headers"].pop("content-type", None)
    else:
        event["headers"]["content-type"] = content_type
    if isinstance(body, bytes):
        event["body"] = base64.b64encode(body).decode() if b64 else body.decode("utf-8", "surrogateescape")
    else:
        event["body"] = body
    event["isBase64Encoded"] = b64
    return event


def invoke(event: dict[str, Any], lambda_context: Any) -> dict[str, Any]:
    return endpoint.lambda_handler(event, lambda_context)


def uninstall_dedup(ts: str) -> str:
    return hashlib.sha256(f"uninstall:{MEMBER_ID}:{ts}".encode()).hexdigest()


def assert_no_side_effect(aws: AwsAccount, versions_before: dict[str, int]) -> None:
    assert aws.queue_depth() == 0
    assert aws.param_versions() == versions_before


def assert_clean_output(stdout: Stdout) -> None:
    """No token anywhere in stdout; no portal identity in any metric."""
    text = stdout.read()
    assert APPLICATION_TOKEN not in text
    assert WRONG_TOKEN not in text
    for blob in stdout.emf():
        flat = json.dumps(blob)
        assert MEMBER_ID not in flat
        assert APPLICATION_TOKEN not in flat


def endpoint_metrics(stdout: Stdout) -> dict[str, float]:
    blobs = stdout.emf()
    for blob in blobs:
        (directive,) = blob["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "B24Cleanup"
        assert directive["Dimensions"] == [["action"]]
        assert blob["action"] == "endpoint"
    return stdout.metric_values()


def watched(api_calls: Any) -> Any:
    """Create the endpoint's clients up front so that every AWS call they make is recorded."""
    return api_calls.watch(runtime.endpoint_store().client, runtime.endpoint_sqs())


# -- accepted ---------------------------------------------------------------------------------------


def test_genuine_form_base64_uninstall_is_queued(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, api_calls: Any
) -> None:
    versions = mock_aws.param_versions()
    calls = watched(api_calls)

    answer = invoke(load_event("uninstall_form.json"), lambda_context)

    assert answer["statusCode"] == 200
    assert json.loads(answer["body"]) == {"status": "accepted"}
    assert answer["headers"]["content-type"] == "application/json"
    # One SSM read and one SQS send, nothing else (design §5).
    assert calls == ["ssm.GetParameter", "sqs.SendMessage"]
    (message,) = mock_aws.receive_all()
    assert json.loads(message["Body"]) == EXPECTED_JOB
    assert message["Attributes"]["MessageGroupId"] == MEMBER_ID
    assert message["Attributes"]["MessageDeduplicationId"] == uninstall_dedup(TS)
    assert mock_aws.param_versions() == versions  # verifying writes nothing

    assert endpoint_metrics(stdout) == {"UninstallAccepted": 1}
    assert_clean_output(stdout)
    (line,) = [log for log in stdout.logs() if log.get("message") == "uninstall accepted"]
    assert line["member_id"] == MEMBER_ID
    assert line["correlation_id"] == load_event("uninstall_form.json")["requestContext"]["requestId"]


def test_json_body_is_accepted_too(mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout) -> None:
    answer = invoke(load_event("uninstall_json.json"), lambda_context)
    assert answer["statusCode"] == 200
    (message,) = mock_aws.receive_all()
    assert json.loads(message["Body"]) == EXPECTED_JOB
    assert message["Attributes"]["MessageDeduplicationId"] == uninstall_dedup(TS)
    assert_clean_output(stdout)


def test_plain_text_form_body_is_accepted(mock_aws: AwsAccount, lambda_context: Any) -> None:
    answer = invoke(http_event(form_body(), b64=False), lambda_context)
    assert answer["statusCode"] == 200
    assert len(mock_aws.receive_all()) == 1


def test_repeated_delivery_is_queued_once(mock_aws: AwsAccount, lambda_context: Any) -> None:
    for _ in range(3):
        assert invoke(load_event("uninstall_form.json"), lambda_context)["statusCode"] == 200
    assert mock_aws.queue_depth() == 1


def test_clean_zero_and_missing_ts(mock_aws: AwsAccount, lambda_context: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue.time, "time", lambda: 1795172999.75)
    answer = invoke(http_event(form_body(data_CLEAN="0", ts=None)), lambda_context)
    assert answer["statusCode"] == 200
    (message,) = mock_aws.receive_all()
    assert json.loads(message["Body"]) == {**EXPECTED_JOB, "clean": False, "ts": None}
    # Without `ts` the current unix second stands in for it in the deduplication id.
    assert message["Attributes"]["MessageDeduplicationId"] == uninstall_dedup("1795172999")


def test_exactly_64_kib_is_accepted(mock_aws: AwsAccount, lambda_context: Any) -> None:
    body = form_body()
    pad = MAX_BODY_BYTES - len(body) - len("&data%5BPAD%5D=")
    body = form_body(data_PAD="x" * pad)
    assert len(body) == MAX_BODY_BYTES
    assert invoke(http_event(body), lambda_context)["statusCode"] == 200
    assert mock_aws.queue_depth() == 1


# -- rejected: the status matrix ---------------------------------------------------------------------


def _no_clients_created() -> bool:
    return runtime.created() == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"])
def test_non_post_is_405(mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, method: str) -> None:
    versions = mock_aws.param_versions()
    answer = invoke(http_event(form_body(), method=method), lambda_context)
    assert answer["statusCode"] == 405
    assert answer["headers"]["allow"] == "POST"
    assert _no_clients_created()
    assert_no_side_effect(mock_aws, versions)
    assert endpoint_metrics(stdout) == {"UninstallRejected": 1}


def test_event_without_request_context_is_405(mock_aws: AwsAccount, lambda_context: Any) -> None:
    event = load_event("uninstall_form.json")
    del event["requestContext"]
    assert invoke(event, lambda_context)["statusCode"] == 405


@pytest.mark.parametrize("b64", [True, False])
def test_body_over_64_kib_is_413(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, b64: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions = mock_aws.param_versions()
    body = form_body()
    body = form_body(data_PAD="x" * (MAX_BODY_BYTES - len(body) - len("&data%5BPAD%5D=") + 1))
    assert len(body) == MAX_BODY_BYTES + 1
    # The size is decided before parsing: the parser must not even be reached.
    monkeypatch.setattr(endpoint, "parse_event_body", lambda *a: pytest.fail("parsed an oversized body"))
    answer = invoke(http_event(body, b64=b64), lambda_context)
    assert answer["statusCode"] == 413
    assert _no_clients_created()
    assert_no_side_effect(mock_aws, versions)
    assert endpoint_metrics(stdout) == {"UninstallRejected": 1}


def test_absurd_base64_body_is_413_without_decoding(
    mock_aws: AwsAccount, lambda_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(payload.base64, "b64decode", lambda *a, **k: pytest.fail("decoded an absurd body"))
    answer = invoke(http_event("QUFB" * 2_000_000, b64=True), lambda_context)
    assert answer["statusCode"] == 413
    assert mock_aws.queue_depth() == 0


def test_multibyte_text_body_over_64_kib_is_413(mock_aws: AwsAccount, lambda_context: Any) -> None:
    # 40,000 characters, 80,000 bytes: the limit counts bytes.
    body = "event=ONAPPUNINSTALL&x=" + "я" * 40_000
    assert invoke(http_event(body, b64=False), lambda_context)["statusCode"] == 413


@pytest.mark.parametrize(
    "body",
    [
        "not base64!!",
        "QUJD=",  # wrong padding
        "QUJ",  # truncated
        "QUJD\nRA==",  # whitespace is not base64
        "Zm9v\u00e9",  # non-ASCII
    ],
)
def test_bad_base64_is_400(mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, body: str) -> None:
    versions = mock_aws.param_versions()
    answer = invoke(http_event(body, b64=True), lambda_context)
    assert answer["statusCode"] == 400
    assert _no_clients_created()
    assert_no_side_effect(mock_aws, versions)
    assert endpoint_metrics(stdout) == {"UninstallRejected": 1}


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"garbage", FORM),
        (b"", FORM),
        (b"\xff\xfe\x00garbage", FORM),
        (b"a=1&&b=2", FORM),
        (b"[1, 2]", "application/json"),
        (b"{not json", "application/json"),
        (b"event=ONAPPUNINSTALL", "text/plain"),
        (b"auth=x&auth[member_id]=" + MEMBER_ID.encode(), FORM),  # conflicting keys
    ],
)
def test_unparseable_body_is_400(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, body: bytes, content_type: str
) -> None:
    versions = mock_aws.param_versions()
    answer = invoke(http_event(body, content_type=content_type), lambda_context)
    assert answer["statusCode"] == 400
    assert json.loads(answer["body"])["error"] == "bad_request"
    assert _no_clients_created()
    assert_no_side_effect(mock_aws, versions)
    assert endpoint_metrics(stdout) == {"UninstallRejected": 1}


def test_missing_body_is_400(mock_aws: AwsAccount, lambda_context: Any) -> None:
    event = load_event("uninstall_form.json")
    del event["body"]
    assert invoke(event, lambda_context)["statusCode"] == 400


@pytest.mark.parametrize("event_name", ["ONAPPINSTALL", "ONAPPUPDATE", "ONCRMLEADADD", "ONAPPTEST", ""])
def test_other_events_are_400(mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, event_name: str) -> None:
    versions = mock_aws.param_versions()
    answer = invoke(http_event(form_body(event=event_name)), lambda_context)
    assert answer["statusCode"] == 400
    assert _no_clients_created()
    assert_no_side_effect(mock_aws, versions)
    assert endpoint_metrics(stdout) == {"UninstallRejected": 1}


def test_event_name_case_does_not_matter(mock_aws: AwsAccount, lambda_context: Any) -> None:
    assert invoke(http_event(form_body(event="onAppUninstall")), lambda_context)["statusCode"] == 200


@pytest.mark.parametrize(
    "changes",
    [
        {"auth_member_id": None},
        {"auth_application_token": None},
        {"auth_member_id": ""},
        {"auth_application_token": ""},
        {"auth_member_id": None, "auth_application_token": None},
    ],
)
def test_missing_auth_fields_are_400(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, changes: dict[str, str | None]
) -> None:
    versions = mock_aws.param_versions()
    answer = invoke(http_event(form_body(**changes)), lambda_context)
    assert answer["statusCode"] == 400
    assert _no_clients_created()
    assert_no_side_effect(mock_aws, versions)
    assert endpoint_metrics(stdout) == {"UninstallRejected": 1}
    assert_clean_output(stdout)


def test_missing_auth_fields_in_json_are_400(mock_aws: AwsAccount, lambda_context: Any) -> None:
    event = load_event("uninstall_json.json")
    body = json.loads(event["body"])
    del body["auth"]["application_token"]
    event["body"] = json.dumps(body)
    assert invoke(event, lambda_context)["statusCode"] == 400
    assert mock_aws.queue_depth() == 0


# -- rejected: 401 ----------------------------------------------------------------------------------


def test_wrong_token_is_401(mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, api_calls: Any) -> None:
    versions = mock_aws.param_versions()
    calls = watched(api_calls)
    answer = invoke(load_event("uninstall_spoofed.json"), lambda_context)
    assert answer["statusCode"] == 401
    assert answer["body"] == UNAUTHORIZED_BODY
    assert calls == ["ssm.GetParameter"]  # the record read, and nothing after it
    assert_no_side_effect(mock_aws, versions)
    assert endpoint_metrics(stdout) == {"UninstallRejected": 1}
    assert_clean_output(stdout)
    (line,) = [log for log in stdout.logs() if log.get("message") == "request rejected"]
    assert line["member_id"] == MEMBER_ID
    assert line["reason"] == "application_token does not match"
    assert line["status"] == 401


def test_unknown_member_is_401_with_the_same_body(mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout) -> None:
    versions = mock_aws.param_versions()
    spoofed = invoke(load_event("uninstall_spoofed.json"), lambda_context)
    unknown = invoke(http_event(form_body(auth_member_id="ffffffffffffffffffffffffffffffff")), lambda_context)
    assert unknown["statusCode"] == spoofed["statusCode"] == 401
    assert unknown["body"] == spoofed["body"] == UNAUTHORIZED_BODY
    assert unknown["headers"] == spoofed["headers"]
    assert_no_side_effect(mock_aws, versions)
    assert endpoint_metrics(stdout) == {"UninstallRejected": 2}
    reasons = [log["reason"] for log in stdout.logs() if log.get("message") == "request rejected"]
    assert reasons == ["application_token does not match", "unknown member_id"]
    assert_clean_output(stdout)


@pytest.mark.parametrize(
    "member_id",
    ["../app/credentials", "a223c6b3710f85df22e9377d6c4f7553/../x", "a" * 200, "a b", "..", "порт"],
)
def test_malformed_member_id_is_401_without_any_aws_call(
    mock_aws: AwsAccount, lambda_context: Any, api_calls: Any, member_id: str
) -> None:
    versions = mock_aws.param_versions()
    calls = watched(api_calls)
    answer = invoke(http_event(form_body(auth_member_id=member_id)), lambda_context)
    assert answer["statusCode"] == 401
    assert answer["body"] == UNAUTHORIZED_BODY
    assert calls == []
    assert_no_side_effect(mock_aws, versions)


@pytest.mark.parametrize(
    "member_id",
    [MEMBER_ID + "\n", MEMBER_ID + "\r\n", MEMBER_ID + "\r", "\n" + MEMBER_ID, MEMBER_ID + " ", "a.b", "a" * 65],
)
def test_member_id_ending_in_a_newline_is_401_before_any_aws_call(
    mock_aws: AwsAccount, lambda_context: Any, api_calls: Any, member_id: str
) -> None:
    """`$` matches before a final newline; design §5 wants 1-64 of [A-Za-z0-9_-], wholly (item 11)."""
    versions = mock_aws.param_versions()
    calls = watched(api_calls)
    answer = invoke(http_event(form_body(auth_member_id=member_id)), lambda_context)
    assert (answer["statusCode"], answer["body"]) == (401, UNAUTHORIZED_BODY)
    assert calls == []
    assert_no_side_effect(mock_aws, versions)


@pytest.mark.parametrize(
    "token",
    [
        APPLICATION_TOKEN[:-1],
        APPLICATION_TOKEN + "0",
        APPLICATION_TOKEN.upper(),
        " " + APPLICATION_TOKEN,
        APPLICATION_TOKEN + "\x00",
    ],
)
def test_near_miss_tokens_are_401(mock_aws: AwsAccount, lambda_context: Any, token: str) -> None:
    versions = mock_aws.param_versions()
    answer = invoke(http_event(form_body(auth_application_token=token)), lambda_context)
    assert answer["statusCode"] == 401
    assert_no_side_effect(mock_aws, versions)


def test_record_without_application_token_never_verifies(mock_aws: AwsAccount, lambda_context: Any) -> None:
    mock_aws.put_portal("b" * 32, "")
    versions = mock_aws.param_versions()
    answer = invoke(http_event(form_body(auth_member_id="b" * 32, auth_application_token="x")), lambda_context)
    assert answer["statusCode"] == 401
    assert_no_side_effect(mock_aws, versions)


def test_token_compare_is_constant_time(
    mock_aws: AwsAccount, lambda_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real = uninstall.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(uninstall.hmac, "compare_digest", spy)
    invoke(load_event("uninstall_spoofed.json"), lambda_context)
    assert seen == [(APPLICATION_TOKEN.encode(), WRONG_TOKEN.encode())]


# -- install events ---------------------------------------------------------------------------------


def _install_body(**auth: str | None) -> bytes:
    fields = {
        "auth_refresh_token": "posted-refresh-token",
        "auth_access_token": "posted-access-token",
        **auth,
    }
    return form_body(event="ONAPPINSTALL", data_CLEAN=None, **fields)


def test_spoofed_install_with_accept_install_is_401_and_writes_nothing(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("B24_ACCEPT_INSTALL", "true")
    monkeypatch.setenv("B24_OAUTH_URL", "http://127.0.0.1:9/oauth/token/")  # nothing listens: refresh fails
    versions = mock_aws.param_versions()
    answer = invoke(http_event(_install_body()), lambda_context)
    assert answer["statusCode"] == 401
    assert answer["body"] == UNAUTHORIZED_BODY
    assert_no_side_effect(mock_aws, versions)
    assert endpoint_metrics(stdout) == {"InstallsRejected": 1}
    text = stdout.read()
    assert "posted-refresh-token" not in text
    assert "posted-access-token" not in text


def test_install_without_refresh_token_is_400(
    mock_aws: AwsAccount, lambda_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("B24_ACCEPT_INSTALL", "true")
    versions = mock_aws.param_versions()
    answer = invoke(http_event(_install_body(auth_refresh_token=None)), lambda_context)
    assert answer["statusCode"] == 400
    assert_no_side_effect(mock_aws, versions)


def test_registered_install_is_200(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    from b24_cleanup import registration

    seen: list[Any] = []

    def fake_register(post: Any, store: Any, *, oauth_url: str | None = None, **_: Any) -> Any:
        seen.append(post)
        return registration.Registration(member_id=MEMBER_ID, event="ONAPPINSTALL", created=False)

    monkeypatch.setenv("B24_ACCEPT_INSTALL", "true")
    monkeypatch.setattr(registration, "register", fake_register)
    answer = invoke(http_event(_install_body()), lambda_context)
    assert answer["statusCode"] == 200
    assert json.loads(answer["body"]) == {"status": "registered"}
    (post,) = seen
    # The body is parsed once, into the typed post registration takes as it is.
    assert isinstance(post, InstallPost) and post.event == "ONAPPINSTALL"
    assert post.refresh_token == "posted-refresh-token"
    assert "posted-refresh-token" not in repr(post)
    assert endpoint_metrics(stdout) == {"InstallsRegistered": 1}
    assert "posted-refresh-token" not in stdout.read()


def test_registration_failing_on_our_side_is_503(
    mock_aws: AwsAccount, lambda_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from b24_cleanup import registration
    from b24_cleanup.errors import ConfigError

    def broken(*_: Any, **__: Any) -> Any:
        raise ConfigError("app credentials are missing")

    monkeypatch.setenv("B24_ACCEPT_INSTALL", "true")
    monkeypatch.setattr(registration, "register", broken)
    assert invoke(http_event(_install_body()), lambda_context)["statusCode"] == 503


def test_the_event_is_never_logged_even_when_powertools_is_told_to(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_LOGGER_LOG_EVENT", "true")
    assert invoke(load_event("uninstall_form.json"), lambda_context)["statusCode"] == 200
    assert invoke(load_event("uninstall_json.json"), lambda_context)["statusCode"] == 200
    text = stdout.read()
    assert APPLICATION_TOKEN not in text
    assert load_event("uninstall_form.json")["body"][:40] not in text


# -- dependencies failing -----------------------------------------------------------------------------


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def test_ssm_failure_is_503(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = runtime.endpoint_store()

    def throttled(**_: Any) -> None:
        raise _client_error("ThrottlingException", 400)

    monkeypatch.setattr(store.client, "get_parameter", throttled)
    answer = invoke(load_event("uninstall_form.json"), lambda_context)
    assert answer["statusCode"] == 503
    assert mock_aws.queue_depth() == 0
    assert "UninstallAccepted" not in stdout.metric_values()
    assert_clean_output(stdout)
    assert any(log["level"] == "ERROR" for log in stdout.logs())


def test_sqs_failure_is_503(
    mock_aws: AwsAccount, lambda_context: Any, stdout: Stdout, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(**_: Any) -> None:
        raise _client_error("InternalError", 500)

    monkeypatch.setattr(runtime.endpoint_sqs(), "send_message", refused)
    answer = invoke(load_event("uninstall_form.json"), lambda_context)
    assert answer["statusCode"] == 503
    assert stdout.metric_values() == {}
    assert_clean_output(stdout)


def test_missing_queue_configuration_is_503(
    mock_aws: AwsAccount, lambda_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("B24_QUEUE_URL")
    assert invoke(load_event("uninstall_form.json"), lambda_context)["statusCode"] == 503


def test_misconfiguration_never_turns_a_malformed_request_into_a_5xx(
    lambda_context: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No AWS at all, no prefix: everything that is decided on the input alone still gets its 4xx.
    monkeypatch.delenv("B24_SSM_PREFIX", raising=False)
    assert invoke(http_event(form_body(), method="GET"), lambda_context)["statusCode"] == 405
    assert invoke(http_event(b"garbage"), lambda_context)["statusCode"] == 400
    assert invoke(http_event(form_body(event="ONCRMLEADADD")), lambda_context)["statusCode"] == 400
    assert invoke(http_event(form_body(auth_member_id="../x")), lambda_context)["statusCode"] == 401


# -- fuzzing ----------------------------------------------------------------------------------------

_segment = st.one_of(
    st.sampled_from(["", "auth", "member_id", "application_token", "event", "data", "CLEAN", "0", "ts"]),
    st.text(max_size=6),
)
_key = st.builds(
    lambda base, segs: base + "".join(f"[{s}]" for s in segs),
    st.sampled_from(["event", "auth", "data", "ts", "a", ""]) | st.text(max_size=6),
    st.lists(_segment, max_size=20),
)
_value = st.one_of(
    st.sampled_from(["ONAPPUNINSTALL", "ONAPPINSTALL", MEMBER_ID, WRONG_TOKEN, "", "1"]),
    st.text(max_size=40),
)
_form = st.lists(st.tuples(_key, _value), max_size=30).map(lambda pairs: urlencode(pairs).encode() if pairs else b"")
_forged_uninstall = st.builds(
    lambda member, token, extra: form_body(auth_member_id=member, auth_application_token=token, **extra),
    st.sampled_from([MEMBER_ID, "f" * 32, "../app/handlers"]) | st.text(min_size=1, max_size=40),
    st.text(min_size=1, max_size=40).filter(lambda t: t != APPLICATION_TOKEN),
    st.dictionaries(st.sampled_from(["ts", "data_CLEAN", "auth_domain"]), st.text(max_size=20) | st.none()),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
).map(lambda value: json.dumps(value).encode())
_sized = st.builds(  # around the 64 KiB limit, with a wrong token: nothing here may be genuine
    lambda n, fill: form_body(auth_application_token=WRONG_TOKEN, data_PAD=fill * max(0, n - len(form_body()) - 15)),
    st.integers(MAX_BODY_BYTES - 40, MAX_BODY_BYTES + 40),
    st.sampled_from(["x", "%"]),
)


@st.composite
def http_requests(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(st.one_of(st.binary(max_size=600), _form, _forged_uninstall, _forged_uninstall, _json, _sized))
    b64 = draw(st.booleans())
    content_type = draw(
        st.sampled_from([FORM, FORM, "application/json", None, "text/plain", FORM + "; charset=UTF-8", "x"]).flatmap(
            lambda ct: st.just(ct) if ct != "x" else st.text(max_size=30)
        )
    )
    method = draw(st.sampled_from(["POST"] * 12 + ["GET", "PUT", "OPTIONS"]))
    event = http_event(body, b64=b64, content_type=content_type, method=method)
    mangle = draw(st.sampled_from(["none"] * 6 + ["truncate", "corrupt", "drop_flag", "null_body"]))
    if mangle == "truncate" and event["body"]:
        event["body"] = event["body"][: draw(st.integers(0, len(event["body"])))]
    elif mangle == "corrupt":
        event["body"] = (event["body"] or "") + draw(st.text(min_size=1, max_size=3))
    elif mangle == "drop_flag":
        event["isBase64Encoded"] = not b64
    elif mangle == "null_body":
        event["body"] = None
    return event


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(event=http_requests())
def test_fuzz_never_5xx_never_a_side_effect(
    mock_aws: AwsAccount, lambda_context: Any, api_calls: Any, event: dict[str, Any]
) -> None:
    # The fixture runs once for all examples: its three parameters are still at version 1 at the
    # end of every example exactly when nothing was ever written.
    # No strategy ever produces the stored application_token, so no request here is genuine.
    watched(api_calls)  # idempotent (unique_id): the clients are cached across examples
    answer = invoke(event, lambda_context)
    hypothesis.event(f"status {answer['statusCode']}")
    assert answer["statusCode"] in {400, 401, 405, 413}, answer
    assert not SIDE_EFFECT_CALLS & set(api_calls)
    assert mock_aws.queue_depth() == 0
    assert mock_aws.param_versions() == dict.fromkeys(SEEDED_PARAMETERS, 1)
