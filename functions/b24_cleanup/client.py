"""A small Bitrix24 REST client for one portal (reference §8-§11).

JSON POST to `{client_endpoint}{method}` with `auth` in the body; no blind redirects (a renamed
portal answers 302 and the POST is re-sent to the new address); one exception type per meaning;
bounded retries with backoff and jitter for transient answers; every request paced by the
portal's leaky bucket. `batch` packs up to 50 commands a request and falls back to single calls
when the portal refuses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests

from .errors import (
    MISSING_FROM_BATCH,
    B24Error,
    ExpiredTokenError,
    PermanentError,
    RateLimitedError,
    RevokedError,
    TransientError,
    make_error,
)
from .oauth import USER_AGENT
from .pacing import Backoff, LeakyBucket
from .tokens import TokenKeeper

log = logging.getLogger(__name__)

BATCH_LIMIT = 50
DEFAULT_TIMEOUT = (3.05, 30.0)
MAX_REDIRECTS = 3
_REDIRECTS = {301, 302, 303, 307, 308}


@dataclass
class CallStats:
    rest_calls: int = 0  # HTTP requests that reached the portal's REST endpoint
    rate_limited: int = 0  # QUERY_LIMIT_EXCEEDED answers


@dataclass(frozen=True)
class Command:
    key: str  # non-numeric: numeric keys turn the answer's sections into lists (reference §9)
    method: str
    params: Mapping[str, str]


@dataclass(frozen=True)
class CommandResult:
    value: Any = None
    error: B24Error | None = None
    attempted: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None and self.attempted


class PortalClient:
    def __init__(
        self,
        tokens: TokenKeeper,
        *,
        session: requests.Session,
        bucket: LeakyBucket,
        backoff: Backoff | None = None,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        max_time_limit_wait: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        deadline: float | None = None,
    ) -> None:
        self.tokens = tokens
        self.deadline = deadline  # time.monotonic() after which no request is started
        self.session = session
        self.bucket = bucket
        self.backoff = backoff or Backoff()
        self.timeout = timeout
        self.max_time_limit_wait = max_time_limit_wait
        self.sleep = sleep
        self.clock = clock
        self.stats = CallStats()
        self.batch_refused = False

    # -- single calls ------------------------------------------------------------------
    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call `method` and return its `result`; refresh once on an expired token."""
        params = dict(params or {})
        token = self.tokens.access_token()
        try:
            return self._post(method, params, token)
        except ExpiredTokenError as exc:
            if self.tokens.fresh:
                # Refused right after a refresh: the app is gone (SPEC §5 step 3).
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
        attempt = 0
        redirects = 0
        url = urljoin(self.tokens.record.client_endpoint, method)
        while True:
            attempt += 1
            if self.deadline is not None and time.monotonic() >= self.deadline:
                # Better a clean transient failure (the queue retries the job, which plans afresh)
                # than a Lambda timeout that fails the whole batch mid-request.
                raise TransientError("OUT_OF_TIME", "the invocation is about to time out", method=method)
            self.bucket.acquire()
            self.stats.rest_calls += 1
            try:
                response = self.session.post(
                    url,
                    json={**params, "auth": token},
                    timeout=self.timeout,
                    allow_redirects=False,
                    headers={"Accept": "application/json", "User-Agent": USER_AGENT},
                )
            except requests.Timeout:
                error: B24Error = TransientError("TIMEOUT", "no answer in time", method=method)
            except requests.RequestException as exc:
                error = TransientError("CONNECTION_FAILED", type(exc).__name__, method=method)
            else:
                if response.status_code in _REDIRECTS:
                    redirects += 1
                    url = self._follow(url, response, method, redirects)
                    attempt -= 1  # a move is not a failure
                    continue
                outcome = _read(response, method)
                if not isinstance(outcome, B24Error):
                    return outcome
                error = outcome
            self._wait_or_raise(error, attempt)

    def _follow(self, url: str, response: requests.Response, method: str, redirects: int) -> str:
        location = response.headers.get("Location", "")
        target = urljoin(url, location)
        if redirects > MAX_REDIRECTS or urlsplit(target).scheme not in {"http", "https"}:
            raise PermanentError(
                "BAD_REDIRECT",
                "the portal redirected too often or off the web",
                status=response.status_code,
                method=method,
            )
        cut = target.rfind("/rest/")
        if cut != -1:
            self.tokens.follow_rename(target[: cut + len("/rest/")])
        return target

    def _wait_or_raise(self, error: B24Error, attempt: int) -> None:
        if isinstance(error, RateLimitedError):
            self.stats.rate_limited += 1
            self.bucket.saturate()
        if not isinstance(error, TransientError) or error.code.upper() == "OVERLOAD_LIMIT":
            raise error  # OVERLOAD_LIMIT is a manual block: do not hammer (reference §10)
        if attempt >= self.backoff.attempts:
            raise error
        wait = self.backoff.delay(attempt)
        if error.code.upper() == "OPERATION_TIME_LIMIT" and error.operating_reset_at:
            wait = max(wait, error.operating_reset_at - self.clock())
            if wait > self.max_time_limit_wait:
                raise error
        self.sleep(wait)

    # -- batch -------------------------------------------------------------------------
    def batch(self, commands: Sequence[Command]) -> dict[str, CommandResult]:
        """Run `commands` with `halt=0`, ≤50 a request; each command's result or error by key."""
        results: dict[str, CommandResult] = {}
        for start in range(0, len(commands), BATCH_LIMIT):
            chunk = commands[start : start + BATCH_LIMIT]
            if not self.batch_refused:
                try:
                    results.update(self._batch_chunk(chunk))
                    continue
                except (PermanentError, ExpiredTokenError) as exc:
                    if isinstance(exc, ExpiredTokenError):
                        raise
                    log.warning("portal refused batch (%s); falling back to single calls", exc.code)
                    self.batch_refused = True
            results.update(self._singles(chunk))
        return results

    def _batch_chunk(self, chunk: Sequence[Command]) -> dict[str, CommandResult]:
        cmd = {c.key: f"{c.method}?{urlencode(dict(c.params))}" for c in chunk}
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
                        str(err.get("error") or "UNKNOWN"),
                        str(err.get("error_description") or "")[:200],
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
            except (PermanentError, TransientError) as exc:
                out[c.key] = CommandResult(error=exc)
                # A portal that still fails after retries will fail the next command too:
                # leave the rest for the retry instead of hammering it.
                stopped = isinstance(exc, TransientError)
        return out


def _section(answer: dict[str, Any], name: str) -> dict[str, Any]:
    section = answer.get(name)
    return section if isinstance(section, dict) else {}


def _read(response: requests.Response, method: str) -> Any:
    """The `result` of a successful answer, or the classified error (returned, not raised)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        error = make_error(
            str(body["error"]),
            str(body.get("error_description") or "")[:200],
            status=response.status_code,
            method=method,
        )
        reset_at = _section(body, "time").get("operating_reset_at")
        if isinstance(reset_at, int | float) and not isinstance(reset_at, bool):
            error.operating_reset_at = float(reset_at)
        return error
    if response.status_code >= 500:
        return TransientError("HTTP_ERROR", "server error", status=response.status_code, method=method)
    if not isinstance(body, dict) or "result" not in body or response.status_code >= 400:
        return PermanentError(
            "BAD_ANSWER", "the portal's answer is not a REST result", status=response.status_code, method=method
        )
    return body["result"]
