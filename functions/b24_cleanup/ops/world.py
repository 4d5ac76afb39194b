"""`b24-cleanup emulator`: a local world to develop against, in one process.

The Bitrix24 emulator with N seeded portals and, with `--aws`, an AWS side (a moto server on
loopback) holding what a deployed stack holds: the app's credentials, the declared set, one record
per portal and the job queue. It prints the environment to export, after which `plan`, `sweep`,
`register` and the app-side `TokenAccess` work against it from any other shell, unchanged.

Addresses and ids are printed, never tokens or the client secret (they are fake, but the habit
is what matters); the AWS keys printed are moto's fixed placeholders, not credentials.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from .emulator import App, Emulator, Installation, payloads

APP_URL = "https://app.example.com/b24"
DECLARED = [
    {"event": "ONAPPUNINSTALL", "handler": f"{APP_URL}/uninstall"},
    {"event": "ONCRMLEADADD", "handler": f"{APP_URL}/events"},
    {"event": "ONCRMDEALUPDATE", "event_type": "offline"},
]
STALE_URL = "https://old-deploy.example.com/b24/events"
REGION = "us-east-1"
DEFAULT_PREFIX = "/b24-cleanup/local"
QUEUE = "b24-cleanup-jobs.fifo"
# moto accepts any keys; these are its documented placeholders, printed on purpose.
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class WorldError(Exception):
    """The world cannot start as asked (a port in use, no moto): one line, exit 2."""


# Four kinds of portal, in turn, so that any N shows every case a sweep meets.
KINDS = ("tidy", "stale URL", "unused event", "declared missing")


def _bind_rows(emulator: Emulator, app: App, inst: Installation, kind: str) -> None:
    portal = inst.portal
    declared = [d for d in DECLARED if not (kind == "declared missing" and d["event"] == "ONCRMLEADADD")]
    for entry in declared:
        offline = entry.get("event_type") == "offline"
        portal.bind(app, entry["event"], None if offline else entry["handler"], offline=offline)
    if kind == "stale URL":  # an old deployment's URL under two users
        portal.bind(app, "ONCRMLEADADD", STALE_URL, user_id=0)
        portal.bind(app, "ONCRMLEADADD", STALE_URL, user_id=1)
    elif kind == "unused event":  # an event the app no longer uses, online and offline
        portal.bind(app, "ONCRMCONTACTADD", f"{APP_URL}/events")
        portal.bind(app, "ONTASKADD", offline=True)


@dataclass
class World:
    emulator: Emulator
    app: App
    installations: list[Installation]
    kinds: dict[str, str]  # member_id → kind
    state_dir: Path
    newcomer_body: Path  # a genuine ONAPPINSTALL body of a portal not registered yet
    prefix: str
    aws_url: str | None = None
    queue_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    _moto: Any = None

    def stop(self) -> None:
        if self._moto is not None:
            self._moto.stop()
        self.emulator.stop()


def _check_port_free(port: int, what: str) -> None:
    if port == 0:
        return
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise WorldError(f"cannot use port {port} for {what}: {exc.strerror}") from None


def start_world(
    portals: int = 3,
    *,
    port: int = 0,
    aws: bool = False,
    aws_port: int = 0,
    prefix: str = DEFAULT_PREFIX,
    state_dir: Path | None = None,
) -> World:
    """Start the emulator (and moto server), seed everything, return the running world."""
    try:
        emulator = Emulator(port=port).start()
    except OSError as exc:
        raise WorldError(f"cannot use port {port} for the emulator: {exc.strerror}") from None
    try:
        app = emulator.add_app()
        installations, kinds = [], {}
        for i in range(portals):
            portal = emulator.add_portal(f"portal-{i + 1:03d}.bitrix24.test")
            inst = emulator.install(portal, app)
            kind = KINDS[i % len(KINDS)]
            _bind_rows(emulator, app, inst, kind)
            installations.append(inst)
            kinds[portal.member_id] = kind
        directory = state_dir or Path(tempfile.mkdtemp(prefix="b24-cleanup-world-"))
        directory.mkdir(parents=True, exist_ok=True)
        newcomer = emulator.add_portal("newcomer.bitrix24.test")
        body = directory / "install-newcomer.txt"
        body.write_text(urlencode(payloads.install_form(emulator.state, emulator.install(newcomer, app))))
        body.chmod(0o600)  # it holds the newcomer's (fake) tokens
        world = World(emulator, app, installations, kinds, directory, body, prefix)
        world.env = {"B24_SSM_PREFIX": prefix, "B24_OAUTH_URL": emulator.oauth_url}
        if aws:
            _start_aws(world, aws_port)
        return world
    except BaseException:
        emulator.stop()
        raise


def _start_aws(world: World, aws_port: int) -> None:
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:  # a plain install without the demo extra
        raise WorldError(
            "the AWS side needs moto's server: pip install 'b24-cleanup[demo]' (or run without --aws)"
        ) from None
    _check_port_free(aws_port, "the AWS side")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per AWS call otherwise
    from .atomic import atomic_moto

    atomic_moto()  # a threaded server: writes one step at a time, as AWS's are
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=aws_port, verbose=False)
    server.start()
    world._moto = server
    host, bound = server.get_host_and_port()
    world.aws_url = f"http://{host}:{bound}"
    kwargs: dict[str, Any] = {
        "endpoint_url": world.aws_url,
        "region_name": REGION,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }
    ssm = boto3.client("ssm", **kwargs)
    sqs = boto3.client("sqs", **kwargs)
    prefix = world.prefix
    ssm.put_parameter(
        Name=f"{prefix}/app/credentials",
        Type="SecureString",
        Value=json.dumps({"client_id": world.app.client_id, "client_secret": world.app.client_secret}),
    )
    ssm.put_parameter(Name=f"{prefix}/app/handlers", Type="String", Value=json.dumps({"handlers": DECLARED}))
    for inst in world.installations:
        ssm.put_parameter(
            Name=f"{prefix}/portals/{inst.portal.member_id}",
            Type="SecureString",
            Value=json.dumps(world.emulator.record_for(inst)),
        )
    world.queue_url = sqs.create_queue(QueueName=QUEUE, Attributes={"FifoQueue": "true"})["QueueUrl"]
    world.env.update(
        AWS_ENDPOINT_URL=world.aws_url,
        AWS_REGION=REGION,
        AWS_DEFAULT_REGION=REGION,
        B24_QUEUE_URL=world.queue_url,
        **FAKE_KEYS,
    )


def describe(world: World, out: Callable[[str], object], *, shown: int = 5) -> None:
    """Print where everything is and what to export; addresses and ids only."""
    emulator = world.emulator
    out(f"Bitrix24 emulator listening on {emulator.base_url}")
    out(f"  OAuth token URL: {emulator.oauth_url}")
    out(f"  app client_id: {world.app.client_id}")
    out(f"  app credentials: GET {emulator.base_url}/_emulator/apps/{world.app.client_id}")
    out(f"  {len(world.installations)} portals; kinds in turn: {', '.join(KINDS)}")
    for inst in world.installations[:shown]:
        portal = inst.portal
        out(f"    {portal.name} on {portal.host}  member_id={portal.member_id}  ({world.kinds[portal.member_id]})")
    if len(world.installations) > shown:
        out(f"    … and {len(world.installations) - shown} more")
    out(f"  not registered yet: newcomer.bitrix24.test, its ONAPPINSTALL body in {world.newcomer_body}")
    if world.aws_url is None:
        out(f"  records: GET {emulator.base_url}/_emulator/records/<member_id> (add --aws to have them in SSM)")
        out("Tokens and secrets are not printed: GET the record/credentials URLs above.")
    else:
        out(f"AWS (moto server) on {world.aws_url}: SSM under {world.prefix} (app/credentials, app/handlers,")
        out(f"  {len(world.installations)} portal records), SQS queue {QUEUE}")
        env_file = world.state_dir / "env.sh"
        env_file.write_text(export_lines(world.env) + "\n")
        out("In another shell (or: source " + str(env_file) + "):")
        for line in export_lines(world.env).splitlines():
            out(f"  {line}")
        first = world.installations[0].portal.member_id if world.installations else "MEMBER_ID"
        out("then, for example:")
        out(f"  b24-cleanup plan --member-id {first}")
        out("  b24-cleanup sweep --dry-run")
        out(f"  b24-cleanup register {world.newcomer_body}")
    out("Press Ctrl-C to stop.")


def export_lines(env: dict[str, str]) -> str:
    """Shell lines that make a shell use this world and nothing of another AWS setup."""
    unset = "unset AWS_PROFILE AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL_SSM AWS_ENDPOINT_URL_SQS"
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return f"{unset}\nexport {exports}"


@contextmanager
def _sigterm_stops(stop: threading.Event) -> Iterator[None]:
    """SIGTERM (a test's terminate(), a process manager) stops the world cleanly, like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_world(world: World, out: Callable[[str], object], *, stop: threading.Event | None = None) -> None:
    """Describe the world and block until Ctrl-C, SIGTERM or `stop`."""
    waiter = stop or threading.Event()
    try:
        describe(world, out)
        with _sigterm_stops(waiter):
            try:
                while not waiter.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
        out("stopping")
    finally:
        world.stop()
