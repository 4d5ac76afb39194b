"""Unit tests of the small core pieces: error classification, pacing, records, jobs, settings, OAuth URLs."""

from __future__ import annotations

import json

import pytest

from b24_cleanup.config import Settings
from b24_cleanup.errors import (
    ConfigError,
    ExpiredTokenError,
    InvalidGrantError,
    PermanentError,
    RateLimitedError,
    RevokedError,
    TransientError,
    UntrustedTargetError,
    classify,
    classify_oauth,
)
from b24_cleanup.jobs import Action, InvalidJobError, Job, JobResult, Outcome
from b24_cleanup.oauth import derive_token_url, trusted_token_url
from b24_cleanup.pacing import Backoff, LeakyBucket
from b24_cleanup.record import PortalRecord, domain_of, valid_member_id

# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("expired_token", 401, ExpiredTokenError),
        ("EXPIRED_TOKEN", 401, ExpiredTokenError),
        ("NO_AUTH_FOUND", 401, ExpiredTokenError),
        ("APPLICATION_NOT_FOUND", 401, RevokedError),
        ("invalid_token", 401, RevokedError),
        ("ERROR_OAUTH", 401, RevokedError),
        ("PAYMENT_REQUIRED", 401, RevokedError),
        ("PORTAL_DELETED", 500, RevokedError),
        ("QUERY_LIMIT_EXCEEDED", 503, RateLimitedError),
        ("query_limit_exceeded", 503, RateLimitedError),
        ("OPERATION_TIME_LIMIT", 429, TransientError),
        ("OVERLOAD_LIMIT", 503, TransientError),
        ("INTERNAL_SERVER_ERROR", 500, TransientError),
        ("ERROR_UNEXPECTED_ANSWER", 500, TransientError),
        ("CONNECTION_ERROR", None, TransientError),
        ("SOMETHING_NEW", 502, TransientError),
        ("ACCESS_DENIED", 403, PermanentError),
        ("WRONG_LICENSE", 403, PermanentError),
        ("ERROR_ARGUMENT", 400, PermanentError),
        ("authorization_error", 401, PermanentError),
        ("SOMETHING_NEW", 400, PermanentError),
        ("", None, PermanentError),
    ],
)
def test_classify(code: str, status: int | None, kind: type) -> None:
    assert classify(code, status) is kind


def test_rate_limited_is_transient() -> None:
    assert issubclass(RateLimitedError, TransientError)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("invalid_grant", 400, InvalidGrantError),
        ("NOT_INSTALLED", 401, InvalidGrantError),
        ("invalid_client", 401, InvalidGrantError),
        ("wrong_client", 200, PermanentError),
        ("PAYMENT_REQUIRED", 402, InvalidGrantError),
        ("invalid_request", 400, PermanentError),
        ("whatever", 503, TransientError),
    ],
)
def test_classify_oauth(code: str, status: int, kind: type) -> None:
    assert classify_oauth(code, status) is kind


def test_error_message_names_method_code_and_description_only() -> None:
    err = classify("ACCESS_DENIED", 403)("ACCESS_DENIED", "no rights", status=403, method="event.unbind")
    assert str(err) == "event.unbind: ACCESS_DENIED (HTTP 403): no rights"


# ------------------------------------------------------------------------------------------ pacing


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_bucket_allows_the_burst_then_paces_at_the_rate() -> None:
    t = FakeTime()
    bucket = LeakyBucket(2.0, 50, clock=t.clock, sleep=t.sleep)
    waits = [bucket.acquire() for _ in range(60)]
    assert waits[:50] == [0.0] * 50
    assert all(w > 0 for w in waits[50:])
    assert t.now == pytest.approx(10 / 2.0)  # ten over the burst at two a second


def test_bucket_drains_while_idle() -> None:
    t = FakeTime()
    bucket = LeakyBucket(2.0, 5, clock=t.clock, sleep=t.sleep)
    for _ in range(5):
        bucket.acquire()
    t.now += 2.5  # five drained
    assert [bucket.acquire() for _ in range(5)] == [0.0] * 5


def test_bucket_saturate_makes_the_next_call_wait() -> None:
    t = FakeTime()
    bucket = LeakyBucket(2.0, 50, clock=t.clock, sleep=t.sleep)
    bucket.saturate()
    assert bucket.acquire() == pytest.approx(0.5)


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate"):
        LeakyBucket(0, 50)


def test_backoff_grows_and_is_capped() -> None:
    backoff = Backoff(attempts=6, base=0.5, cap=4.0)
    delays = [backoff.delay(n) for n in range(1, 7)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(d <= 4.0 for d in delays)
    assert max(delays[3:]) >= 2.0


# ------------------------------------------------------------------------------------------ records


def test_record_keeps_unknown_keys_and_never_prints_tokens() -> None:
    record = PortalRecord.from_json(
        json.dumps(
            {
                "member_id": "abc",
                "domain": "x.bitrix24.com",
                "access_token": "AT-secret",
                "refresh_token": "RT-secret",
                "custom": [1, 2],
            }
        )
    )
    assert json.loads(record.to_json())["custom"] == [1, 2]
    assert "secret" not in repr(record) and "secret" not in str(record)


def test_record_refresh_due_within_five_minutes() -> None:
    record = PortalRecord({"access_token": "x", "expires": 1000})
    assert not record.refresh_due(now=699)
    assert record.refresh_due(now=700)
    assert PortalRecord({"access_token": "x", "expires": "soon"}).refresh_due(now=0)
    assert PortalRecord({"expires": 10**10}).refresh_due(now=0)  # no access token at all


def test_record_rejects_non_objects() -> None:
    with pytest.raises(ValueError, match="object"):
        PortalRecord.from_json("[1]")


@pytest.mark.parametrize(
    ("endpoint", "domain"),
    [
        ("https://example.bitrix24.com/rest/", "example.bitrix24.com"),
        ("http://127.0.0.5:8080/rest/", "127.0.0.5"),
        # No path segment names a portal: only the host does.
        ("http://127.0.0.1:8080/acme.bitrix24.test/rest/", "127.0.0.1"),
        ("https://example.bitrix24.com/", "example.bitrix24.com"),
    ],
)
def test_domain_of(endpoint: str, domain: str) -> None:
    assert domain_of(endpoint) == domain


@pytest.mark.parametrize("member_id", ["a223c6b3710f85df22e9377d6c4f7553", "abc_1-2-3", "x" * 64, "A"])
def test_valid_member_ids(member_id: str) -> None:
    assert valid_member_id(member_id)


@pytest.mark.parametrize(
    "member_id",
    ["", "..", "a/b", "../app/credentials", "x" * 65, None, 5, "a b", "abc_1.2-3", "\u0661\u0662", "ß"],
)
def test_invalid_member_ids(member_id: object) -> None:
    assert not valid_member_id(member_id)


@pytest.mark.parametrize("tail", ["\n", "\r\n", "\r", "\x00", " ", "\t", "\u2028"])
def test_member_id_ending_in_a_newline_is_malformed(tail: str) -> None:
    # `$` matches before a final newline: the check must be a full match (design §5 endpoint).
    assert not valid_member_id("a223c6b3710f85df22e9377d6c4f7553" + tail)


# ------------------------------------------------------------------------------------------ jobs


def test_job_round_trip_and_repr_hides_the_application_token() -> None:
    job = Job(Action.UNINSTALL, "abc", application_token="app-secret", clean=True, ts="1700000000")
    assert Job.parse(json.dumps(job.to_message())) == job
    assert "app-secret" not in repr(job)
    assert Job.parse('{"action": "sweep", "member_id": "abc"}') == Job(Action.SWEEP, "abc")


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1]",
        '{"action": "delete", "member_id": "abc"}',
        '{"action": "sweep"}',
        '{"action": "sweep", "member_id": "../x"}',
        '{"action": "uninstall", "member_id": "abc"}',
        '{"action": "uninstall", "member_id": "abc", "application_token": ""}',
    ],
)
def test_bad_job_bodies_are_refused(body: str) -> None:
    with pytest.raises(InvalidJobError):
        Job.parse(body)


def test_outcomes_map_to_metrics_one_to_one() -> None:
    counters = {}
    for outcome in Outcome:
        values = JobResult(Action.SWEEP, "abc", outcome=outcome).metrics()
        assert values["PortalsProcessed"] == 1
        counters[outcome] = [k for k, v in values.items() if v and k.startswith("Portals") and k != "PortalsProcessed"]
    assert counters == {
        Outcome.CLEANED: ["PortalsCleaned"],
        Outcome.CLEAN: [],
        Outcome.REVOKED: ["PortalsRevoked"],
        Outcome.SKIPPED: ["PortalsSkipped"],
        Outcome.INCOMPLETE: ["PortalsIncomplete"],
        Outcome.FAILED: ["PortalsFailed"],
    }


# ------------------------------------------------------------------------------------------ settings


def test_settings_from_env() -> None:
    settings = Settings.from_env(
        {"B24_SSM_PREFIX": "/b24-cleanup/prod/", "B24_DRY_RUN": "TRUE", "B24_REVOKED_GRACE_DAYS": "3"}
    )
    assert settings.ssm_prefix == "/b24-cleanup/prod"
    assert settings.dry_run and settings.revoked_grace_days == 3 and not settings.accept_install
    assert Settings.from_env({"B24_SSM_PREFIX": "/p"}).revoked_grace_days == 7


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"B24_SSM_PREFIX": "relative/path"},
        {"B24_SSM_PREFIX": "/p", "B24_DRY_RUN": "maybe"},
        {"B24_SSM_PREFIX": "/p", "B24_REVOKED_GRACE_DAYS": "seven"},
        {"B24_SSM_PREFIX": "/p", "B24_REVOKED_GRACE_DAYS": "-1"},
    ],
)
def test_bad_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


# ------------------------------------------------------------------------------------------ OAuth URLs


def test_derive_token_url() -> None:
    assert derive_token_url("https://oauth.bitrix.info/rest/") == "https://oauth.bitrix.info/oauth/token/"
    assert derive_token_url("https://oauth.bitrix24.tech/rest/") == "https://oauth.bitrix24.tech/oauth/token/"
    # B24_OAUTH_URL is configuration: it wins over whatever the record names.
    assert derive_token_url("http://127.0.0.1:8080/rest/", "http://127.0.0.1:9/oauth/token/") == (
        "http://127.0.0.1:9/oauth/token/"
    )


@pytest.mark.parametrize(
    "server_endpoint",
    ["", "http://127.0.0.1:8080/rest/", "http://oauth.bitrix.info/rest/", "https://oauth.bitrix.info.evil.com/rest/"],
)
def test_derive_token_url_refuses_an_untrusted_server_endpoint(server_endpoint: str) -> None:
    with pytest.raises(UntrustedTargetError) as caught:
        derive_token_url(server_endpoint)
    assert "untrusted server_endpoint" in str(caught.value)


@pytest.mark.parametrize(
    ("server_endpoint", "expected"),
    [
        ("https://oauth.bitrix.info/rest/", "https://oauth.bitrix.info/oauth/token/"),
        ("https://oauth.bitrix24.tech/rest/", "https://oauth.bitrix24.tech/oauth/token/"),
        ("https://oauth.bitrix.info:443/rest/", "https://oauth.bitrix.info/oauth/token/"),
        ("http://oauth.bitrix.info/rest/", None),
        ("https://oauth.bitrix.info:8443/rest/", None),
        ("https://user:pw@oauth.bitrix.info/rest/", None),
        ("https://oauth.bitrix.info.evil.com/rest/", None),
        ("https://evil.com/oauth.bitrix.info/rest/", None),
        ("https://127.0.0.1/rest/", None),
        ("", None),
        ("https://oauth.bitrix.info:bad/rest/", None),
    ],
)
def test_trusted_token_url(server_endpoint: str, expected: str | None) -> None:
    assert trusted_token_url(server_endpoint, None) == expected


def test_trusted_token_url_override_wins() -> None:
    assert trusted_token_url("https://evil.com/rest/", "http://127.0.0.1:1/oauth/token/") == (
        "http://127.0.0.1:1/oauth/token/"
    )


# ------------------------------------------------------------------------------------------ remote text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("QUERY_LIMIT_EXCEEDED", "QUERY_LIMIT_EXCEEDED"),  # codes are split by `_`: kept
        ("Internationalization matters", "Internationalization matters"),  # a long word without digits
        ("token 0123456789abcdef0123 refused", "token [redacted] refused"),  # 20 with a digit
        ("secret " + "a" * 50, "secret [redacted]"),  # 24+ of anything: a client secret
        ("ERR_" + "f" * 64, "ERR_[redacted]"),  # a code carrying a token
        ("line one\nline two\r\x00three", "line one line two three"),  # one line, no control characters
        ("x" * 500, "[redacted]"),
        (None, ""),
        (404, "404"),
    ],
)
def test_scrub_makes_remote_text_safe_to_log(text: object, expected: str) -> None:
    from b24_cleanup.logsafety import scrub

    assert scrub(text) == expected
    assert len(scrub("word " * 100)) <= 200
