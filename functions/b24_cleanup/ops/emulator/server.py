"""The HTTP face of the emulator and the `Emulator` facade that tests, the demo and the CLI use.

Addressing (fixed, the rest of the project relies on it):
- `{base_url}/{domain}/rest/{method}[.json]` — a portal's REST endpoint (`client_endpoint`);
- `{base_url}/oauth/token/` — the OAuth server's token URL (`oauth_url`);
- `{base_url}/rest/` — the OAuth server's `server_endpoint` (nothing is served under it);
- `{base_url}/_emulator/...` — read-only helpers for local development (records, credentials).

The standard library's threaded server is enough: every request gets a daemon thread, and the
state lock is never held while a request sleeps (latency, injected timeouts).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from . import payloads, phpform
from .models import ApiError, App, Installation, LogEntry, Reply, TokenPair
from .state import Portal, State

_REST_PATH_RE = re.compile(r"^/([^/]+)/rest/([^/]*)$")
_MAX_BODY = 16 * 1024 * 1024


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        self.emulator = emulator
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall
        # for seconds on a machine without network. The name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """Close kept-alive connections so that a stopped emulator answers nothing any more."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real portals: clients reuse connections
    # Headers and body go out as two writes; without TCP_NODELAY, Nagle plus the client's delayed
    # ACK adds ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server_version = "b24-emulator"
    timeout = 60  # an idle kept-alive connection is closed after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the default access log would print query strings, which may carry tokens."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    # -- request handling --------------------------------------------------------------------
    def _handle(self) -> None:
        state = self.server.emulator.state
        ts, t0 = time.time(), time.perf_counter()
        try:
            kind, reply = self._route(state)
        except Exception:  # an emulator bug must still answer, never hang the client
            kind, reply = "other", Reply.error(ApiError("INTERNAL_SERVER_ERROR", "Emulator failure", 500))
        if reply.drop_after is not None:
            state.record(kind, reply, ts, time.perf_counter() - t0, status=0)
            time.sleep(reply.drop_after)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        # Logged before answering, so that a client that has its answer also finds the entry.
        state.record(kind, reply, ts, time.perf_counter() - t0)
        self._send(reply)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > _MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _route(self, state: State) -> tuple[str, Reply]:
        url = urlsplit(self.path)
        body = self._read_body()
        if url.path in ("/oauth/token/", "/oauth/token"):
            if state.latency:
                time.sleep(state.latency)
            query = dict(parse_qsl(url.query, keep_blank_values=True))
            return "oauth", state.oauth(self.command, query)
        if url.path.startswith("/_emulator/"):
            return "control", self._control(url.path, url.query)
        match = _REST_PATH_RE.match(url.path)
        if match is None:
            return "other", Reply(404, {"error": "NOT_FOUND", "error_description": "No such endpoint"})
        domain, tail = unquote(match.group(1)), unquote(match.group(2))
        try:
            params = self._params(url.query, body)
        except ValueError as exc:
            err = ApiError("INVALID_REQUEST", str(exc), 400)
            return "rest", Reply.error(err, domain=domain, method=tail.lower() or None)
        auth = self._auth(params)
        delay = state.delay_for(domain)
        if delay > 0:
            time.sleep(delay)  # outside the state lock: concurrent portals overlap
        return "rest", state.rest(domain, tail, url.query, params, auth)

    def _params(self, query: str, body: bytes) -> dict[str, Any]:
        """Query string, then the body (JSON or form) on top, as PHP's `$_REQUEST` would merge."""
        params = phpform.parse_query(query)
        if not body:
            return params
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype == "application/json" or (not ctype and body.lstrip()[:1] == b"{"):
            try:
                data = json.loads(body)
            except ValueError:
                raise ValueError("The request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise ValueError("The JSON body must be an object")
        elif ctype in ("application/x-www-form-urlencoded", ""):
            data = phpform.parse_query(body.decode("utf-8", "replace"))
        else:
            raise ValueError(f"Unsupported content type {ctype}")
        params.update(data)
        return params

    def _auth(self, params: dict[str, Any]) -> str | None:
        """`auth` (primary), `access_token` or `Authorization: Bearer` ([src] oauth/auth.php)."""
        auth = params.pop("auth", None)
        alt = params.pop("access_token", None)
        if not isinstance(auth, str) or not auth:
            auth = alt if isinstance(alt, str) and alt else None
        if auth is None:
            header = self.headers.get("Authorization") or ""
            if header.lower().startswith("bearer "):
                auth = header[7:].strip() or None
        return auth

    def _control(self, path: str, query: str) -> Reply:
        """Read-only helpers for `b24-cleanup emulator` users (loopback only; fake secrets)."""
        emulator = self.server.emulator
        parts = [p for p in path.split("/") if p][1:]
        args = dict(parse_qsl(query))
        if self.command == "GET" and parts == ["portals"]:
            listing = [
                {"member_id": p.member_id, "domain": p.domain, "client_endpoint": p.client_endpoint}
                for p in emulator.portals
            ]
            return Reply(200, listing)
        if self.command == "GET" and len(parts) == 2 and parts[0] == "records":
            inst = emulator.installation(parts[1], args.get("client_id"))
            if inst is None:
                return Reply(404, {"error": "NOT_FOUND", "error_description": "No installation"})
            return Reply(200, emulator.record_for(inst, latest=True), log={"member_id": inst.member_id})
        if self.command == "GET" and len(parts) == 2 and parts[0] == "apps":
            app = emulator.state.apps.get(parts[1])
            if app is None:
                return Reply(404, {"error": "NOT_FOUND", "error_description": "No such app"})
            return Reply(200, {"client_id": app.client_id, "client_secret": app.client_secret})
        return Reply(404, {"error": "NOT_FOUND", "error_description": "No such endpoint"})

    def _send(self, reply: Reply) -> None:
        if reply.text is not None:
            payload, ctype = reply.text.encode(), "text/html; charset=utf-8"
        else:
            payload, ctype = json.dumps(reply.body, ensure_ascii=False).encode(), "application/json; charset=utf-8"
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True  # the client went away; nothing to answer to


class Emulator:
    """Bitrix24 portals and the OAuth server on one loopback port.

    The socket is bound at construction (so `base_url` and every `client_endpoint` are known
    before `start()`); `start()` begins serving in a daemon thread.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        rate: float = 2.0,
        burst: int = 50,
        rate_limit: bool = True,
        access_ttl: int = 3600,
        uninstalled_refresh_error: str = "invalid_grant",
        port: int = 0,
        host: str = "127.0.0.1",
        timeout_delay: float = 1.0,
    ) -> None:
        self.state = State(
            latency=latency,
            rate=rate,
            burst=burst,
            rate_limit=rate_limit,
            access_ttl=access_ttl,
            uninstalled_refresh_error=uninstalled_refresh_error,
            timeout_delay=timeout_delay,
        )
        self._httpd = _Server((host, port), self)
        self.state.base_url = f"http://{host}:{self._httpd.server_port}"
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._installations: dict[tuple[str, str], Installation] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Emulator:
        if self._stopped:
            raise RuntimeError("a stopped emulator cannot be restarted; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="b24-emulator", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.drop_connections()
        self._httpd.server_close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.server_port

    @property
    def base_url(self) -> str:
        return self.state.base_url

    @property
    def oauth_url(self) -> str:
        return f"{self.base_url}/oauth/token/"

    @property
    def server_endpoint(self) -> str:
        return self.state.server_endpoint

    # -- knobs (settable at any time) --------------------------------------------------------
    @property
    def latency(self) -> float:
        return self.state.latency

    @latency.setter
    def latency(self, value: float) -> None:
        self.state.latency = value

    @property
    def rate_limit(self) -> bool:
        return self.state.rate_limit

    @rate_limit.setter
    def rate_limit(self, value: bool) -> None:
        self.state.rate_limit = value

    @property
    def timeout_delay(self) -> float:
        return self.state.timeout_delay

    @timeout_delay.setter
    def timeout_delay(self, value: float) -> None:
        self.state.timeout_delay = value

    @property
    def uninstalled_refresh_error(self) -> str:
        return self.state.uninstalled_refresh_error

    @uninstalled_refresh_error.setter
    def uninstalled_refresh_error(self, value: str) -> None:
        self.state.uninstalled_refresh_error = value

    def chaos(self, rate: float, faults: list[str] | None = None, seed: int | None = None) -> None:
        """A `rate` fraction of REST requests (not OAuth) fail without executing, with one of
        INTERNAL_SERVER_ERROR (500), QUERY_LIMIT_EXCEEDED (503), OPERATION_TIME_LIMIT (429),
        OVERLOAD_LIMIT (503) or "timeout" (sleep `timeout_delay`, then drop the connection).
        `chaos(0)` turns it off."""
        self.state.set_chaos(rate, faults, seed)

    # -- world -------------------------------------------------------------------------------
    def add_app(
        self, client_id: str | None = None, client_secret: str | None = None, *, scope: str = "crm,user"
    ) -> App:
        return self.state.add_app(client_id, client_secret, scope=scope)

    def add_portal(
        self,
        domain: str,
        member_id: str | None = None,
        *,
        users: dict[int, bool] | None = None,
        rate: float | None = None,
        burst: int | None = None,
    ) -> Portal:
        """A portal; `users` maps user id → is admin (default `{1: True, 2: False}`)."""
        return self.state.add_portal(domain, member_id, users=users, rate=rate, burst=burst)

    def portal(self, key: str) -> Portal:
        """A portal by member_id or domain (old domains of renamed portals too)."""
        return self.state.portal(key)

    @property
    def portals(self) -> list[Portal]:
        with self.state.lock:
            return list(self.state.portals.values())

    def installation(self, member_id: str, client_id: str | None = None) -> Installation | None:
        """The latest install/update of an app (the only one, if `client_id` is None) on a portal."""
        found = [i for (m, c), i in self._installations.items() if m == member_id and client_id in (None, c)]
        return found[-1] if found else None

    def install(self, portal: Portal, app: App, *, user_id: int = 1, install_url: str | None = None) -> Installation:
        """Install `app` on `portal` for `user_id`; POST ONAPPINSTALL to `install_url` if given."""
        inst = self.state.install(portal, app, user_id)
        self._installations[(portal.member_id, app.client_id)] = inst
        if install_url:
            inst.status = payloads.post_form(install_url, payloads.install_form(self.state, inst))
        return inst

    def update(
        self, portal: Portal, app: App, *, install_url: str | None = None, user_id: int | None = None
    ) -> Installation:
        """App update: a new application_token and token pair; ONAPPUPDATE to `install_url`."""
        inst = self.state.update(portal, app, user_id)
        self._installations[(portal.member_id, app.client_id)] = inst
        if install_url:
            inst.status = payloads.post_form(install_url, payloads.install_form(self.state, inst))
        return inst

    def uninstall(
        self, portal: Portal, app: App, *, uninstall_url: str | None = None, clean: bool = True
    ) -> int | None:
        """Uninstall like a real portal: rows deleted and tokens revoked *before* the event is
        sent; POST ONAPPUNINSTALL to `uninstall_url` if given. Returns that POST's status."""
        application_token = self.state.uninstall(portal, app)
        if not uninstall_url:
            return None
        form = payloads.uninstall_form(self.state, portal, application_token, clean=clean)
        return payloads.post_form(uninstall_url, form)

    def secrets(self) -> set[str]:
        """Every token, client secret and application token issued so far (for leak checks)."""
        return self.state.secrets()

    def issue_tokens(self, portal: Portal, app: App, user_id: int, *, expires_in: int | None = None) -> TokenPair:
        """Another pair (a new chain), e.g. for a non-admin; negative `expires_in`: expired."""
        return self.state.issue_tokens(portal, app, user_id, expires_in)

    def record_for(
        self, installation: Installation, *, latest: bool = False, tokens: TokenPair | None = None
    ) -> dict[str, Any]:
        """The SPEC §3 portal record of an installation, ready to store in SSM.

        Tokens: `tokens` if given, else the chain's newest pair when `latest`, else the pair the
        installation issued.
        """
        portal = installation.portal
        pair = tokens or (self.state.latest_tokens(installation.chain) if latest else installation.tokens)
        return {
            "member_id": portal.member_id,
            "domain": portal.domain,
            "client_endpoint": portal.client_endpoint,
            "server_endpoint": self.server_endpoint,
            "access_token": pair.access_token,
            "refresh_token": pair.refresh_token,
            "expires": pair.expires,
            "application_token": installation.application_token,
            "scope": installation.app.scope,
        }

    # -- request log -------------------------------------------------------------------------
    def requests_log(
        self, *, member_id: str | None = None, kind: str | None = None, method: str | None = None
    ) -> list[LogEntry]:
        """Every HTTP request received (oldest first), filtered; holds no token values."""
        return self.state.log_entries(member_id=member_id, kind=kind, method=method)

    def clear_log(self) -> None:
        self.state.clear_log()
