"""The emulator's hostile-host modes, measured from raw clients (sockets and plain requests).

What is asserted is what the wire shows: byte timings, silence, sizes, Location headers, and what
arrived at the other host — not what the emulator says it did.
"""

from __future__ import annotations

import itertools
import json
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from b24_cleanup.ops.emulator import Emulator, Installation, Portal

URL = "https://app.example.com/b24/events"


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(rate_limit=False) as emulator:
        yield emulator


@pytest.fixture
def tls_emu() -> Iterator[Emulator]:
    with Emulator(rate_limit=False, tls=True) as emulator:
        yield emulator


def _install(emu: Emulator) -> tuple[Portal, Installation]:
    app = emu.add_app()
    portal = emu.add_portal("hostile.bitrix24.test")
    return portal, emu.install(portal, app)


def _raw_request(endpoint: str, method: str, body: dict[str, object]) -> socket.socket:
    """Send one HTTP/1.1 POST on a fresh socket and return the socket, nothing read yet."""
    parts = urlsplit(endpoint)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
    head = (
        f"POST {parts.path}{method} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def test_drip_sends_the_real_answer_a_byte_at_a_time(emu: Emulator) -> None:
    portal, inst = _install(emu)
    portal.hostile.drip(0.03)
    sock = _raw_request(
        portal.client_endpoint, "event.bind", {"auth": inst.access_token, "event": "ONX", "handler": URL}
    )
    arrivals: list[tuple[float, int]] = []
    with sock:
        while len(arrivals) < 20:
            chunk = sock.recv(4096)
            assert chunk, "the dripping answer ended early"
            arrivals.append((time.monotonic(), len(chunk)))
    assert all(size == 1 for _, size in arrivals)  # never more than one byte at a time
    # Single gaps jitter on a busy machine; the span cannot be shorter than the server's waits.
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert sum(gaps) > 19 * 0.03 * 0.9
    # The request was executed: a drip is a real answer, only slow.
    assert portal.handlers(inst.app) == [{"event": "ONX", "handler": URL, "auth_type": "0", "offline": 0}]
    entry = emu.requests_log(kind="rest")[-1]
    assert (entry.hostile, entry.status) == ("drip", 200)


def test_drip_defeats_a_per_read_timeout(emu: Emulator) -> None:
    portal, inst = _install(emu)
    portal.hostile.drip(0.004)
    started = time.monotonic()
    # requests' read timeout is per read: 0.1 s never fires although the whole answer takes longer.
    answer = requests.post(portal.client_endpoint + "event.get", json={"auth": inst.access_token}, timeout=(1, 0.1))
    elapsed = time.monotonic() - started
    assert answer.status_code == 200 and answer.json()["result"] == []
    assert elapsed > 0.1 * 5


def test_stall_never_answers_and_never_executes(emu: Emulator) -> None:
    portal, inst = _install(emu)
    portal.hostile.stall()
    sock = _raw_request(
        portal.client_endpoint, "event.bind", {"auth": inst.access_token, "event": "ONX", "handler": URL}
    )
    with sock:
        readable, _, _ = select.select([sock], [], [], 1.0)
        assert readable == []  # a full second of silence on an accepted connection
    assert portal.handlers(inst.app) == []
    deadline = time.monotonic() + 2
    while not emu.requests_log(kind="rest") and time.monotonic() < deadline:
        time.sleep(0.01)
    entry = emu.requests_log(kind="rest")[-1]
    assert (entry.hostile, entry.status) == ("stall", 0)


def test_stall_with_delay_and_execute_answers_late_and_times_limits_it(emu: Emulator) -> None:
    portal, inst = _install(emu)
    portal.hostile.stall(0.6, execute=True, times=1)
    started = time.monotonic()
    late = requests.post(
        portal.client_endpoint + "event.bind",
        json={"auth": inst.access_token, "event": "ONX", "handler": URL},
        timeout=5,
    )
    assert late.status_code == 200 and time.monotonic() - started >= 0.6
    assert len(portal.handlers(inst.app)) == 1
    started = time.monotonic()
    assert requests.post(portal.client_endpoint + "event.get", json={"auth": inst.access_token}, timeout=5).ok
    assert time.monotonic() - started < 0.5  # `times=1`: the next request is served as usual
    assert portal.hostile.mode is None


def test_a_stalled_connection_times_out_a_client_and_stop_releases_it() -> None:
    emu = Emulator(rate_limit=False).start()
    portal, inst = _install(emu)
    portal.hostile.stall()
    with pytest.raises(requests.Timeout):
        requests.post(portal.client_endpoint + "event.get", json={"auth": inst.access_token}, timeout=(1, 0.5))
    sock = _raw_request(portal.client_endpoint, "event.get", {"auth": inst.access_token})
    started = time.monotonic()
    emu.stop()
    assert time.monotonic() - started < 3  # a held connection does not keep the emulator alive
    with sock:
        sock.settimeout(2)
        assert sock.recv(1) == b""  # dropped, not answered


@pytest.mark.parametrize("declare_length", [True, False])
def test_huge_answer_is_ten_megabytes_of_valid_json(emu: Emulator, declare_length: bool) -> None:
    portal, inst = _install(emu)
    portal.hostile.huge(declare_length=declare_length)
    with requests.post(
        portal.client_endpoint + "event.get", json={"auth": inst.access_token}, timeout=10, stream=True
    ) as answer:
        assert answer.status_code == 200
        assert ("Content-Length" in answer.headers) is declare_length
        body = b"".join(answer.iter_content(1 << 20))
    assert len(body) >= 10 * 1024 * 1024
    if declare_length:
        assert int(answer.headers["Content-Length"]) == len(body)
    parsed = json.loads(body)
    assert parsed["result"] == [] and len(parsed["padding"]) > 10_000_000


def test_redirect_points_to_another_host_and_logs_what_arrives_there(emu: Emulator) -> None:
    portal, inst = _install(emu)
    portal.hostile.redirect()
    moved = requests.post(
        portal.client_endpoint + "event.unbind?x=1",
        json={"auth": inst.access_token, "event": "ONX", "handler": URL},
        timeout=5,
        allow_redirects=False,
    )
    assert moved.status_code == 302
    location = urlsplit(moved.headers["Location"])
    assert location.hostname == emu.foreign_host() != portal.host
    assert location.path == "/rest/event.unbind" and location.query == "x=1"
    assert emu.requests_log(kind="rest")[-1].hostile == "redirect"
    assert emu.requests_log(kind="foreign") == []

    # A client that follows and re-sends the token is seen doing it at the other host.
    followed = requests.post(moved.headers["Location"], json={"auth": inst.access_token}, timeout=5)
    assert followed.status_code == 200 and followed.json()["result"] == []  # a plausible lie
    (arrived,) = emu.requests_log(kind="foreign")
    assert arrived.auth_seen and arrived.host == emu.foreign_host() and arrived.method == "event.unbind"


def test_redirect_to_a_given_location_and_oauth_server_modes(emu: Emulator) -> None:
    portal, inst = _install(emu)
    portal.hostile.redirect("https://evil.example/rest/")
    moved = requests.post(portal.client_endpoint + "event.get", json={}, timeout=5, allow_redirects=False)
    assert moved.headers["Location"] == "https://evil.example/rest/event.get"

    emu.oauth_hostile.redirect(times=1)
    query = {"grant_type": "refresh_token", "client_id": inst.app.client_id, "client_secret": inst.app.client_secret}
    query["refresh_token"] = inst.refresh_token
    moved = requests.get(emu.oauth_url, params=query, timeout=5, allow_redirects=False)
    assert moved.status_code == 302 and urlsplit(moved.headers["Location"]).hostname == emu.foreign_host()
    emu.oauth_hostile.stall()
    with pytest.raises(requests.Timeout):
        requests.get(emu.oauth_url, params=query, timeout=(1, 0.5))
    emu.oauth_hostile.clear()
    assert requests.get(emu.oauth_url, params=query, timeout=5).status_code == 200  # nothing spent it before


def test_tls_serves_https_with_a_certificate_made_at_start(tls_emu: Emulator) -> None:
    portal, inst = _install(tls_emu)
    assert portal.client_endpoint.startswith("https://") and tls_emu.oauth_url.startswith("https://")
    assert tls_emu.ca_file is not None
    answer = requests.post(
        portal.client_endpoint + "event.get", json={"auth": inst.access_token}, timeout=5, verify=tls_emu.ca_file
    )
    assert answer.json()["result"] == []
    with pytest.raises(requests.exceptions.SSLError):  # not a publicly trusted certificate
        requests.post(portal.client_endpoint + "event.get", json={}, timeout=5)
    # The certificate names the address itself (clients send no SNI for an IP address).
    ctx = ssl.create_default_context(cafile=tls_emu.ca_file)
    with (
        socket.create_connection((portal.host, tls_emu.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=portal.host) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    (entry,) = tls_emu.requests_log(kind="rest")
    assert entry.scheme == "https"


def test_downgrade_redirects_https_to_http_and_sees_who_follows(tls_emu: Emulator) -> None:
    portal, inst = _install(tls_emu)
    portal.hostile.downgrade()
    moved = requests.post(
        portal.client_endpoint + "event.get",
        json={"auth": inst.access_token},
        timeout=5,
        verify=tls_emu.ca_file,
        allow_redirects=False,
    )
    assert moved.status_code == 302
    assert moved.headers["Location"] == f"http://{portal.host}:{tls_emu.port}/rest/event.get"
    first = tls_emu.requests_log(kind="rest")[-1]
    assert (first.scheme, first.hostile, first.status) == ("https", "downgrade", 302)

    followed = requests.post(moved.headers["Location"], json={"auth": inst.access_token}, timeout=5)
    assert followed.status_code == 200  # served over plain http: the token crossed in clear
    last = tls_emu.requests_log(kind="rest")[-1]
    assert (last.scheme, last.auth_seen, last.hostile) == ("http", True, None)


def test_hostile_modes_are_per_portal(emu: Emulator) -> None:
    app = emu.add_app()
    bad, good = emu.add_portal("bad.bitrix24.test"), emu.add_portal("good.bitrix24.test")
    bad_inst, good_inst = emu.install(bad, app), emu.install(good, app)
    bad.hostile.stall()
    results: dict[str, float] = {}

    def call(name: str, portal: Portal, token: str) -> None:
        started = time.monotonic()
        try:
            requests.post(portal.client_endpoint + "event.get", json={"auth": token}, timeout=(1, 1.5))
        except requests.Timeout:
            results[name] = -1.0
            return
        results[name] = time.monotonic() - started

    threads = [
        threading.Thread(target=call, args=("bad", bad, bad_inst.access_token)),
        threading.Thread(target=call, args=("good", good, good_inst.access_token)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["bad"] == -1.0 and 0 <= results["good"] < 0.5


def test_hostile_settings_are_checked() -> None:
    from b24_cleanup.ops.emulator.hostile import Hostility

    hostility = Hostility()
    for bad, message in (
        (lambda: hostility.drip(0), "positive"),
        (lambda: hostility.stall(-1), ">= 0"),
        (lambda: hostility.huge(10), "1 KiB"),
        (lambda: hostility.drip(1, times=0), "at least 1"),
    ):
        with pytest.raises(ValueError, match=message):
            bad()
    assert hostility.mode is None
