"""`b24-cleanup emulator`: run the emulator alone, seeded, for local development against it.

Prints addresses and ids only. Tokens and the client secret are fake but are still never
printed (design §7: the habit is what matters); they are served on loopback by the control URLs
below, and available in Python through `Emulator.record_for`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .models import App, Installation
from .server import Emulator

DECLARED_URL = "https://app.example.com/b24/events"
STALE_URL = "https://old-deploy.example.com/b24/events"


@dataclass
class DemoSeed:
    app: App
    installations: list[Installation]


def seed_demo(emulator: Emulator) -> DemoSeed:
    """One app on three portals: orphans and declared handlers, several users, an empty one."""
    app = emulator.add_app()
    alpha = emulator.add_portal("alpha.bitrix24.test")
    beta = emulator.add_portal("beta.bitrix24.test", users={1: True, 2: False, 15: False})
    gamma = emulator.add_portal("gamma.bitrix24.test")
    installs = [emulator.install(p, app) for p in (alpha, beta, gamma)]

    alpha.bind(app, "ONAPPUNINSTALL", DECLARED_URL)
    alpha.bind(app, "ONCRMLEADADD", DECLARED_URL)
    alpha.bind(app, "ONCRMLEADADD", STALE_URL)  # an orphan: an old deployment's URL
    alpha.bind(app, "ONCRMDEALUPDATE", offline=True)

    beta.bind(app, "ONCRMLEADADD", DECLARED_URL)
    beta.bind(app, "ONCRMCONTACTADD", DECLARED_URL)  # an event the app no longer uses
    beta.bind(app, "ONCRMCONTACTADD", DECLARED_URL, user_id=15)
    beta.bind(app, "ONCRMCONTACTADD", DECLARED_URL, user_id=1)
    beta.bind(app, "ONTASKADD", offline=True, connector_id="sync")
    return DemoSeed(app, installs)


def serve_forever(
    port: int = 0,
    *,
    seed_demo: bool = True,
    out: Callable[[str], object] = print,
    stop: threading.Event | None = None,
) -> None:
    """Start an emulator on 127.0.0.1:`port` (portals on 127.0.0.2, 127.0.0.3, … on the same port),
    optionally seed it, print where things are, and block until Ctrl-C (or until `stop` is set, for
    tests and embedding)."""
    emulator = Emulator(port=port).start()
    try:
        out(f"Bitrix24 emulator listening on {emulator.base_url}")
        out(f"  OAuth token URL: {emulator.oauth_url}")
        out(f"  server_endpoint: {emulator.server_endpoint}")
        if seed_demo:
            seed = _seed(emulator)
            out(f"  app client_id: {seed.app.client_id}")
            out(f"  app credentials: GET {emulator.base_url}/_emulator/apps/{seed.app.client_id}")
            for inst in seed.installations:
                portal = inst.portal
                out(f"  portal {portal.name} at {portal.domain}: member_id={portal.member_id}")
                out(f"    client_endpoint: {portal.client_endpoint}")
                out(f"    record: GET {emulator.base_url}/_emulator/records/{portal.member_id}")
            out(
                "  Tokens and secrets are not printed: GET the record/credentials URLs above, "
                "or use Emulator.record_for(...) in Python."
            )
        out("Press Ctrl-C to stop.")
        waiter = stop or threading.Event()
        try:
            while not waiter.wait(0.5):
                pass
        except KeyboardInterrupt:
            out("stopping")
    finally:
        emulator.stop()


_seed = seed_demo  # the keyword argument of serve_forever shadows the function's name
