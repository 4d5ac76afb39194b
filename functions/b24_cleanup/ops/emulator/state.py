"""The emulated world without HTTP: apps, portals, installations, tokens, handler rows, faults.

One re-entrant lock guards all of it. Request handling takes the lock only for bookkeeping and
method execution, never while sleeping (latency, injected timeouts), so that concurrent
requests to different portals overlap in time as they would against real portals.

Token rules (design §10.7, §11):
- a token is bound to one portal, one app, one user and one *generation* of the installation
  (a reinstall starts a new generation; tokens of the old one are unknown to the portal);
- refresh tokens are single-use: a refresh marks the used one spent and its access token
  superseded, at once (no grace period);
- the portal checks an access token in the order of [src]: known? → app installed? → not
  expired/superseded? → user still exists?
"""

from __future__ import annotations

import hmac
import ipaddress
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import methods
from .hostile import Hostility
from .models import (
    STATUSES,
    ApiError,
    App,
    Installation,
    LogEntry,
    Reply,
    TokenPair,
    new_client_id,
    new_client_secret,
    new_member_id,
    new_token,
    time_block,
)

CHAOS_FAULTS = ("INTERNAL_SERVER_ERROR", "QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "OVERLOAD_LIMIT", "timeout")
TIMEOUT = "timeout"

# HTTP status of each error the OAuth server may give for an uninstalled app (design §10.7, §14).
_OAUTH_GONE_STATUS = {"invalid_grant": 400}
# The resource limit (design §10.10): per app and method, processing seconds summed over ten
# one-minute buckets; above the limit the method answers 429 until the oldest bucket drops.
OPERATING_LIMIT = 480.0
_OPERATING_BUCKET = 60
_OPERATING_BUCKETS = 10


# -- internal records ------------------------------------------------------------------------


@dataclass
class _Row:
    """One row of `b_rest_event`: unique on (app, event, handler, user, connector)."""

    id: int
    client_id: str
    event: str
    handler: str  # "" for offline rows
    user_id: int
    connector_id: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, int, str]:
        return (self.client_id, self.event, self.handler, self.user_id, self.connector_id)

    def as_item(self) -> dict[str, Any]:
        """The `event.get` item shape of design §10.3."""
        if self.handler:
            return {"event": self.event, "handler": self.handler, "auth_type": str(self.user_id), "offline": 0}
        return {"event": self.event, "connector_id": self.connector_id, "offline": 1}


@dataclass
class _Install:
    client_id: str
    installed: bool
    generation: int
    application_token: str
    user_id: int


@dataclass
class _Access:
    member_id: str
    client_id: str
    user_id: int
    generation: int
    expires: float
    superseded: bool = False


@dataclass
class _Refresh:
    member_id: str
    client_id: str
    user_id: int
    generation: int
    access_token: str
    chain: int
    used: bool = False


@dataclass
class _FailNext:
    remaining: int
    code: str
    status: int
    methods: frozenset[str] | None
    description: str | None = None


@dataclass
class _FailCommand:
    match: Callable[[str, dict[str, Any]], bool]
    code: str
    status: int
    remaining: int | None


def _status_for(code: str, default: int) -> int:
    return STATUSES.get(code, default)


def _injected(code: str, status: int, description: str | None = None) -> ApiError:
    return ApiError(code, description, status)


# -- Portal ----------------------------------------------------------------------------------


class Portal:
    """One Bitrix24 portal: its users, handler rows, installations, rate bucket and faults.

    A portal lives at its own loopback address (`host`), as a real one lives at its own domain:
    `client_endpoint` is `{scheme}://{host}:{port}/rest/` and `domain` (what a record stores) is
    that host. `name` is the label it was created with (e.g. `acme.bitrix24.test`), for people.

    Tunable attributes (plain, set them any time): `users` (user id → is admin), `latency`
    (seconds added to each request), `rate`/`burst` (None: the emulator's), `refuse_batch`,
    `license_auth_connector`, `deleted` (every request answers PORTAL_DELETED); `hostile` (see
    :mod:`.hostile`) for what an unfriendly host does on the wire.
    """

    def __init__(
        self,
        state: State,
        name: str,
        host: str,
        member_id: str,
        users: dict[int, bool],
        rate: float | None,
        burst: int | None,
    ) -> None:
        self._state = state
        self._name = name
        self._host = host
        self.hostile = Hostility()
        self.member_id = member_id
        self.users: dict[int, bool] = dict(users)
        self.rate = rate
        self.burst = burst
        self.latency = 0.0
        self.refuse_batch = False
        self.license_auth_connector = True
        self.deleted = False
        self._rows: list[_Row] = []
        self._next_row_id = 1
        self._installs: dict[str, _Install] = {}
        self._level = 0.0
        self._level_at = time.monotonic()
        self._fail_next: list[_FailNext] = []
        self._fail_commands: list[_FailCommand] = []
        # Operating time (design §10.10, §15): seconds per (client_id, method) per minute bucket.
        self.operating_limit = OPERATING_LIMIT
        self.method_cost: dict[str, float] = {}  # simulated processing seconds billed per call
        self._operating: dict[tuple[str, str], dict[int, float]] = {}
        self.result_patch: dict[str, dict[str, Any]] = {}  # see patch_result

    def __repr__(self) -> str:
        return f"Portal(name={self._name!r}, host={self._host!r}, member_id={self.member_id!r})"

    @property
    def name(self) -> str:
        return self._name

    @property
    def host(self) -> str:
        """The loopback address the portal answers on now (a rename moves it)."""
        return self._host

    @property
    def domain(self) -> str:
        """The host of `client_endpoint`, as design §3 and §9 say a record's `domain` is."""
        return self._host

    @property
    def client_endpoint(self) -> str:
        """`{scheme}://{host}:{port}/rest/`, following renames."""
        return f"{self._state.scheme}://{self._host}:{self._state.port}/rest/"

    # -- seeding and inspection (no HTTP, no permission checks) ------------------------------
    def bind(
        self,
        app: App,
        event: str,
        handler: str | None = None,
        *,
        user_id: int = 0,
        offline: bool = False,
        connector_id: str = "",
    ) -> None:
        """Seed a handler row directly. Raises ValueError on a duplicate row (the unique key)."""
        if offline == bool(handler):
            raise ValueError("an online row needs a handler URL, an offline row must have none")
        try:
            with self._state.lock:
                self._add_row(
                    app.client_id, event.upper(), handler or "", 0 if offline else int(user_id), connector_id, {}
                )
        except ApiError as err:
            raise ValueError(err.description) from None

    def handlers(self, app: App) -> list[dict[str, Any]]:
        """The app's rows as an admin's `event.get` shows them."""
        with self._state.lock:
            return [row.as_item() for row in self._rows_of(app.client_id)]

    def is_installed(self, app: App) -> bool:
        with self._state.lock:
            inst = self._installs.get(app.client_id)
            return bool(inst and inst.installed)

    # -- fault injection ---------------------------------------------------------------------
    def fail_next(
        self,
        n: int,
        code: str = "INTERNAL_SERVER_ERROR",
        status: int | None = None,
        *,
        methods: set[str] | None = None,
        description: str | None = None,
    ) -> None:
        """The next `n` top-level REST requests (of `methods`, if given) fail without executing.

        Counted among the requests the rate bucket admitted, before authentication. `code=
        "timeout"` drops the connection after `Emulator.timeout_delay` seconds. `status`
        defaults to the code's documented one (500 for unknown codes). `description` replaces the
        code's `error_description` (remote text the client must treat as untrusted).
        """
        names = frozenset(m.lower() for m in methods) if methods else None
        with self._state.lock:
            self._fail_next.append(_FailNext(n, code, status or _status_for(code, 500), names, description))

    def patch_result(self, method: str, **keys: Any) -> None:
        """Merge `keys` into every later dict result of `method` (top-level or in a batch), e.g.
        `patch_result("event.unbind", count=float("inf"))`: a portal answering what no real one
        would, on the wire as JSON (`Infinity` included). No keys: stop patching `method`."""
        with self._state.lock:
            if keys:
                self.result_patch[method.lower()] = dict(keys)
            else:
                self.result_patch.pop(method.lower(), None)

    def fail_command(
        self,
        match: Callable[[str, dict[str, Any]], bool],
        code: str,
        status: int | None = None,
        times: int | None = None,
    ) -> None:
        """Calls for which `match(method, params)` is true answer `code` without executing.

        Checked for single calls (after authentication) and for each `batch` sub-call, where
        `params` are the parsed query strings (strings); `params` never include `auth`. `status`
        defaults to the code's documented one (400 for unknown codes). `times=None`: always.
        """
        with self._state.lock:
            self._fail_commands.append(_FailCommand(match, code, status or _status_for(code, 400), times))

    # -- portal life -------------------------------------------------------------------------
    def rename(self, new_name: str) -> None:
        """The portal moves to a new host: its old address answers 302 to the new one (design §10.8)."""
        self._state._rename(self, new_name)

    def expire_tokens(self, app: App) -> None:
        """Every access token of `app` on this portal is expired from now on."""
        self._state._expire(self, app)

    # -- internals (caller holds the state lock) ----------------------------------------------
    def _rows_of(self, client_id: str) -> list[_Row]:
        return [row for row in self._rows if row.client_id == client_id]

    def _add_row(
        self, client_id: str, event: str, handler: str, user_id: int, connector: str, options: dict[str, Any]
    ) -> None:
        row = _Row(self._next_row_id, client_id, event, handler, user_id, connector, dict(options))
        if any(existing.key == row.key for existing in self._rows):
            raise ApiError("ERROR_CORE", "Unable to set event handler: Handler already binded")
        self._next_row_id += 1
        self._rows.append(row)

    def _delete_rows(self, client_id: str, predicate: Callable[[_Row], bool]) -> int:
        keep = [r for r in self._rows if r.client_id != client_id or not predicate(r)]
        removed = len(self._rows) - len(keep)
        self._rows = keep
        return removed

    def _limits(self) -> tuple[float, int]:
        rate = self.rate if self.rate is not None else self._state.rate
        burst = self.burst if self.burst is not None else self._state.burst
        return rate, burst

    def _take(self) -> bool:
        """Leaky bucket (design §10.10): +1 per admitted request, draining `rate`/s.

        A request that would lift the level above `burst` is rejected and does *not* add to
        the level (so a client that backs off recovers at the documented drain rate).
        """
        rate, burst = self._limits()
        now = time.monotonic()
        self._level = max(0.0, self._level - (now - self._level_at) * rate)
        self._level_at = now
        if self._level + 1 > burst + 1e-9:
            return False
        self._level += 1
        return True

    def operating(self, app: App, method: str) -> float:
        """Seconds `app` has spent in `method` within the current ten-minute window."""
        with self._state.lock:
            return self._operating_used(app.client_id, method, time.time())[0]

    def _operating_used(self, client_id: str, method: str, now: float) -> tuple[float, int]:
        """(seconds used in the window, unix time the oldest bucket drops)."""
        current = int(now // _OPERATING_BUCKET)
        buckets = self._operating.get((client_id, method), {})
        for old in [b for b in buckets if b <= current - _OPERATING_BUCKETS]:
            del buckets[old]
        oldest = min(buckets, default=current)
        return sum(buckets.values()), (oldest + _OPERATING_BUCKETS) * _OPERATING_BUCKET

    def _bill(self, client_id: str, method: str, seconds: float, now: float) -> None:
        buckets = self._operating.setdefault((client_id, method), {})
        bucket = int(now // _OPERATING_BUCKET)
        buckets[bucket] = buckets.get(bucket, 0.0) + seconds

    def _top_fault(self, method: str) -> _FailNext | None:
        for rule in self._fail_next:
            if rule.remaining > 0 and (rule.methods is None or method in rule.methods):
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._fail_next.remove(rule)
                return rule
        return None

    def _command_fault(self, method: str, params: dict[str, Any]) -> ApiError | None:
        for rule in self._fail_commands:
            if rule.match(method, dict(params)):
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._fail_commands.remove(rule)
                return _injected(rule.code, rule.status)
        return None


# -- State -----------------------------------------------------------------------------------


class State:
    """Everything the emulator knows; the HTTP layer turns requests into calls on it."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        rate: float = 2.0,
        burst: int = 50,
        rate_limit: bool = True,
        access_ttl: int = 3600,
        uninstalled_refresh_error: str = "invalid_grant",
        oauth_address: str = "127.0.0.1",
        port: int = 0,
        scheme: str = "http",
        timeout_delay: float = 1.0,
    ) -> None:
        self.lock = threading.RLock()
        self.oauth_address = oauth_address
        self.port = port
        self.scheme = scheme
        # Called with each newly allocated address, so that the HTTP layer listens on it.
        self.on_new_host: Callable[[str], None] = lambda _host: None
        self._next_host = int(ipaddress.IPv4Address(oauth_address)) + 1
        self.latency = latency
        self.rate = rate
        self.burst = burst
        self.rate_limit = rate_limit
        self.access_ttl = access_ttl
        self.uninstalled_refresh_error = uninstalled_refresh_error
        self.timeout_delay = timeout_delay
        self.apps: dict[str, App] = {}
        self.portals: dict[str, Portal] = {}  # by member_id
        self._by_name: dict[str, Portal] = {}  # current names and old ones (renames)
        self._by_host: dict[str, Portal] = {}  # current hosts and old ones (renames: 302)
        self.foreign_hosts: list[str] = []
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._chains: dict[int, TokenPair] = {}
        self._next_chain = 1
        self._chaos_rate = 0.0
        self._chaos_faults: tuple[str, ...] = CHAOS_FAULTS
        self._rng = random.Random()
        self._log: list[LogEntry] = []
        self._log_lock = threading.Lock()
        self._application_tokens: set[str] = set()  # every one ever issued, for leak checks
        # What a successful refresh answer says beyond the truth (tests of answers no real server
        # gives: `expires: Infinity`, a client_endpoint that is no URL, no scope): keys set, keys left out.
        self.oauth_patch: dict[str, Any] = {}
        self.oauth_omit: set[str] = set()

    # -- endpoints ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The OAuth server's address (also where the `_emulator/` helpers are)."""
        return f"{self.scheme}://{self.oauth_address}:{self.port}"

    @property
    def server_endpoint(self) -> str:
        return f"{self.base_url}/rest/"

    @property
    def oauth_host(self) -> str:
        return f"{self.oauth_address}:{self.port}"

    def allocate_host(self) -> str:
        """The next unused loopback address (127.0.0.0/8 is all loopback on Linux)."""
        with self.lock:
            while True:
                candidate = ipaddress.IPv4Address(self._next_host)
                self._next_host += 1
                if candidate not in _LOOPBACK:
                    raise RuntimeError("out of loopback addresses")
                if candidate.packed[-1] in (0, 255):  # no network/broadcast look-alikes
                    continue
                try:
                    self.on_new_host(str(candidate))
                except OSError:
                    continue  # someone else holds this address on our port: take the next
                return str(candidate)

    def new_foreign_host(self) -> str:
        """A loopback address that belongs to no portal: the 'other host' of hostile redirects."""
        host = self.allocate_host()
        with self.lock:
            self.foreign_hosts.append(host)
        return host

    def host_kind(self, host: str) -> str:
        """What answers on `host`: "oauth", "portal", "foreign" or "none"."""
        with self.lock:
            if host == self.oauth_address:
                return "oauth"
            if host in self._by_host:
                return "portal"
            if host in self.foreign_hosts:
                return "foreign"
            return "none"

    def portal_at(self, host: str) -> Portal | None:
        with self.lock:
            return self._by_host.get(host)

    # -- registry ----------------------------------------------------------------------------
    def add_app(
        self, client_id: str | None = None, client_secret: str | None = None, *, scope: str = "crm,user"
    ) -> App:
        app = App(client_id or new_client_id(), client_secret or new_client_secret(), scope=scope)
        with self.lock:
            if app.client_id in self.apps:
                raise ValueError(f"app {app.client_id} exists already")
            self.apps[app.client_id] = app
        return app

    def add_portal(
        self,
        name: str,
        member_id: str | None = None,
        *,
        users: dict[int, bool] | None = None,
        rate: float | None = None,
        burst: int | None = None,
    ) -> Portal:
        _check_name(name)
        member_id = member_id or new_member_id()
        with self.lock:
            if member_id in self.portals:
                raise ValueError(f"a portal with member_id {member_id} exists already")
            if name in self._by_name:
                raise ValueError(f"portal name {name} is taken")
            host = self.allocate_host()
            portal = Portal(
                self, name, host, member_id, users if users is not None else {1: True, 2: False}, rate, burst
            )
            self.portals[member_id] = portal
            self._by_name[name] = portal
            self._by_host[host] = portal
        return portal

    def portal(self, key: str) -> Portal:
        """A portal by member_id, by (current or old) name or by (current or old) host."""
        with self.lock:
            found = self.portals.get(key) or self._by_name.get(key) or self._by_host.get(key)
        if found is None:
            raise KeyError(key)
        return found

    def _rename(self, portal: Portal, new_name: str) -> None:
        _check_name(new_name)
        with self.lock:
            owner = self._by_name.get(new_name)
            if owner is not None and owner is not portal:
                raise ValueError(f"portal name {new_name} is taken")
            host = self.allocate_host()
            self._by_name[new_name] = portal
            self._by_host[host] = portal
            portal._name = new_name
            portal._host = host

    # -- installations and tokens -------------------------------------------------------------
    def install(self, portal: Portal, app: App, user_id: int = 1) -> Installation:
        """Install `app` on `portal` (a new generation: tokens of an earlier install are dead)."""
        with self.lock:
            self._check_user(portal, user_id)
            inst = portal._installs.get(app.client_id)
            if inst is not None and inst.installed:
                raise ValueError(f"{app.client_id} is already installed on {portal.domain}: update or uninstall")
            generation = inst.generation + 1 if inst else 1
            inst = _Install(app.client_id, True, generation, new_token(16), user_id)
            self._application_tokens.add(inst.application_token)
            portal._installs[app.client_id] = inst
            chain = self._new_chain()
            pair = self._issue(portal, app, user_id, self.access_ttl, chain)
            return Installation(portal, app, user_id, inst.application_token, pair, "ONAPPINSTALL", chain)

    def update(self, portal: Portal, app: App, user_id: int | None = None) -> Installation:
        """An app update: a new `application_token` (design §10.5) and a new token pair.

        Handler rows and earlier tokens stay valid (handlers are kept on update, design §10.2).
        """
        with self.lock:
            inst = self._installed(portal, app)
            user = inst.user_id if user_id is None else user_id
            self._check_user(portal, user)
            inst.application_token = new_token(16)
            self._application_tokens.add(inst.application_token)
            app.version += 1
            chain = self._new_chain()
            pair = self._issue(portal, app, user, self.access_ttl, chain)
            return Installation(portal, app, user, inst.application_token, pair, "ONAPPUPDATE", chain)

    def uninstall(self, portal: Portal, app: App) -> str:
        """Like [src] `CRestUtil::CleanApp`: delete all the app's rows, revoke its tokens.

        Returns the installation's `application_token` (for the ONAPPUNINSTALL payload).
        """
        with self.lock:
            inst = self._installed(portal, app)
            inst.installed = False
            portal._delete_rows(app.client_id, lambda _row: True)
            return inst.application_token

    def secrets(self) -> set[str]:
        """Every secret this emulator issued: tokens, client secrets, application tokens.

        What the leak checks search every log line, output and exception message for.
        """
        with self.lock:
            return (
                set(self._access)
                | set(self._refresh)
                | {app.client_secret for app in self.apps.values()}
                | set(self._application_tokens)
            )

    def issue_tokens(self, portal: Portal, app: App, user_id: int, expires_in: int | None = None) -> TokenPair:
        """A fresh pair (a new chain) for another user of an installed app."""
        with self.lock:
            self._installed(portal, app)
            self._check_user(portal, user_id)
            return self._issue(
                portal, app, user_id, self.access_ttl if expires_in is None else expires_in, self._new_chain()
            )

    def latest_tokens(self, chain: int) -> TokenPair:
        """The newest pair of a token chain (after any refreshes)."""
        with self.lock:
            return self._chains[chain]

    def application_token(self, portal: Portal, app: App) -> str:
        with self.lock:
            return self._installed(portal, app).application_token

    def _installed(self, portal: Portal, app: App) -> _Install:
        inst = portal._installs.get(app.client_id)
        if inst is None or not inst.installed:
            raise ValueError(f"{app.client_id} is not installed on {portal.domain}")
        return inst

    @staticmethod
    def _check_user(portal: Portal, user_id: int) -> None:
        if user_id not in portal.users:
            raise ValueError(f"user {user_id} does not exist on {portal.domain}")

    def _new_chain(self) -> int:
        chain = self._next_chain
        self._next_chain += 1
        return chain

    def _issue(self, portal: Portal, app: App, user_id: int, expires_in: int, chain: int) -> TokenPair:
        inst = portal._installs[app.client_id]
        now = time.time()
        access, refresh = new_token(), new_token()
        self._access[access] = _Access(portal.member_id, app.client_id, user_id, inst.generation, now + expires_in)
        self._refresh[refresh] = _Refresh(portal.member_id, app.client_id, user_id, inst.generation, access, chain)
        pair = TokenPair(access, refresh, int(now + expires_in), expires_in, user_id, portal.member_id, app.client_id)
        self._chains[chain] = pair
        return pair

    def _expire(self, portal: Portal, app: App) -> None:
        with self.lock:
            past = time.time() - 1
            for rec in self._access.values():
                if rec.member_id == portal.member_id and rec.client_id == app.client_id:
                    rec.expires = min(rec.expires, past)

    # -- chaos -------------------------------------------------------------------------------
    def set_chaos(self, rate: float, faults: list[str] | None = None, seed: int | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("chaos rate must be within [0, 1]")
        chosen = tuple(faults) if faults else CHAOS_FAULTS
        unknown = [f for f in chosen if f not in CHAOS_FAULTS]
        if unknown:
            raise ValueError(f"unknown chaos faults: {unknown}")
        with self.lock:
            self._chaos_rate = rate
            self._chaos_faults = chosen
            if seed is not None:
                self._rng = random.Random(seed)

    def _chaos_fault(self) -> str | None:
        if self._chaos_rate <= 0 or self._rng.random() >= self._chaos_rate:
            return None
        return self._rng.choice(self._chaos_faults)

    # -- REST requests -----------------------------------------------------------------------
    def delay_for(self, host: str | None) -> float:
        """Seconds to sleep before answering (emulator-wide + the portal's)."""
        with self.lock:
            portal = self._by_host.get(host) if host else None
            return self.latency + (portal.latency if portal else 0.0)

    def rest(self, host: str, tail: str, query: str, params: dict[str, Any], auth: str | None) -> Reply:
        """Answer `{scheme}://{host}:{port}/rest/{tail}` with `params` (the `auth` already taken out)."""
        method = methods.normalize_method(tail)
        log: dict[str, Any] = {
            "domain": host,
            "method": method or None,
            "params_keys": sorted(str(k) for k in params),
            "commands": methods.batch_command_names(params) if method == "batch" else [],
        }
        started = time.time()
        with self.lock:
            portal = self._by_host.get(host)
            if portal is None:
                return Reply.error(ApiError("PORTAL_NOT_FOUND", "Portal not found", 404), **log)
            log["member_id"] = portal.member_id
            if portal.host != host:
                location = portal.client_endpoint + tail + (f"?{query}" if query else "")
                page = f"<html><body>302 Found: {portal.client_endpoint}</body></html>"
                return Reply(302, headers={"Location": location}, text=page, log=log)
            if portal.deleted:
                return Reply.error(ApiError("PORTAL_DELETED", None, 403), **log)
            if self.rate_limit and not portal._take():
                return Reply.error(ApiError("QUERY_LIMIT_EXCEEDED", None, 503), **log)
            rule = portal._top_fault(method)
            fault = (rule.code, rule.status, rule.description) if rule else None
            if fault is None:
                chaos = self._chaos_fault()
                fault = (chaos, _status_for(chaos, 500), None) if chaos else None
            if fault is not None:
                if fault[0] == TIMEOUT:
                    return Reply(0, drop_after=self.timeout_delay, log={**log, "error": TIMEOUT})
                return Reply.error(_injected(*fault), **log)
            try:
                caller = self._authenticate(portal, auth)
                log.update(client_id=caller.client_id, user_id=caller.user_id)
            except ApiError as err:
                return Reply.error(err, **log)
            used, reset_at = portal._operating_used(caller.client_id, method, started)
            if used > portal.operating_limit:
                blocked = ApiError("OPERATION_TIME_LIMIT", None, 429)
                timing = time_block(started, time.time(), operating=used, operating_reset_at=reset_at)
                return Reply(429, {**blocked.body(), "time": timing}, log={"error": blocked.code, **log})
            try:
                result = methods.call(caller, method, params)
            except ApiError as err:
                return Reply.error(err, **log)
            finished = time.time()
            # A batch is billed to `batch` as one request, its sub-commands' work included, and
            # nothing to the sub-commands' methods (b24jssdk PR #539, design §10.15).
            billed = (finished - started) + portal.method_cost.get(method, 0.0)
            if method == "batch":
                names = methods.batch_command_names(params)[: methods.BATCH_MAX_LENGTH]
                billed += sum(portal.method_cost.get(name, 0.0) for name in names)
            portal._bill(caller.client_id, method, billed, finished)
            used, reset_at = portal._operating_used(caller.client_id, method, finished)
            timing = time_block(started, finished, operating=used, operating_reset_at=reset_at)
            return Reply(200, {"result": result, "time": timing}, log=log)

    def _authenticate(self, portal: Portal, token: str | None) -> methods.Caller:
        """The portal-side token check, in the order of design §10.11."""
        if not token:
            raise ApiError("NO_AUTH_FOUND", None, 401)  # only when no token came at all
        rec = self._access.get(token)
        if rec is None or rec.member_id != portal.member_id:
            raise ApiError("invalid_token", None, 401)  # a token this portal never issued
        inst = portal._installs.get(rec.client_id)
        if inst is None or not inst.installed:
            raise ApiError("APPLICATION_NOT_FOUND", None, 401)
        if inst.generation != rec.generation:
            raise ApiError("invalid_token", None, 401)  # revoked by an uninstall, then reinstalled
        if rec.superseded or rec.expires <= time.time():
            raise ApiError("expired_token", None, 401)
        if rec.user_id not in portal.users:
            raise ApiError("authorization_error", None, 401)
        return methods.Caller(portal, self.apps[rec.client_id], rec.user_id)

    # -- OAuth server ------------------------------------------------------------------------
    def oauth(self, http_method: str, query: dict[str, Any]) -> Reply:
        """`GET /oauth/token/?grant_type=refresh_token&...` (design §10.7)."""
        q = {str(k): methods.text(v) for k, v in query.items()}
        log: dict[str, Any] = {"method": q.get("grant_type") or None, "params_keys": sorted(q)}
        if http_method != "GET":
            return Reply.error(ApiError("invalid_request", "The token endpoint answers GET requests", 405), **log)
        with self.lock:
            if q.get("grant_type") != "refresh_token":
                return Reply.error(ApiError("invalid_request", "Unsupported grant_type"), **log)
            app = self.apps.get(q.get("client_id", ""))
            if app is None:
                # An unknown client_id is refused with HTTP 200 (design §10.15, b24pysdk's live tests).
                return Reply.error(ApiError("wrong_client", None, 200), **log)
            if not hmac.compare_digest(q.get("client_secret", "").encode(), app.client_secret.encode()):
                return Reply.error(ApiError("invalid_client", None, 400), **log)
            log["client_id"] = app.client_id
            token = q.get("refresh_token", "")
            if not token:
                return Reply.error(ApiError("invalid_request", "refresh_token is missing"), **log)
            rec = self._refresh.get(token)
            if rec is None:
                return Reply.error(ApiError("invalid_grant"), **log)
            portal = self.portals[rec.member_id]
            log.update(member_id=portal.member_id, domain=portal.domain, user_id=rec.user_id)
            if rec.client_id != app.client_id:
                # b24pysdk: the real server answers wrong_client with HTTP 200.
                return Reply.error(ApiError("wrong_client", None, 200), **log)
            if rec.used:
                return Reply.error(ApiError("invalid_grant"), **log)
            inst = portal._installs.get(app.client_id)
            if inst is None or not inst.installed:
                code = self.uninstalled_refresh_error
                return Reply.error(ApiError(code, None, _OAUTH_GONE_STATUS.get(code, 401)), **log)
            if inst.generation != rec.generation:
                return Reply.error(ApiError("invalid_grant"), **log)
            rec.used = True
            old_access = self._access.get(rec.access_token)
            if old_access is not None:
                old_access.superseded = True
            pair = self._issue(portal, app, rec.user_id, self.access_ttl, rec.chain)
            body = {
                "access_token": pair.access_token,
                "client_endpoint": portal.client_endpoint,
                "domain": self.oauth_host,
                "expires": pair.expires,
                "expires_in": pair.expires_in,
                "member_id": portal.member_id,
                "refresh_token": pair.refresh_token,
                "scope": app.scope,
                "server_endpoint": self.server_endpoint,
                "status": app.status,
                "user_id": pair.user_id,
            }
            body.update(self.oauth_patch)
            for key in self.oauth_omit:
                body.pop(key, None)
            return Reply(200, body, log=log)

    # -- request log -------------------------------------------------------------------------
    def record(self, kind: str, reply: Reply, ts: float, duration: float, status: int | None = None) -> None:
        info = reply.log
        entry = LogEntry(
            ts=ts,
            kind=kind,
            member_id=info.get("member_id"),
            domain=info.get("domain"),
            method=info.get("method"),
            status=reply.status if status is None else status,
            error=info.get("error"),
            commands=list(info.get("commands", [])),
            params_keys=list(info.get("params_keys", [])),
            client_id=info.get("client_id"),
            user_id=info.get("user_id"),
            duration=duration,
            host=info.get("host"),
            scheme=info.get("scheme", "http"),
            hostile=info.get("hostile"),
            auth_seen=bool(info.get("auth_seen", False)),
        )
        with self._log_lock:
            self._log.append(entry)

    def log_entries(
        self, *, member_id: str | None = None, kind: str | None = None, method: str | None = None
    ) -> list[LogEntry]:
        with self._log_lock:
            entries = list(self._log)
        return [
            e
            for e in entries
            if (member_id is None or e.member_id == member_id)
            and (kind is None or e.kind == kind)
            and (method is None or e.method == method)
        ]

    def clear_log(self) -> None:
        with self._log_lock:
            self._log.clear()


_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


def _check_name(name: str) -> None:
    """A portal's name is a label for people and for `Emulator.portal(...)`: keep it plain."""
    if not name or name != name.strip() or any(c in name for c in "/?#%\\ ") or name.startswith(("_", ".")):
        raise ValueError(f"not a usable portal name: {name!r}")
