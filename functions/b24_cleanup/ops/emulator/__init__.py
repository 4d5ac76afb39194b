"""The project's Bitrix24 emulator: portals, the OAuth server, rate limits and fault injection.

Used by the integration tests, `b24-cleanup demo`, `b24-cleanup emulator` and the benchmarks.
`State` (in :mod:`.state`) is the HTTP-free model; `Emulator` serves it on loopback, every portal
at its own loopback address (:mod:`.server`); `portal.hostile` / `Emulator.oauth_hostile` make a
host drip, stall, flood, redirect elsewhere or downgrade https to http (:mod:`.hostile`).

Where the reference is silent, the emulator chooses (and the tests pin):
- a non-admin's `event.bind` without `auth_type` stores his own user id, an admin's stores 0
  (as [src] `Event::eventBind` does);
- the rate bucket counts only admitted requests: a 503 `QUERY_LIMIT_EXCEEDED` adds nothing, so a
  client that backs off recovers at the documented drain rate; 302s and OAuth calls are free;
- `auth_connector` without the plan feature answers `WRONG_LICENSE` for bind and unbind alike;
- any `ON[A-Z0-9_]+` event name exists (no per-scope event list); ONOFFLINEEVENT cannot be offline;
- tokens of an uninstalled app answer `APPLICATION_NOT_FOUND`; after a reinstall, the old
  generation's tokens answer `NO_AUTH_FOUND` (REST) and `invalid_grant` (OAuth);
- refreshing an uninstalled app's token answers `uninstalled_refresh_error` (default
  `invalid_grant`, HTTP 400; any other code HTTP 401);
- the token URL answers GET only (405 otherwise); a refresh token is spent at once, no grace;
- ONAPPUNINSTALL is posted without `event_handler_id` (unconfirmed in the reference) and only
  after the rows are deleted and the tokens revoked;
- `batch` does not emulate `$result[...]` chaining; an address no portal was given refuses
  connections (nothing listens there).
"""

from .hostile import Hostility
from .models import ApiError, App, Installation, LogEntry, TokenPair
from .serve import DemoSeed, seed_demo, serve_forever
from .server import Emulator
from .state import CHAOS_FAULTS, Portal, State

__all__ = [
    "CHAOS_FAULTS",
    "ApiError",
    "App",
    "DemoSeed",
    "Emulator",
    "Hostility",
    "Installation",
    "LogEntry",
    "Portal",
    "State",
    "TokenPair",
    "seed_demo",
    "serve_forever",
]
