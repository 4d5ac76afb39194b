"""Bounded HTTP for every request to a portal or the OAuth server (design §5 step 3).

`requests`' timeout is per socket read: a host that sends one byte every second never trips it,
and nothing bounds the size of an answer. A hostile or broken portal could so hold a worker
invocation past its Lambda timeout or memory, failing every other portal of the batch. Here each
request has

- a *total* time limit, from the first connect to the last byte of the answer: a watchdog shuts
  the request's socket down when the limit passes, whatever phase the request is in (TLS
  handshake, status line, headers, body);
- a size limit on the answer (MAX_ANSWER_BYTES, decoded): a longer answer is refused, read no
  further, and its connection is dropped.

The watchdog needs the request's socket, which `requests` does not expose, so sessions get an
adapter whose connections report their socket to the request running on the current thread
(:func:`bounded`). Answers are parsed as strict JSON: `NaN`, `Infinity` and numbers that do not
fit a float become None, so that no remote number can overflow the code that reads it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import math
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

MAX_ANSWER_BYTES = 8 * 1024 * 1024
CONNECT_TIMEOUT = 3.05
_CHUNK = 64 * 1024


class AnswerTooSlowError(requests.Timeout):
    """The request did not end within its total time limit; its connection was shut down."""


class AnswerTooLargeError(requests.RequestException):
    """The answer was longer than the size limit; it was not read further."""


@dataclass(frozen=True)
class Answer:
    """A whole HTTP answer, read within the limits."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as strict JSON, or None when it is not JSON (or nested beyond reason)."""
        return parse_json(self.body)


def _finite(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def _no_constant(_: str) -> None:
    return None


def parse_json(body: bytes | bytearray | str) -> Any:
    """Strict JSON: `NaN`/`Infinity`/overflowing floats become None; None for anything unparsable.

    Python's json accepts `Infinity`, and `1e400` parses as `inf`: `int()` of either raises
    OverflowError, which would escape from code that handles only ValueError and TypeError.
    """
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None


# -- the watchdog ------------------------------------------------------------------------------


class _Watchdog:
    """One thread that keeps every request's time limit (a heap of deadlines).

    A timer thread per request would cost a thread start on every request, and `Thread.start`
    waits for the new thread to take the interpreter lock: with ten portals' threads busy in an
    invocation that wait is milliseconds, on every request of every job.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, watch: _Watch, deadline: float) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), watch))
            if self._thread is None or not self._thread.is_alive():  # first use, or after a fork
                self._thread = threading.Thread(target=self._run, name="b24-request-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._cond.notify()  # a new earliest deadline

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2].stopped:
                    heapq.heappop(self._heap)  # finished requests leave when they reach the top
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                due = heapq.heappop(self._heap)[2]
            due.expire()  # outside the heap's lock: it takes the request's own


_WATCHDOG = _Watchdog()


class _Watch:
    """One request's total time limit: shuts down the socket the request is using once it passes."""

    def __init__(self, limit: float) -> None:
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._limit = max(0.0, limit)
        self.expired = False
        self.stopped = False

    def start(self) -> None:
        _WATCHDOG.watch(self, time.monotonic() + self._limit)

    def attach(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._socket = sock
            if self.expired:
                _shut(sock)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            self._socket = None  # from now on the connection belongs to the pool again

    def expire(self) -> None:
        with self._lock:
            if self.stopped:
                return
            self.expired = True
            if self._socket is not None:
                _shut(self._socket)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS socket: it unblocks a read in another thread at
    # once (the read sees the end of the stream) and leaves the TLS object to its own thread.
    with contextlib.suppress(OSError):  # already closed or never connected
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current = threading.local()


def _report(sock: socket.socket | None) -> None:
    watch: _Watch | None = getattr(_current, "watch", None)
    if watch is not None:
        watch.attach(sock)


class _WatchedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _report(sock)  # before the TLS handshake: a stalled handshake is cut too
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _report(self.sock)  # a kept-alive connection: its socket exists already
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _report(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _report(self.sock)
        super().request(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class BoundedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections can be cut by the total time limit of :func:`bounded`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_POOLS)
        return manager


class _NoNetrc(requests.auth.AuthBase):
    """Leaves a request as it is; as the session's auth it keeps `requests` from reading ~/.netrc."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        return request


def session(pool_size: int = 10) -> requests.Session:
    """A session for bounded requests; `pool_size` connections per host for concurrent threads.

    Without an auth of its own, `requests` looks for a ~/.netrc on every request and would send a
    login found there for the portal's host: a portal gets only the token we mean to send, and no
    request pays two file lookups (under a busy interpreter lock, milliseconds each). Proxies and
    a CA bundle named in the environment still apply.
    """
    bounded_session = requests.Session()
    bounded_session.auth = _NoNetrc()
    guard(bounded_session, pool_size)
    return bounded_session


def guard(http: requests.Session, pool_size: int = 10) -> requests.Session:
    """Mount the bounded adapter on `http` unless it has one (a caller's own session is accepted)."""
    for prefix in ("http://", "https://"):
        if not isinstance(http.get_adapter(prefix), BoundedAdapter):
            http.mount(prefix, BoundedAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0))
    return http


def bounded(
    http: requests.Session,
    method: str,
    url: str,
    *,
    limit: float,
    max_bytes: int = MAX_ANSWER_BYTES,
    connect_timeout: float = CONNECT_TIMEOUT,
    **kwargs: Any,
) -> Answer:
    """One request, ended within `limit` seconds from connect to last byte and `max_bytes` of answer.

    Redirects are never followed here. Raises AnswerTooSlowError, AnswerTooLargeError, or what
    `requests` raises (every one a requests.RequestException).
    """
    guard(http)
    watch = _Watch(limit)
    previous = getattr(_current, "watch", None)
    _current.watch = watch
    watch.start()
    response: requests.Response | None = None
    try:
        try:
            response = http.request(
                method,
                url,
                # Per-read timeout no longer than the whole limit: a silent host ends the same way.
                timeout=(min(connect_timeout, limit), limit),
                allow_redirects=False,
                stream=True,
                **kwargs,
            )
            body = _read(response, max_bytes)
        except AnswerTooLargeError:
            raise
        except requests.RequestException:
            if watch.expired:
                raise AnswerTooSlowError(f"no whole answer within {limit:g} s") from None
            raise
        except (OSError, ValueError):
            # A socket shut down under a TLS read can surface as a bare SSL or value error.
            if watch.expired:
                raise AnswerTooSlowError(f"no whole answer within {limit:g} s") from None
            raise requests.ConnectionError("the connection failed while reading the answer") from None
        # A whole answer is kept even when the watchdog fired as its last byte came in; the
        # connection it may have cut is closed below, not reused.
        return Answer(response.status_code, response.headers, bytes(body))
    finally:
        watch.stop()
        _current.watch = previous
        if response is not None:
            response.close()  # a refused or cut answer's connection is dropped, never reused


def _read(response: requests.Response, max_bytes: int) -> bytearray:
    declared = response.headers.get("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > max_bytes:
        raise AnswerTooLargeError(f"the answer declares {int(declared)} bytes, over the {max_bytes}-byte limit")
    body = bytearray()
    for chunk in response.iter_content(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise AnswerTooLargeError(f"the answer is over the {max_bytes}-byte limit")
    return body
