"""A small Bitrix24 REST client for one portal (design §10.8-§11).

JSON POST to `{client_endpoint}{method}` with `auth` in the body; one exception type per meaning.
A request is `send` (one paced, bounded HTTP request: a total time limit and an answer size limit,
see transport.py) under two policies: `redirect_verdict`, the one rule for re-sending a token
after a portal's 3xx, and `pacing.RetryPolicy` for transient answers. A followed move is reported
in `moved_to`; the caller stores it. `batch` packs up to 50 commands a request and falls back to
single calls when the portal refuses it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

import requests

from .commands import Command, CommandResult
from .errors import (
    MISSING_FROM_BATCH,
    B24Error,
    ExpiredTokenError,
    PermanentError,
    RateLimitedError,
    RevokedError,
    TransientError,
    UntrustedTargetError,
    make_error,
)
from .logsafety import scrub
from .oauth import USER_AGENT
from .pacing import LeakyBucket, RetryPolicy
from .tokens import TokenKeeper
from .transport import Answer, AnswerTooLargeError, AnswerTooSlowError, bounded

log = logging.getLogger(__name__)

BATCH_LIMIT = 50
# (connect timeout, total time limit of one request from connect to last byte). The worker stops
# starting requests 35 s before its invocation's timeout, so one started in time always ends in time.
DEFAULT_TIMEOUT = (3.05, 30.0)
MAX_REDIRECTS = 3
# A portal that drips, stalls or floods: retried by the queue, never again within the job.
ANSWER_TOO_SLOW = "ANSWER_TOO_SLOW"
ANSWER_TOO_LARGE = "ANSWER_TOO_LARGE"
UNCONFIRMED_MOVE = "moved to an address the OAuth server does not confirm"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECTS = {301, 302, 303, 307, 308}


@dataclass
class CallStats:
    rest_calls: int = 0  # HTTP requests that reached the portal's REST endpoint
    rate_limited: int = 0  # QUERY_LIMIT_EXCEEDED answers


@dataclass(frozen=True)
class Redirect:
    """A portal answered a redirect: the request's URL, the absolute target, the HTTP status."""

    source: str
    target: str
    status: int

    @property
    def client_endpoint(self) -> str | None:
        """The target's `.../rest/` prefix: the portal's new address, when the target names one."""
        parts = urlsplit(self.target)
        cut = parts.path.rfind("/rest/")
        if cut == -1:
            return None
        return f"{parts.scheme}://{parts.netloc}{parts.path[: cut + len('/rest/')]}"


class Redirected(Exception):  # a signal from `send` to its caller, not an error: outside the B24Error tree
    """Raised by :meth:`PortalClient.send` for a 3xx answer; the caller decides whether to follow."""

    def __init__(self, redirect: Redirect) -> None:
        super().__init__(f"redirected (HTTP {redirect.status})")  # no URL: it could carry anything
        self.redirect = redirect


class Verdict(enum.Enum):
    FOLLOW = "follow"  # re-send the request (and its token) to the target
    CONFIRM = "confirm"  # another host: follow only once the OAuth server names it
    REFUSE = "refuse"


def _origin(parts: SplitResult) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL without user info, or None when it is anything else."""
    try:
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    return scheme, parts.hostname.lower().rstrip("."), port or _DEFAULT_PORTS[scheme]


def origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of `url` when it is a plain http(s) address, else None."""
    if not isinstance(url, str) or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        return None
    try:
        return _origin(urlsplit(url))
    except ValueError:
        return None


def redirect_verdict(redirect: Redirect, hops: int, confirmed_endpoint: str | None = None) -> tuple[Verdict, str]:
    """The one redirect rule (design §5 step 3): may the request and its token go to the target?

    `hops` counts this request's redirects, this one included; `confirmed_endpoint` is the
    client_endpoint the OAuth server named in a refresh made for this move (None: none made yet).
    At most MAX_REDIRECTS; only to an http(s) address with no user info; never from https down to
    http (the token would cross the network in clear text); to the same host (and port; an upgrade
    from http to https on the default ports included) freely; to another host only when the OAuth
    server's client_endpoint names the target's scheme, host and port. The reason never holds the
    address: it is the portal's, and could carry anything.
    """
    if hops > MAX_REDIRECTS:
        return Verdict.REFUSE, f"the portal redirected more than {MAX_REDIRECTS} times"
    source, target = origin_of(redirect.source), origin_of(redirect.target)
    if target is None or source is None:
        return Verdict.REFUSE, "the portal redirected off the web"
    if source[0] == "https" and target[0] == "http":
        return Verdict.REFUSE, "the portal redirected from https to http"
    upgrade = source == ("http", target[1], 80) and target == ("https", target[1], 443)
    if source[1:] == target[1:] or upgrade:
        return Verdict.FOLLOW, "the same host"
    if confirmed_endpoint is None:
        return Verdict.CONFIRM, "another host"
    if origin_of(confirmed_endpoint) == target:
        return Verdict.FOLLOW, "the OAuth server confirms the new address"
    return Verdict.REFUSE, UNCONFIRMED_MOVE


def redirect_refusal(redirect: Redirect, hops: int, confirmed_endpoint: str | None = None) -> str | None:
    """Why the token must not follow `redirect` (another host counts as unconfirmed), or None."""
    verdict, reason = redirect_verdict(redirect, hops, confirmed_endpoint)
    if verdict is Verdict.FOLLOW:
        return None
    return UNCONFIRMED_MOVE if verdict is Verdict.CONFIRM else reason


class PortalClient:
    def __init__(
        self,
        tokens: TokenKeeper,
        *,
        session: requests.Session,
        bucket: LeakyBucket,
        retry: RetryPolicy | None = None,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        deadline: float | None = None,
    ) -> None:
        self.tokens = tokens
        self.deadline = deadline  # time.monotonic() after which no request is started
        self.session = session
        self.bucket = bucket
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.sleep = sleep
        self.clock = clock
        self.stats = CallStats()
        self.batch_refused = False
        self.moved_to: str | None = None  # the portal's new client_endpoint, once a redirect was followed
        self._confirmed: str | None = None  # the client_endpoint a refresh for a move named

    # -- single calls ------------------------------------------------------------------
    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call `method` and return its `result`; refresh once on an expired token."""
        params = dict(params or {})
        token = self.tokens.access_token()
        try:
            return self._post(method, params, token)
        except ExpiredTokenError as exc:
            if self.tokens.fresh:
                # Refused right after a refresh: the app is gone (design §5 step 3).
                raise RevokedError(
                    exc.code, "refused again after a token refresh", status=exc.status, method=method
                ) from None
            self.tokens.refresh(stale_token=token)
        try:
            return self._post(method, params, self.tokens.record.access_token)
        except ExpiredTokenError as exc:
            raise RevokedError(
                exc.code, "refused again after a token refresh", status=exc.status, method=method
            ) from None

    def _post(self, method: str, params: dict[str, Any], token: str) -> Any:
        """Send until answered: follow redirects the rule allows, retry what the policy says."""
        url = urljoin(self.tokens.record.client_endpoint, method)
        tries = hops = 0
        while True:
            self._check_deadline(method)
            try:
                return self.send(url, method, params, token)
            except Redirected as moved:
                hops += 1  # a move is not a failed try
                url, token = self._follow(moved.redirect, hops, method, token)
            except B24Error as error:
                tries += 1
                self._back_off(error, tries)

    def send(self, url: str, method: str, params: Mapping[str, Any], token: str) -> Any:
        """One paced, bounded HTTP request: its `result`, else the classified B24Error or :class:`Redirected`.

        Redirects are never followed here: the token travels in the JSON body, so where it goes
        next is the caller's decision. The request ends within the total time limit and reads at
        most 8 MiB of answer (transport.py): a portal that drips, stalls or floods fails this job
        transiently and nothing else.
        """
        self.bucket.acquire()
        self.stats.rest_calls += 1
        connect, limit = self.timeout
        try:
            response = bounded(
                self.session,
                "POST",
                url,
                limit=limit,
                connect_timeout=connect,
                json={**params, "auth": token},
                headers={"Accept": "application/json", "User-Agent": USER_AGENT},
            )
        except AnswerTooSlowError:
            raise TransientError(ANSWER_TOO_SLOW, f"no whole answer within {limit:g} s", method=method) from None
        except AnswerTooLargeError:
            raise TransientError(ANSWER_TOO_LARGE, "the answer is over the size limit", method=method) from None
        except requests.Timeout:
            raise TransientError("TIMEOUT", "no answer in time", method=method) from None
        except requests.RequestException as exc:
            raise TransientError("CONNECTION_FAILED", type(exc).__name__, method=method) from None
        if response.status in _REDIRECTS:
            target = urljoin(url, response.headers.get("Location", ""))
            raise Redirected(Redirect(url, target, response.status))
        outcome = _read(response, method)
        if isinstance(outcome, B24Error):
            raise outcome
        return outcome

    def _check_deadline(self, method: str) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            # Better a clean transient failure (the queue retries the job, which plans afresh)
            # than a Lambda timeout that fails the whole batch mid-request.
            raise TransientError("OUT_OF_TIME", "the invocation is about to time out", method=method)

    def _follow(self, redirect: Redirect, hops: int, method: str, token: str) -> tuple[str, str]:
        """Apply the redirect rule: the URL and token to send next, or UntrustedTargetError.

        A move to another host costs one refresh (design §5 step 3): the OAuth server's answer names
        the portal's address, and only that address is followed. The refresh stores what it says of
        `client_endpoint` and `domain`; `moved_to` tells the caller the followed address, and
        storing it is the caller's business (the engine does, except in a dry run), never a write
        from inside this request loop.
        """
        verdict, reason = redirect_verdict(redirect, hops, self._confirmed)
        if verdict is Verdict.CONFIRM:
            if not self.tokens.fresh:  # a refresh made just now has said its word already
                log.info("portal %s redirected to another host; asking the OAuth server", self.tokens.member_id)
                self.tokens.refresh()  # raises what a refresh raises: revoked, untrusted, transient
            self._confirmed = self.tokens.record.client_endpoint
            token = self.tokens.record.access_token
            verdict, reason = redirect_verdict(redirect, hops, self._confirmed)
        if verdict is not Verdict.FOLLOW:
            log.warning("portal %s: redirect not followed: %s", self.tokens.member_id, reason)
            raise UntrustedTargetError("BAD_REDIRECT", reason, status=redirect.status, method=method) from None
        endpoint = redirect.client_endpoint
        if endpoint and endpoint != self.tokens.record.client_endpoint:
            log.info("portal %s moved; following the redirect to its new address", self.tokens.member_id)
            self.tokens.record.set_client_endpoint(endpoint)
            self.moved_to = endpoint
        return redirect.target, token

    def _back_off(self, error: B24Error, tries: int) -> None:
        """Wait before the next try as the retry policy says, or raise `error`."""
        if isinstance(error, RateLimitedError):
            self.stats.rate_limited += 1
            self.bucket.saturate()  # the portal's bucket is full: ours paces the next calls
        wait = self.retry.wait(error, tries, now=self.clock())
        if wait is None:
            raise error
        self.sleep(wait)

    # -- batch -------------------------------------------------------------------------
    def batch(self, commands: Sequence[Command]) -> dict[str, CommandResult]:
        """Run `commands` with `halt=0`, ≤50 a request; each command's result or error by key.

        Commands marked `alone` go as single calls after the batches (design §5 step 5): one
        request each, their parameters top-level.
        """
        results: dict[str, CommandResult] = {}
        batched = [c for c in commands if not c.alone]
        for start in range(0, len(batched), BATCH_LIMIT):
            chunk = batched[start : start + BATCH_LIMIT]
            if not self.batch_refused:
                try:
                    results.update(self._batch_chunk(chunk))
                    continue
                except (PermanentError, ExpiredTokenError) as exc:
                    if isinstance(exc, ExpiredTokenError | UntrustedTargetError):
                        raise
                    log.warning("portal refused batch (%s); falling back to single calls", exc.code)
                    self.batch_refused = True
            results.update(self._singles(chunk))
        results.update(self._singles([c for c in commands if c.alone]))
        return results

    def _batch_chunk(self, chunk: Sequence[Command]) -> dict[str, CommandResult]:
        cmd = {c.key: c.batch_query() for c in chunk}
        answer = self.call("batch", {"halt": 0, "cmd": cmd})
        answer = answer if isinstance(answer, dict) else {}
        # Empty sections arrive as [] (a PHP empty array), not {}.
        done = _section(answer, "result")
        failed = _section(answer, "result_error")
        out: dict[str, CommandResult] = {}
        for c in chunk:
            if c.key in done:
                out[c.key] = CommandResult(value=done[c.key])
            elif c.key in failed:
                err = failed[c.key] if isinstance(failed[c.key], dict) else {}
                out[c.key] = CommandResult(
                    error=make_error(
                        scrub(err.get("error") or "UNKNOWN", 100),
                        scrub(err.get("error_description")),
                        method=c.method,
                    )
                )
            else:
                out[c.key] = CommandResult(
                    error=TransientError(MISSING_FROM_BATCH, "absent from the batch answer", method=c.method)
                )
        return out

    def _singles(self, chunk: Sequence[Command]) -> dict[str, CommandResult]:
        out: dict[str, CommandResult] = {}
        stopped = False
        for c in chunk:
            if stopped:
                out[c.key] = CommandResult(attempted=False)
                continue
            try:
                out[c.key] = CommandResult(value=self.call(c.method, c.params))
            except UntrustedTargetError:
                raise  # about the portal, not the command: the job ends here
            except (PermanentError, TransientError) as exc:
                out[c.key] = CommandResult(error=exc)
                # A portal that still fails after retries will fail the next command too:
                # leave the rest for the retry instead of hammering it.
                stopped = isinstance(exc, TransientError)
        return out


def _section(answer: dict[str, Any], name: str) -> dict[str, Any]:
    section = answer.get(name)
    return section if isinstance(section, dict) else {}


def _read(response: Answer, method: str) -> Any:
    """The `result` of a successful answer, or the classified error (returned, not raised)."""
    body = response.json()
    if isinstance(body, dict) and body.get("error"):
        error = make_error(
            scrub(body["error"], 100),
            scrub(body.get("error_description")),
            status=response.status,
            method=method,
        )
        reset_at = _section(body, "time").get("operating_reset_at")
        if isinstance(reset_at, int | float) and not isinstance(reset_at, bool):
            error.operating_reset_at = float(reset_at)
        return error
    if response.status >= 500:
        return TransientError("HTTP_ERROR", "server error", status=response.status, method=method)
    if not isinstance(body, dict) or "result" not in body or response.status >= 400:
        return PermanentError(
            "BAD_ANSWER", "the portal's answer is not a REST result", status=response.status, method=method
        )
    return body["result"]
