"""The requests' watchdog (transport.py): one thread keeps every request's total time limit."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from b24_cleanup.transport import _Watch


def _watchdogs() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "b24-request-watchdog")


def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_a_request_past_its_limit_has_its_socket_shut_down() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        watch = _Watch(0.05)
        watch.start()
        watch.attach(ours)
        assert _wait_for(lambda: watch.expired)
        ours.settimeout(2)
        assert ours.recv(1) == b""  # shut down: a blocked read returns at once, not after the peer


def test_a_request_that_finished_in_time_is_never_expired_nor_its_pooled_socket_touched() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        watch = _Watch(0.05)
        watch.start()
        watch.attach(ours)
        watch.stop()
        later = _Watch(0.1)  # a later deadline: the watchdog passes the stopped one on its way
        later.start()
        assert _wait_for(lambda: later.expired)
        assert not watch.expired
        theirs.sendall(b"x")
        ours.settimeout(2)
        assert ours.recv(1) == b"x"  # the connection still works for the next request


def test_an_earlier_deadline_wakes_the_watchdog_and_one_thread_serves_every_request() -> None:
    slow = _Watch(30.0)
    slow.start()  # the watchdog now sleeps towards 30 s
    quick = [_Watch(0.05) for _ in range(50)]
    for watch in quick:
        watch.start()
    assert _wait_for(lambda: all(w.expired for w in quick), 2.0)
    assert not slow.expired
    assert _watchdogs() == 1
    slow.stop()


def test_a_socket_attached_after_the_limit_passed_is_shut_at_once() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        watch = _Watch(0.0)
        watch.start()
        assert _wait_for(lambda: watch.expired)
        watch.attach(ours)  # e.g. a connect that returned after the limit
        ours.settimeout(2)
        assert ours.recv(1) == b""
