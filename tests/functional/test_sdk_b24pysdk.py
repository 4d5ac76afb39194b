"""The emulator driven by a client nobody here wrote: the official b24pysdk 1.3.2 (issue 16 item 2).

The SDK talks to the emulator as an app talks to a portal: https (the emulator's certificate, made
at start, trusted through REQUESTS_CA_BUNDLE), each portal at its own host on port 443 so that the
SDK's domain handling (a 302's host becomes the new domain, no port) works unchanged. The only
thing pointed elsewhere is the SDK's hard-coded OAuth URL (design §10.13), aimed at the
emulator's OAuth server; every request still goes over the real wire. Each test is one check of
the table in the issue's note; it asserts what the SDK sees against what the reference says.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from b24_cleanup.ops.emulator import App, Emulator, Installation, Portal

b24pysdk = pytest.importorskip("b24pysdk")
from b24pysdk import BitrixApp, BitrixToken, Config  # noqa: E402
from b24pysdk import errors as sdk_errors  # noqa: E402
from b24pysdk.api.requesters.bitrix_oauth_requester import BitrixOAuthRequester  # noqa: E402
from b24pysdk.errors import oauth as sdk_oauth_errors  # noqa: E402

URL = "https://app.example.com/b24/events"


def _emulator_on_443() -> Emulator:
    """A TLS emulator on port 443 of a random 127.x.y.0/24 block (parallel runs do not collide)."""
    last: OSError | None = None
    for _ in range(5):
        host = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.1"
        try:
            return Emulator(tls=True, port=443, host=host, rate_limit=False)
        except OSError as exc:  # no privilege for 443, or the block is taken
            last = exc
    pytest.skip(f"cannot bind loopback port 443 for the SDK's domain handling: {last}")


@dataclass
class World:
    emu: Emulator
    app: App
    portal: Portal
    inst: Installation

    def token(self, inst: Installation | None = None, *, app: App | None = None) -> BitrixToken:
        inst = inst or self.inst
        app = app or self.app
        return BitrixToken(
            domain=self.portal.host,
            auth_token=inst.access_token,
            refresh_token=inst.refresh_token,
            expires=dt.datetime.fromtimestamp(inst.expires, dt.UTC),
            bitrix_app=BitrixApp(client_id=app.client_id, client_secret=app.client_secret),
        )


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    emu = _emulator_on_443().start()
    assert emu.ca_file is not None
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", emu.ca_file)
    monkeypatch.setattr(BitrixOAuthRequester, "_OAUTH_TOKEN_URL", emu.oauth_url)
    config = Config()
    saved = (config.default_max_retries, config.default_initial_retry_delay, config.default_retry_delay_increment)
    config.configure(default_max_retries=1, default_initial_retry_delay=0.1, default_retry_delay_increment=0.1)
    try:
        app = emu.add_app(scope="crm,user")
        portal = emu.add_portal("sdk.bitrix24.test")
        yield World(emu, app, portal, emu.install(portal, app))
    finally:
        config.configure(
            default_max_retries=saved[0], default_initial_retry_delay=saved[1], default_retry_delay_increment=saved[2]
        )
        emu.stop()


def test_refresh_twice_and_the_spent_token_is_refused(world: World) -> None:
    token = world.token()
    first_refresh = token.refresh_token
    token.refresh_and_set_oauth_token()
    second_refresh = token.refresh_token
    token.refresh_and_set_oauth_token()
    assert len({first_refresh, second_refresh, token.refresh_token}) == 3
    assert token.get_client().event.get().result == []  # the newest access token works
    spent = world.token()  # the install's pair again: its refresh token was used once already
    with pytest.raises(sdk_oauth_errors.BitrixOAuthInvalidGrant):
        spent.refresh_oauth_token()


def test_event_bind_get_unbind_with_every_documented_parameter(world: World) -> None:
    client = world.token().get_client()
    assert client.event.bind("ONCRMLEADADD", URL).result is True
    assert client.event.bind("ONCRMLEADADD", URL, auth_type=2).result is True
    assert client.event.bind("ONCRMDEALUPDATE", event_type="offline").result is True
    assert client.event.bind("ONCRMDEALUPDATE", event_type="offline", auth_connector="erp").result is True
    assert client.event.bind("ONCRMLEADUPDATE", URL, options={"minTimeout": 5}).result is True
    assert client.event.get().result == [
        {"event": "ONCRMLEADADD", "handler": URL, "auth_type": "0", "offline": 0},
        {"event": "ONCRMLEADADD", "handler": URL, "auth_type": "2", "offline": 0},
        {"event": "ONCRMDEALUPDATE", "connector_id": "", "offline": 1},
        {"event": "ONCRMDEALUPDATE", "connector_id": "erp", "offline": 1},
        {"event": "ONCRMLEADUPDATE", "handler": URL, "auth_type": "0", "offline": 0},
    ]
    # event.unbind: event, handler, auth_type, event_type; auth_connector through call_method (the
    # SDK's unbind has no such parameter, design §10.13).
    assert client.event.unbind("ONCRMLEADADD", URL, auth_type=2, event_type="online").result == {"count": 1}
    assert client.event.unbind("oncrmleadadd", URL).result == {"count": 1}  # case-insensitive, admin: all users
    assert client.event.unbind("ONCRMDEALUPDATE", event_type="offline").result == {"count": 1}  # the row without a key
    token = world.token()
    raw = token.call_method(
        "event.unbind", {"event": "ONCRMDEALUPDATE", "event_type": "offline", "auth_connector": "erp"}
    )
    assert raw["result"] == {"count": 1}
    assert client.event.unbind("ONCRMLEADUPDATE", URL).result == {"count": 1}
    assert client.event.unbind("ONCRMLEADUPDATE", URL).result == {"count": 0}  # idempotent
    assert client.event.get().result == []


def test_event_outside_the_apps_scope_is_refused(world: World) -> None:
    with pytest.raises(sdk_errors.BitrixAPIError) as caught:
        world.token().get_client().event.bind("ONTASKADD", URL).result  # noqa: B018 - the request runs lazily
    assert caught.value.error == "ERROR_EVENT_NOT_FOUND"


def test_batch_of_fifty(world: World) -> None:
    token = world.token()
    world.portal.bind(world.app, "ONCRMLEADADD", URL)
    answer = token.call_batch({f"k{i}": ("event.get", {}) for i in range(50)})
    results = answer["result"]["result"]
    assert len(results) == 50 and all(len(v) == 1 for v in results.values())
    assert answer["result"]["result_error"] == []  # PHP's empty array
    assert len(world.emu.requests_log(kind="rest", method="batch")) == 1
    with pytest.raises(ValueError, match="Maximum batch size is 50"):  # the SDK refuses 51 itself
        token.call_batch({f"k{i}": ("event.get", {}) for i in range(51)})


def test_rate_limit_is_503_query_limit_exceeded(world: World) -> None:
    world.emu.rate_limit = True
    world.portal.burst, world.portal.rate = 3, 0.5
    client = world.token().get_client()
    for _ in range(3):
        client.event.get().result  # noqa: B018
    with pytest.raises(sdk_errors.BitrixAPIQueryLimitExceeded):
        client.event.get().result  # noqa: B018


def test_expired_token_is_refreshed_by_the_sdk_and_the_call_retried(world: World) -> None:
    token = world.token()
    token.expires = None  # the SDK must learn it from the portal's 401 expired_token
    world.portal.expire_tokens(world.app)
    before = token.auth_token
    assert token.get_client().event.get().result == []
    assert token.auth_token != before
    assert [e.method for e in world.emu.requests_log(kind="oauth")] == ["refresh_token"]
    assert [e.error for e in world.emu.requests_log(kind="rest")] == ["expired_token", None]


def test_unknown_token_is_invalid_token(world: World) -> None:
    token = world.token()
    token.auth_token = "0" * 64
    with pytest.raises(sdk_errors.BitrixAPIInvalidToken):
        token.get_client().event.get().result  # noqa: B018


def test_uninstalled_app(world: World) -> None:
    token = world.token()
    world.emu.uninstall(world.portal, world.app)
    with pytest.raises(sdk_errors.BitrixAPIApplicationNotFound):
        token.get_client().event.get().result  # noqa: B018
    with pytest.raises(sdk_oauth_errors.BitrixOAuthInvalidGrant):
        token.refresh_oauth_token()


def test_renamed_portal_the_sdk_follows_to_the_new_host(world: World) -> None:
    token = world.token()
    old_host = world.portal.host
    world.portal.rename("renamed.bitrix24.test")
    assert token.get_client().event.bind("ONCRMLEADADD", URL).result is True
    assert token.domain == world.portal.host != old_host
    assert world.portal.handlers(world.app) == [
        {"event": "ONCRMLEADADD", "handler": URL, "auth_type": "0", "offline": 0}
    ]
    first, second = world.emu.requests_log(kind="rest")
    assert (first.host, first.status, second.host, second.status) == (old_host, 302, world.portal.host, 200)


def test_unknown_client_id_is_wrong_client_with_http_200(world: World) -> None:
    stranger = App("local.unknown.00000000", "whatever")
    with pytest.raises(sdk_oauth_errors.BitrixOauthWrongClient):
        world.token(app=stranger).refresh_oauth_token()
    wrong_secret = App(world.app.client_id, "not-the-secret")
    with pytest.raises(sdk_oauth_errors.BitrixOAuthInvalidClient):
        world.token(app=wrong_secret).refresh_oauth_token()


def test_operation_time_limit_and_deleted_portal(world: World) -> None:
    client = world.token().get_client()
    world.portal.method_cost["event.get"] = 500.0
    client.event.get().result  # noqa: B018
    with pytest.raises(sdk_errors.BitrixAPIOperationTimeLimit):
        client.event.get().result  # noqa: B018
    world.portal.deleted = True
    with pytest.raises(sdk_errors.BitrixAPIPortalDeleted):
        client.event.bind("ONCRMLEADADD", URL).result  # noqa: B018
