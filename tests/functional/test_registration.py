"""Registering installs and the app-side token API against the emulator and moto (design §9)."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from typing import Any
from urllib.parse import urlencode

import boto3
import pytest
import requests
from fixtures.sandbox import FAST

from b24_cleanup import runtime
from b24_cleanup.access import PortalNotFoundError, TokenAccess
from b24_cleanup.engine import Engine
from b24_cleanup.errors import InvalidGrantError, RegistrationInvalidError, RegistrationRejectedError
from b24_cleanup.jobs import Action, Job, Outcome
from b24_cleanup.oauth import OAuthClient
from b24_cleanup.ops.emulator import payloads
from b24_cleanup.ops.functionurl import FakeContext, FunctionUrl
from b24_cleanup.ops.sandbox import Sandbox
from b24_cleanup.payload import parse_event_body
from b24_cleanup.registration import register


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Parse a posted form body the way the endpoint does."""
    return parse_event_body(urlencode(pairs).encode(), "application/x-www-form-urlencoded")


def install_body(box: Sandbox, portal=None, app=None, **auth_overrides: str) -> dict[str, Any]:
    """The nested ONAPPINSTALL body a portal posts (design §10.5), for a fresh install."""
    portal = portal or box.emulator.add_portal(f"p{len(box.emulator.portals)}.bitrix24.test")
    inst = box.emulator.install(portal, app or box.app)
    body = parse_form(payloads.install_form(box.emulator.state, inst))
    body["auth"].update(auth_overrides)
    return body


def ssm_versions(box: Sandbox) -> dict[str, int]:
    params = box.store.client.describe_parameters()["Parameters"]
    return {p["Name"]: p["Version"] for p in params}


def works(box: Sandbox, client_endpoint: str, access_token: str) -> bool:
    answer = requests.post(f"{client_endpoint}event.get", json={"auth": access_token}, timeout=5)
    return answer.status_code == 200 and "result" in answer.json()


def test_genuine_install_registers_a_working_chain(box: Sandbox) -> None:
    body = install_body(box)
    posted_refresh = body["auth"]["refresh_token"]

    registration = register(body, box.store, oauth_url=box.emulator.oauth_url)

    record = box.record(registration.member_id)
    assert registration.created and registration.event == "ONAPPINSTALL"
    assert record.application_token == body["auth"]["application_token"]
    assert record.refresh_token != posted_refresh  # the stored pair is the refreshed one
    assert record.server_endpoint == box.emulator.server_endpoint
    assert record.domain == body["auth"]["domain"]
    assert works(box, record.client_endpoint, record.access_token)
    meta = box.store.client.describe_parameters(
        ParameterFilters=[{"Key": "Name", "Values": [box.store.portal_name(registration.member_id)]}]
    )["Parameters"][0]
    assert meta["Type"] == "SecureString"
    with pytest.raises(InvalidGrantError):  # the posted refresh token is spent
        OAuthClient(box.store.app_credentials()).refresh(box.emulator.oauth_url, posted_refresh)


def test_reinstall_replaces_the_record_and_the_old_uninstall_is_skipped(box: Sandbox) -> None:
    seeded = box.add_portal("re.bitrix24.test", extra={"custom": 1, "revoked_at": 5})
    old_token = seeded.installation.application_token
    box.emulator.uninstall(seeded.portal, box.app)
    body = install_body(box, portal=seeded.portal)

    register(body, box.store, oauth_url=box.emulator.oauth_url)

    record = box.record(seeded.member_id)
    assert record.application_token == body["auth"]["application_token"] != old_token
    assert "custom" not in record.data and record.revoked_at is None  # an install starts afresh
    stale = Engine(box.store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=FAST).run(
        Job(Action.UNINSTALL, seeded.member_id, application_token=old_token, ts="1")
    )
    assert stale.outcome is Outcome.SKIPPED
    assert box.record(seeded.member_id) is not None


def test_update_replaces_token_and_pair_and_keeps_the_rest(box: Sandbox) -> None:
    key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
    seeded = box.add_portal("up.bitrix24.test", store=False)
    record = box.emulator.record_for(seeded.installation)
    record["custom"] = {"plan": "pro"}
    box.store.client.put_parameter(
        Name=box.store.portal_name(seeded.member_id),
        Value=json.dumps(record),
        Type="SecureString",
        KeyId=key_id,
        Tier="Advanced",
    )
    inst = box.emulator.update(seeded.portal, box.app)
    body = parse_form(payloads.install_form(box.emulator.state, inst))
    assert body["event"] == "ONAPPUPDATE"

    registration = register(body, box.store, oauth_url=box.emulator.oauth_url)

    after = box.record(seeded.member_id)
    assert not registration.created
    assert after.application_token == inst.application_token != seeded.installation.application_token
    assert after.refresh_token not in (record["refresh_token"], inst.refresh_token)
    assert after.data["custom"] == {"plan": "pro"}
    meta = box.store.client.describe_parameters(
        ParameterFilters=[{"Key": "Name", "Values": [box.store.portal_name(seeded.member_id)]}]
    )["Parameters"][0]
    assert (meta["KeyId"], meta["Tier"]) == (key_id, "Advanced")
    assert works(box, after.client_endpoint, after.access_token)


def test_update_for_an_unknown_portal_is_an_install(box: Sandbox) -> None:
    portal = box.emulator.add_portal("new-by-update.bitrix24.test")
    box.emulator.install(portal, box.app)
    inst = box.emulator.update(portal, box.app)
    body = parse_form(payloads.install_form(box.emulator.state, inst))
    assert register(body, box.store, oauth_url=box.emulator.oauth_url).created


def _spoofs(box: Sandbox) -> dict[str, tuple[dict[str, Any], str | None]]:
    other_app = box.emulator.add_app()
    replay = install_body(box)
    register(json.loads(json.dumps(replay)), box.store, oauth_url=box.emulator.oauth_url)
    victim = install_body(box)
    return {
        "random tokens": (install_body(box, refresh_token="f" * 32, access_token="e" * 32), box.emulator.oauth_url),
        "another app's genuine token": (install_body(box, app=other_app), box.emulator.oauth_url),
        "member_id differs from the OAuth answer": (
            install_body(box, member_id=victim["auth"]["member_id"]),
            box.emulator.oauth_url,
        ),
        "server_endpoint on a foreign host": (install_body(box), None),
        "replayed install (refresh token spent)": (replay, box.emulator.oauth_url),
    }


def test_spoofed_registrations_write_nothing(box: Sandbox) -> None:
    for name, (body, oauth_url) in _spoofs(box).items():
        before = ssm_versions(box)
        oauth_before = len(box.emulator.requests_log(kind="oauth"))
        with pytest.raises(RegistrationRejectedError):
            register(body, box.store, oauth_url=oauth_url)
        assert ssm_versions(box) == before, name
        if oauth_url is None:  # an untrusted host is never contacted
            assert len(box.emulator.requests_log(kind="oauth")) == oauth_before


@pytest.mark.parametrize("missing", ["refresh_token", "application_token", "member_id"])
def test_body_without_tokens_is_not_a_registration(box: Sandbox, missing: str) -> None:
    body = install_body(box)
    del body["auth"][missing]
    with pytest.raises(RegistrationInvalidError):
        register(body, box.store, oauth_url=box.emulator.oauth_url)


# ------------------------------------------------------------------------------ through the endpoint


@pytest.fixture
def endpoint_env(handler_env: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The endpoint handler module, its environment on the box and the box's OAuth server."""
    from b24_cleanup.handlers import endpoint

    monkeypatch.setenv("B24_OAUTH_URL", handler_env.emulator.oauth_url)
    runtime.reset()  # the settings are read once: read them with the OAuth URL
    return endpoint


def queue_depth(box: Sandbox) -> int:
    attrs = boto3.client("sqs").get_queue_attributes(QueueUrl=box.queue_url, AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def test_endpoint_registers_installs_posted_by_the_portal(
    box: Sandbox, endpoint_env: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("B24_ACCEPT_INSTALL", "true")
    with FunctionUrl(endpoint_env.lambda_handler) as url:
        portal = box.emulator.add_portal("joined.bitrix24.test")
        inst = box.emulator.install(portal, box.app, install_url=url.url)
        spoof = payloads.install_form(
            box.emulator.state, box.emulator.install(box.emulator.add_portal("x.bitrix24.test"), box.emulator.add_app())
        )
        spoof_status = payloads.post_form(url.url, spoof)
    assert inst.status == 200
    assert box.record(portal.member_id).application_token == inst.application_token
    assert spoof_status == 401
    assert queue_depth(box) == 0
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"_aws"')]
    names = {(b["action"], m["Name"]) for b in blobs for d in b["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}
    assert {("endpoint", "InstallsRegistered"), ("endpoint", "InstallsRejected")} <= names


def test_endpoint_refuses_installs_when_registration_is_off(box: Sandbox, endpoint_env: Any) -> None:
    with FunctionUrl(endpoint_env.lambda_handler) as url:
        portal = box.emulator.add_portal("off.bitrix24.test")
        inst = box.emulator.install(portal, box.app, install_url=url.url)
    assert inst.status == 400
    assert box.record(portal.member_id) is None
    assert box.emulator.requests_log(kind="oauth") == []


def test_endpoint_spoofed_install_has_the_spoofed_uninstall_body(
    box: Sandbox, endpoint_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from b24_cleanup.ops.functionurl import function_url_event

    monkeypatch.setenv("B24_ACCEPT_INSTALL", "true")
    seeded = box.add_portal("known.bitrix24.test")
    spoof_uninstall = payloads.uninstall_form(box.emulator.state, seeded.portal, "0" * 32, clean=True)
    spoof_install = payloads.install_form(
        box.emulator.state, box.emulator.install(box.emulator.add_portal("y.bitrix24.test"), box.emulator.add_app())
    )

    def call(pairs: list[tuple[str, str]]) -> dict[str, Any]:
        event = function_url_event(
            "POST", "/", {"content-type": "application/x-www-form-urlencoded"}, urlencode(pairs).encode()
        )
        return endpoint_env.lambda_handler(event, FakeContext())

    a, b = call(spoof_uninstall), call(spoof_install)
    assert a["statusCode"] == b["statusCode"] == 401
    assert a["body"] == b["body"]


# ------------------------------------------------------------------------------ token access for the app


def test_token_access_refreshes_when_due_and_persists_first(box: Sandbox) -> None:
    seeded = box.add_portal("app.bitrix24.test", expired=True)
    access = TokenAccess(box.store, oauth_url=box.emulator.oauth_url, settle_seconds=0.05)

    portal = access.get(seeded.member_id)

    assert works(box, portal.client_endpoint, portal.access_token)
    assert box.record(seeded.member_id).access_token == portal.access_token
    assert "access_token=" not in repr(portal) and portal.access_token not in repr(portal)
    again = access.get(seeded.member_id)  # not due any more: no second refresh
    assert again.access_token == portal.access_token
    assert len(box.emulator.requests_log(kind="oauth")) == 1
    with pytest.raises(PortalNotFoundError):
        access.get("0" * 32)


def test_token_access_after_expired_token(box: Sandbox) -> None:
    seeded = box.add_portal("exp2.bitrix24.test")
    access = TokenAccess(box.store, oauth_url=box.emulator.oauth_url, settle_seconds=0.05)
    first = access.get(seeded.member_id)
    seeded.portal.expire_tokens(box.app)
    assert not works(box, first.client_endpoint, first.access_token)

    fresh = access.after_expired(seeded.member_id, first.access_token)

    assert fresh.access_token != first.access_token
    assert works(box, fresh.client_endpoint, fresh.access_token)
    # A second caller holding the same refused token gets the stored one: no second refresh.
    again = access.after_expired(seeded.member_id, first.access_token)
    assert again.access_token == fresh.access_token
    assert len(box.emulator.requests_log(kind="oauth")) == 1


def test_refresh_raced_by_another_writer_adopts_its_pair(box: Sandbox) -> None:
    from b24_cleanup.tokens import ChainState, TokenKeeper

    seeded = box.add_portal("race.bitrix24.test", expired=True)
    stale = box.record(seeded.member_id)
    TokenAccess(box.store, oauth_url=box.emulator.oauth_url, settle_seconds=0.05).get(
        seeded.member_id
    )  # the app's backend moves the chain on
    winner = box.record(seeded.member_id)

    keeper = TokenKeeper(
        box.store,
        seeded.member_id,
        stale,
        lambda: OAuthClient(box.store.app_credentials()),
        chains=ChainState(),  # another process: it knows nothing of the app's refresh
        oauth_url=box.emulator.oauth_url,
        settle_seconds=0.05,
    )
    token = keeper.access_token()  # refresh with the spent token → invalid_grant → re-read

    assert token == winner.access_token
    assert box.record(seeded.member_id).refresh_token == winner.refresh_token


def _child(member_id: str, prefix: str, endpoint: str, env: dict[str, str], out: Any) -> None:
    """A second process asking for a token, against moto's server and the same emulator."""
    os.environ.update(env)
    from b24_cleanup.store import PortalStore

    try:
        portal = TokenAccess(PortalStore(prefix), oauth_url=os.environ["B24_OAUTH_URL"], settle_seconds=0.5).get(
            member_id
        )
        out.put(("ok", portal.access_token))
    except Exception as exc:
        out.put(("error", type(exc).__name__))


def test_threads_and_a_second_process_end_with_one_chain(tmp_path: Any) -> None:
    """Two threads and another process ask for a due portal's token at once: one chain survives."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        from b24_cleanup.ops.emulator import Emulator
        from b24_cleanup.record import PortalRecord
        from b24_cleanup.store import PortalStore

        with Emulator() as emu:
            app = emu.add_app()
            store = PortalStore("/race")
            store.client.put_parameter(
                Name="/race/app/credentials",
                Type="SecureString",
                Value=json.dumps({"client_id": app.client_id, "client_secret": app.client_secret}),
            )
            portal = emu.add_portal("race.bitrix24.test")
            record = PortalRecord(emu.record_for(emu.install(portal, app)))
            record.data["expires"] = 1
            store.put(portal.member_id, record)

            ctx = multiprocessing.get_context("spawn")
            out = ctx.Queue()
            env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PYTHON"))}
            env["B24_OAUTH_URL"] = emu.oauth_url
            child = ctx.Process(target=_child, args=(portal.member_id, "/race", endpoint, env, out))
            child.start()
            results: list[tuple[str, str]] = []

            def ask() -> None:
                try:
                    results.append(
                        (
                            "ok",
                            TokenAccess(PortalStore("/race"), oauth_url=emu.oauth_url, settle_seconds=0.5)
                            .get(portal.member_id)
                            .access_token,
                        )
                    )
                except Exception as exc:
                    results.append(("error", type(exc).__name__))

            threads = [threading.Thread(target=ask) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            results.append(out.get(timeout=60))
            child.join(30)

            assert [r[0] for r in results] == ["ok"] * 3, results
            final = store.get(portal.member_id)
            assert works_at(final.client_endpoint, final.access_token)
            # The stored refresh token is the live end of the chain.
            answer = OAuthClient(store.app_credentials()).refresh(emu.oauth_url, final.refresh_token)
            assert answer["access_token"]
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
        server.stop()


def works_at(client_endpoint: str, access_token: str) -> bool:
    answer = requests.post(f"{client_endpoint}event.get", json={"auth": access_token}, timeout=5)
    return answer.status_code == 200
