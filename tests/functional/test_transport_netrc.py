"""A portal request carries only what we mean to send: never a login from the operator's ~/.netrc."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from b24_cleanup import transport


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = b'{"result": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/rest/event.get", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_netrc_login_for_the_portals_host_is_never_sent(
    recorder: tuple[str, list[str | None]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = recorder
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine 127.0.0.1 login operator password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))

    plain = requests.Session()  # what requests does on its own: the login goes to the host
    plain.post(url, json={}, timeout=5).close()
    answer = transport.bounded(transport.session(), "POST", url, limit=5, json={"auth": "t"})

    assert answer.status == 200
    assert seen[0] is not None and seen[0].startswith("Basic ")
    assert seen[1] is None


def test_proxies_named_in_the_environment_still_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    http = transport.session()
    settings = http.merge_environment_settings("https://portal.example/rest/", {}, None, None, None)
    assert settings["proxies"].get("https") == "http://proxy.invalid:3128"
