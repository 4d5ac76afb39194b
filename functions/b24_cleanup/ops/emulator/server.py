"""The HTTP face of the emulator and the `Emulator` facade that tests, the demo and the CLI use.

Addressing: every host is its own loopback address, all on one port (127.0.0.0/8 is loopback on
Linux; only loopback addresses are ever bound, never 0.0.0.0):
- `{scheme}://127.0.0.1:{port}` — the OAuth server: `/oauth/token/` (`oauth_url`), `/rest/` (its
  `server_endpoint`, nothing is served under it) and `/_emulator/...` (read-only helpers for local
  development: records, credentials);
- `{scheme}://127.0.0.N:{port}/rest/{method}[.json]` — one portal per address (`client_endpoint`),
  identified by the address the connection arrived on; a renamed portal moves to a new address and
  its old one answers 302 there;
- foreign hosts (:meth:`Emulator.foreign_host`) — addresses of no portal, where hostile redirects
  point; they log what arrives and answer a plausible success.

With `tls=True` every address serves https (a certificate per address, signed by a CA made at
start: `Emulator.ca_file`) *and* plain http on the same port — the first byte of a connection says
which (a TLS handshake starts with 0x16) — so that an https → http downgrade can be followed.

One thread per connection (daemon), a selector over the listening sockets; the state lock is never
held while a request sleeps (latency, injected timeouts, hostile modes).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import select
import selectors
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from . import payloads, phpform
from .hostile import Hostility, Plan
from .models import ApiError, App, Installation, LogEntry, Reply, TokenPair, time_block
from .state import Portal, State
from .tls import Certificates

_REST_PATH_RE = re.compile(r"^/rest/([^/]*)$")
_MAX_BODY = 16 * 1024 * 1024
_HANDSHAKE_TIMEOUT = 5.0
_CHUNK = 64 * 1024


class _Server:
    """Listening sockets on loopback addresses, all on one port; a daemon thread per connection."""

    def __init__(self, emulator: Emulator, address: str, port: int, certs: Certificates | None) -> None:
        self.emulator = emulator
        self.certs = certs
        self.port = port
        self.stopping = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._listeners: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.listen(address)

    def listen(self, host: str) -> None:
        """Serve `host` too (a loopback address) on the emulator's port."""
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the emulator binds loopback addresses only, not {host}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.port))
            sock.listen(256)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        with self._lock:
            self._listeners[host] = sock
            self._selector.register(sock, selectors.EVENT_READ)

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                listener: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    conn, addr = listener.accept()
                except (BlockingIOError, OSError):
                    continue
                conn.setblocking(True)
                with self._lock:
                    self._open.add(conn)
                threading.Thread(target=self._connection, args=(conn, addr), daemon=True).start()

    def _connection(self, conn: socket.socket, addr: Any) -> None:
        sock: socket.socket = conn
        try:
            if self.certs is not None:
                conn.settimeout(_HANDSHAKE_TIMEOUT)
                if conn.recv(1, socket.MSG_PEEK) == b"\x16":
                    sock = self.certs.context(conn.getsockname()[0]).wrap_socket(conn, server_side=True)
            _Handler(sock, addr, self)  # type: ignore[arg-type]  # the handler needs only what _Server has
        except (OSError, ssl.SSLError, ValueError):
            pass  # the client went away or spoke neither HTTP nor TLS; nothing to answer to
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                self._open.discard(conn)

    def drop_connections(self) -> None:
        """Close kept-alive connections so that a stopped emulator answers nothing any more."""
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        with self._lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
        for sock in listeners:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()
        self._selector.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real portals: clients reuse connections
    # Headers and body go out as two writes; without TCP_NODELAY, Nagle plus the client's delayed
    # ACK adds ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server_version = "b24-emulator"
    timeout = 60  # an idle kept-alive connection is closed after this
    server: _Server  # type: ignore[assignment]

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

    # -- where the request arrived ---------------------------------------------------------
    @property
    def _host(self) -> str:
        return str(self.connection.getsockname()[0])

    @property
    def _tls(self) -> bool:
        return isinstance(self.connection, ssl.SSLSocket)

    @property
    def _scheme(self) -> str:
        return "https" if self._tls else "http"

    # -- request handling --------------------------------------------------------------------
    def _handle(self) -> None:
        state = self.server.emulator.state
        ts, t0 = time.time(), time.perf_counter()
        host = self._host
        plan: Plan | None = None
        try:
            kind = state.host_kind(host)
            if kind == "portal":
                kind, reply, plan = self._portal(state, host)
            elif kind == "oauth":
                kind, reply, plan = self._oauth_host(state)
            else:
                kind, reply = "foreign", self._foreign(state)
        except Exception:  # an emulator bug must still answer, never hang the client
            kind, reply = "other", Reply.error(ApiError("INTERNAL_SERVER_ERROR", "Emulator failure", 500))
        reply.log.setdefault("host", host)
        reply.log["scheme"] = self._scheme
        if plan is not None:
            reply.log["hostile"] = plan.mode
        if reply.drop_after is not None:
            state.record(kind, reply, ts, time.perf_counter() - t0, status=0)
            self._wait(reply.drop_after)
            self._drop()
            return
        if plan is not None and plan.mode == "stall":
            # Never answered (or only late): logged with status 0 if it never will be.
            state.record(kind, reply, ts, time.perf_counter() - t0, status=0 if plan.delay is None else None)
            if not self._wait(plan.delay):
                self._drop()
                return
            self._send(reply)
            return
        # Logged before answering, so that a client that has its answer also finds the entry.
        state.record(kind, reply, ts, time.perf_counter() - t0)
        if plan is not None and plan.mode == "drip":
            self._send_drip(reply, plan.interval)
        elif plan is not None and plan.mode == "huge":
            self._send_huge(reply, plan.size, plan.declare_length)
        else:
            self._send(reply)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > _MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _take_plan(self, hostility: Hostility) -> Plan | None:
        plan = hostility.take()
        if plan is not None and plan.mode == "downgrade" and not self._tls:
            return None  # already on http: the downgraded request is served as usual (and logged so)
        return plan

    def _hostile_reply(self, plan: Plan, log: dict[str, Any]) -> Reply | None:
        """The answer of a mode that does not execute the request, or None."""
        state = self.server.emulator.state
        url = urlsplit(self.path)
        if plan.mode == "redirect":
            target = plan.location or self.server.emulator.foreign_endpoint()
            if target.endswith("/"):
                target += url.path.rsplit("/", 1)[-1] + (f"?{url.query}" if url.query else "")
            return _redirect(target, log)
        if plan.mode == "downgrade":
            return _redirect(f"http://{self._host}:{state.port}{self.path}", log)
        if plan.mode == "stall" and not plan.execute:
            return Reply(0, log=dict(log))
        return None

    def _portal(self, state: State, host: str) -> tuple[str, Reply, Plan | None]:
        url = urlsplit(self.path)
        body = self._read_body()
        portal = state.portal_at(host)
        plan = self._take_plan(portal.hostile) if portal is not None else None
        log: dict[str, Any] = {"domain": host, "member_id": portal.member_id if portal else None}
        match = _REST_PATH_RE.match(url.path)
        if match is None:
            return "rest", Reply(404, {"error": "NOT_FOUND", "error_description": "No such endpoint"}, log=log), plan
        tail = unquote(match.group(1))
        log["method"] = tail.lower() or None
        if plan is not None:
            early = self._hostile_reply(plan, log)
            if early is not None:
                return "rest", early, plan
        try:
            params = self._params(url.query, body)
        except ValueError as exc:
            err = ApiError("INVALID_REQUEST", str(exc), 400)
            return "rest", Reply.error(err, **log), plan
        auth = self._auth(params)
        delay = state.delay_for(host)
        if delay > 0:
            time.sleep(delay)  # outside the state lock: concurrent portals overlap
        reply = state.rest(host, tail, url.query, params, auth)
        reply.log["auth_seen"] = auth is not None
        return "rest", reply, plan

    def _oauth_host(self, state: State) -> tuple[str, Reply, Plan | None]:
        url = urlsplit(self.path)
        self._read_body()  # drained, so that a kept-alive connection stays in step
        if url.path in ("/oauth/token/", "/oauth/token"):
            plan = self._take_plan(self.server.emulator.oauth_hostile)
            if plan is not None:
                early = self._hostile_reply(plan, {"method": "oauth"})
                if early is not None:
                    return "oauth", early, plan
            if state.latency:
                time.sleep(state.latency)
            query = dict(parse_qsl(url.query, keep_blank_values=True))
            return "oauth", state.oauth(self.command, query), plan
        if url.path.startswith("/_emulator/"):
            return "control", self._control(url.path, url.query), None
        return "other", Reply(404, {"error": "NOT_FOUND", "error_description": "No such endpoint"}), None

    def _foreign(self, state: State) -> Reply:
        """An unfriendly host: logs what arrived (names only) and answers a plausible success."""
        url = urlsplit(self.path)
        try:
            body = self._read_body()
            params = self._params(url.query, body)
        except ValueError:
            params = {}
        auth = self._auth(params)
        keys = sorted(str(k) for k in params)
        log: dict[str, Any] = {"method": url.path.rsplit("/", 1)[-1].lower() or None, "params_keys": keys}
        log["auth_seen"] = auth is not None or "client_secret" in params or "refresh_token" in params
        now = time.time()
        return Reply(200, {"result": [], "time": time_block(now, now)}, log=log)

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
                {
                    "member_id": p.member_id,
                    "name": p.name,
                    "domain": p.domain,
                    "client_endpoint": p.client_endpoint,
                }
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

    # -- answering -----------------------------------------------------------------------------
    def _payload(self, reply: Reply) -> tuple[bytes, str]:
        if reply.text is not None:
            return reply.text.encode(), "text/html; charset=utf-8"
        return json.dumps(reply.body, ensure_ascii=False).encode(), "application/json; charset=utf-8"

    def _head(self, reply: Reply, ctype: str, length: int | None) -> bytes:
        """Status line and headers as bytes (not yet written)."""
        self.send_response(reply.status)
        self.send_header("Content-Type", ctype)
        if length is None:
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(length))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        buffered: list[bytes] = getattr(self, "_headers_buffer", [])
        self._headers_buffer: list[bytes] = []
        return b"".join(buffered) + b"\r\n"

    def _send(self, reply: Reply) -> None:
        payload, ctype = self._payload(reply)
        try:
            self.wfile.write(self._head(reply, ctype, len(payload)) + payload)
        except OSError:
            self.close_connection = True  # the client went away; nothing to answer to

    def _send_drip(self, reply: Reply, interval: float) -> None:
        payload, ctype = self._payload(reply)
        data = self._head(reply, ctype, len(payload)) + payload
        try:
            for i in range(len(data)):
                if i and self.server.stopping.wait(interval):
                    break
                self.wfile.write(data[i : i + 1])
        except OSError:
            pass
        self.close_connection = True

    def _send_huge(self, reply: Reply, size: int, declare_length: bool) -> None:
        payload, ctype = self._payload(reply)
        if reply.text is None and payload.endswith(b"}"):
            prefix, suffix = payload[:-1] + b',"padding":"', b'"}'
        else:
            prefix, suffix = payload, b""
        pad = max(0, size - len(prefix) - len(suffix))
        block = b"x" * _CHUNK
        try:
            self.wfile.write(self._head(reply, ctype, len(prefix) + pad + len(suffix) if declare_length else None))
            self.wfile.write(prefix)
            while pad > 0 and not self.server.stopping.is_set():
                piece = block[: min(pad, _CHUNK)]
                self.wfile.write(piece)
                pad -= len(piece)
            self.wfile.write(suffix)
        except OSError:
            pass
        self.close_connection = True

    def _wait(self, seconds: float | None) -> bool:
        """Hold the connection for `seconds` (None: until the client goes or the emulator stops).

        True if the time ran out with the client still there.
        """
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self.server.stopping.is_set():
            step = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if step <= 0:
                return True
            try:
                readable, _, _ = select.select([self.connection], [], [], step)
            except (OSError, ValueError):
                return False
            if readable:
                return False  # the client closed (or sent more): stop holding
        return False

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def _redirect(location: str, log: dict[str, Any]) -> Reply:
    page = f"<html><body>302 Found: {location.split('?', 1)[0]}</body></html>"
    return Reply(302, headers={"Location": location}, text=page, log=dict(log))


class Emulator:
    """Bitrix24 portals and the OAuth server, each at its own loopback address, on one port.

    The sockets are bound at construction and as portals are added (so `base_url` and every
    `client_endpoint` are known before `start()`); `start()` begins serving in a daemon thread.
    `tls=True`: https everywhere (plain http is still answered on the same port); trust
    `ca_file`.
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
        tls: bool = False,
    ) -> None:
        self._certs = Certificates() if tls else None
        self.state = State(
            latency=latency,
            rate=rate,
            burst=burst,
            rate_limit=rate_limit,
            access_ttl=access_ttl,
            uninstalled_refresh_error=uninstalled_refresh_error,
            timeout_delay=timeout_delay,
            oauth_address=host,
            scheme="https" if tls else "http",
        )
        self.oauth_hostile = Hostility()
        self._httpd = _Server(self, host, port, self._certs)
        self.state.port = self._httpd.port
        self.state.on_new_host = self._httpd.listen
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._installations: dict[tuple[str, str], Installation] = {}
        self._foreign: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Emulator:
        if self._stopped:
            raise RuntimeError("a stopped emulator cannot be restarted; create a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="b24-emulator", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._httpd.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd.drop_connections()
        self._httpd.server_close()
        if self._certs is not None:
            self._certs.close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._httpd.port

    @property
    def scheme(self) -> str:
        return self.state.scheme

    @property
    def ca_file(self) -> str | None:
        """The CA certificate (PEM) that signed every address's certificate (`tls=True` only)."""
        return self._certs.ca_file if self._certs is not None else None

    def foreign_host(self, *, new: bool = False) -> str:
        """A loopback address of no portal (the 'other host' of hostile redirects); the same one
        each call unless `new`."""
        if new or self._foreign is None:
            host = self.state.new_foreign_host()
            if self._foreign is None:
                self._foreign = host
            return host
        return self._foreign

    def foreign_endpoint(self, *, new: bool = False) -> str:
        """`{scheme}://{foreign host}:{port}/rest/`."""
        return f"{self.scheme}://{self.foreign_host(new=new)}:{self.port}/rest/"

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
        name: str,
        member_id: str | None = None,
        *,
        users: dict[int, bool] | None = None,
        rate: float | None = None,
        burst: int | None = None,
    ) -> Portal:
        """A portal at a new loopback address; `name` is its label (e.g. `acme.bitrix24.test`),
        `users` maps user id → is admin (default `{1: True, 2: False}`)."""
        return self.state.add_portal(name, member_id, users=users, rate=rate, burst=burst)

    def portal(self, key: str) -> Portal:
        """A portal by member_id, name or host (old names and hosts of renamed portals too)."""
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
        """The design §3 portal record of an installation, ready to store in SSM.

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
