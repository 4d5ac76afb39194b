"""The client's two policies as decision tables: when to try again, and where a token may follow a redirect.

Plus the two seams they sit on, over real loopback HTTP: a redirect loop ends after the rule's
limit, and a back-off counts the rate limit and saturates the portal's bucket.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from b24_cleanup.client import MAX_REDIRECTS, PortalClient, Redirect, Verdict, redirect_refusal, redirect_verdict
from b24_cleanup.errors import (
    B24Error,
    ExpiredTokenError,
    PermanentError,
    RateLimitedError,
    RevokedError,
    TransientError,
)
from b24_cleanup.pacing import Backoff, LeakyBucket, RetryPolicy
from b24_cleanup.record import PortalRecord
from b24_cleanup.tokens import ChainState, TokenKeeper

NOW = 1000.0
POLICY = RetryPolicy(Backoff(attempts=3, base=0.01, cap=0.02), max_time_limit_wait=30.0)


def _error(kind: type[B24Error], code: str, reset_at: float | None = None) -> B24Error:
    error = kind(code, status=503)
    error.operating_reset_at = reset_at
    return error


# ------------------------------------------------------------------------------------------ retry policy

BACKOFF_1 = (0.005, 0.01)  # try 1 failed: between half and all of base
BACKOFF_2 = (0.01, 0.02)  # try 2 failed: the step doubled (and capped)


@pytest.mark.parametrize(
    ("error", "tries", "expected"),
    [
        # transient answers are retried with backoff and jitter, up to the attempts bound
        (_error(RateLimitedError, "QUERY_LIMIT_EXCEEDED"), 1, BACKOFF_1),
        (_error(RateLimitedError, "QUERY_LIMIT_EXCEEDED"), 2, BACKOFF_2),
        (_error(RateLimitedError, "QUERY_LIMIT_EXCEEDED"), 3, None),
        (_error(TransientError, "INTERNAL_SERVER_ERROR"), 1, BACKOFF_1),
        (_error(TransientError, "TIMEOUT"), 2, BACKOFF_2),
        (_error(TransientError, "CONNECTION_FAILED"), 3, None),
        # OVERLOAD_LIMIT is a manual block: never retried, whatever its case
        (_error(TransientError, "OVERLOAD_LIMIT"), 1, None),
        (_error(TransientError, "overload_limit"), 1, None),
        # OPERATION_TIME_LIMIT waits until the method unblocks, up to the max wait
        (_error(TransientError, "OPERATION_TIME_LIMIT", NOW + 12), 1, (12.0, 12.0)),
        (_error(TransientError, "OPERATION_TIME_LIMIT", NOW + 30), 1, (30.0, 30.0)),
        (_error(TransientError, "OPERATION_TIME_LIMIT", NOW + 600), 1, None),
        (_error(TransientError, "OPERATION_TIME_LIMIT", NOW - 5), 1, BACKOFF_1),  # already reset
        (_error(TransientError, "OPERATION_TIME_LIMIT"), 2, BACKOFF_2),  # no reset time given
        (_error(TransientError, "OPERATION_TIME_LIMIT", NOW + 12), 3, None),  # attempts bound first
        # everything else is not the retry loop's business
        (_error(PermanentError, "ACCESS_DENIED"), 1, None),
        (_error(ExpiredTokenError, "expired_token"), 1, None),
        (_error(RevokedError, "APPLICATION_NOT_FOUND"), 1, None),
    ],
)
def test_retry_policy_decisions(error: B24Error, tries: int, expected: tuple[float, float] | None) -> None:
    wait = POLICY.wait(error, tries, now=NOW)
    if expected is None:
        assert wait is None
    else:
        assert wait is not None and expected[0] <= wait <= expected[1]


def test_client_back_off_counts_the_rate_limit_saturates_the_bucket_and_sleeps() -> None:
    slept: list[float] = []
    client = _client(requests.Session(), "http://127.0.0.1:9/rest/", slept=slept)
    client._back_off(_error(RateLimitedError, "QUERY_LIMIT_EXCEEDED"), 1)
    assert client.stats.rate_limited == 1
    assert len(slept) == 1 and 0.005 <= slept[0] <= 0.01
    assert client.bucket.acquire() > 0  # saturated: the next request paces
    with pytest.raises(RateLimitedError):  # attempts are bounded
        client._back_off(_error(RateLimitedError, "QUERY_LIMIT_EXCEEDED"), 3)
    assert client.stats.rate_limited == 2


def test_client_back_off_raises_what_the_policy_gives_up_on_without_sleeping() -> None:
    slept: list[float] = []
    client = _client(requests.Session(), "http://127.0.0.1:9/rest/", slept=slept)
    for error in (_error(TransientError, "OVERLOAD_LIMIT"), _error(PermanentError, "ACCESS_DENIED")):
        with pytest.raises(type(error)):
            client._back_off(error, 1)
    assert slept == [] and client.stats.rate_limited == 0


# ------------------------------------------------------------------------------------------ redirect rule

OLD = "https://old.bitrix24.com/rest/event.get"
NEW = "https://new.bitrix24.com/rest/"
FOLLOW, CONFIRM, REFUSE = Verdict.FOLLOW, Verdict.CONFIRM, Verdict.REFUSE


@pytest.mark.parametrize(
    ("source", "target", "hops", "confirmed", "verdict"),
    [
        # the same host (and port): followed without asking anyone
        ("http://127.0.0.1:8/old/rest/event.get", "http://127.0.0.1:8/new/rest/event.get", 1, None, FOLLOW),
        (OLD, "https://OLD.bitrix24.com/rest/event.get", 1, None, FOLLOW),  # host names have no case
        ("http://old.bitrix24.com/rest/x", "https://old.bitrix24.com/rest/x", 1, None, FOLLOW),  # an upgrade
        (OLD, "https://old.bitrix24.com/rest/event.get", MAX_REDIRECTS, None, FOLLOW),
        # another host, or the same host on another port: only once the OAuth server names it
        (OLD, "https://new.bitrix24.com/rest/event.get", 1, None, CONFIRM),
        ("http://127.0.0.1:8/rest/x", "http://127.0.0.1:9/rest/x", 1, None, CONFIRM),
        ("http://old.bitrix24.com/rest/x", "https://new.bitrix24.com/rest/x", 1, None, CONFIRM),
        (OLD, "https://new.bitrix24.com/rest/event.get", 1, NEW, FOLLOW),
        (OLD, "https://new.bitrix24.com:443/rest/event.get", 1, NEW, FOLLOW),  # the default port, spelt out
        (OLD, "https://new.bitrix24.com/rest/event.get", 1, "https://other.bitrix24.com/rest/", REFUSE),
        (OLD, "https://new.bitrix24.com:8443/rest/event.get", 1, NEW, REFUSE),  # another port
        (OLD, "https://new.bitrix24.com/rest/event.get", 1, "http://new.bitrix24.com/rest/", REFUSE),  # scheme
        (OLD, "https://new.bitrix24.com/rest/event.get", 1, OLD, REFUSE),  # the answer names the old address
        # never, whatever the OAuth server says
        (OLD, "https://old.bitrix24.com/rest/event.get", MAX_REDIRECTS + 1, None, REFUSE),  # too many hops
        (OLD, "https://new.bitrix24.com/rest/event.get", MAX_REDIRECTS + 1, NEW, REFUSE),
        (OLD, "http://old.bitrix24.com/rest/event.get", 1, None, REFUSE),  # https -> http: clear text
        (OLD, "HTTP://old.bitrix24.com/rest/event.get", 1, None, REFUSE),  # the same, spelt loud
        (OLD, "http://new.bitrix24.com/rest/event.get", 1, "http://new.bitrix24.com/rest/", REFUSE),
        (OLD, "https://user:pw@new.bitrix24.com/rest/event.get", 1, NEW, REFUSE),  # user info
        (OLD, "https://old.bitrix24.com:99999/rest/event.get", 1, None, REFUSE),  # no port at all
        (OLD, "https://old.bitrix24.com/rest/ event.get", 1, None, REFUSE),  # white space
        (OLD, "ftp://new.bitrix24.com/rest/event.get", 1, None, REFUSE),  # off the web
        (OLD, "javascript:alert(1)", 1, None, REFUSE),
        (OLD, "file:///etc/passwd", 1, None, REFUSE),
    ],
)
def test_redirect_rule(source: str, target: str, hops: int, confirmed: str | None, verdict: Verdict) -> None:
    got, reason = redirect_verdict(Redirect(source, target, 302), hops, confirmed)
    assert got is verdict
    assert target not in reason and "new.bitrix24" not in reason  # the reason never echoes an address
    refusal = redirect_refusal(Redirect(source, target, 302), hops, confirmed)
    assert (refusal is None) is (verdict is FOLLOW)


@pytest.mark.parametrize(
    ("target", "endpoint"),
    [
        ("https://new.bitrix24.com/rest/event.get", "https://new.bitrix24.com/rest/"),
        ("http://127.0.0.1:8/new.bitrix24.test/rest/batch", "http://127.0.0.1:8/new.bitrix24.test/rest/"),
        ("https://new.bitrix24.com/somewhere/else", None),
        ("https://new.bitrix24.com/x?next=/rest/", None),  # a query is not an address
    ],
)
def test_redirect_names_the_new_client_endpoint(target: str, endpoint: str | None) -> None:
    assert Redirect(OLD, target, 302).client_endpoint == endpoint


class _Looping(http.server.BaseHTTPRequestHandler):
    """Every POST answers 302 to another address on the same server, for ever."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(302)
        self.send_header("Location", f"/hop{self.path.count('/')}/rest/event.get")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def looping() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Looping)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/start/rest/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_redirect_loop_ends_incomplete_after_the_rules_limit(looping: str) -> None:
    with requests.Session() as session:
        client = _client(session, looping)
        with pytest.raises(PermanentError) as caught:
            client.call("event.get")
    assert caught.value.code == "BAD_REDIRECT" and caught.value.method == "event.get"
    assert client.stats.rest_calls == 1 + MAX_REDIRECTS  # the first request and each followed hop
    assert client.moved_to is not None and client.moved_to.endswith("/rest/")  # reported, not stored


def _client(session: requests.Session, endpoint: str, slept: list[float] | None = None) -> PortalClient:
    record = PortalRecord({"member_id": "m1", "client_endpoint": endpoint, "access_token": "a", "expires": 2**40})
    keeper = TokenKeeper(None, "m1", record, lambda: None, chains=ChainState())  # type: ignore[arg-type] - no refresh is due
    sleep = (slept if slept is not None else []).append
    return PortalClient(
        keeper, session=session, bucket=LeakyBucket(2.0, 50, sleep=sleep), retry=POLICY, sleep=sleep, clock=lambda: NOW
    )
