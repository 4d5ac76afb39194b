"""Emulator answers that once differed from the reference (issue 16 item 3 and 4), over real HTTP.

Each test names its source: design §10.9/§10/§15, [docs] or b24pysdk's live-portal expectations.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from b24_cleanup.errors import InvalidGrantError, PermanentError
from b24_cleanup.oauth import OAuthClient
from b24_cleanup.ops.emulator import App, Emulator, Installation, Portal
from b24_cleanup.store import AppCredentials

URL = "https://app.example.com/b24/events"


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(rate_limit=False) as emulator:
        yield emulator


@pytest.fixture
def installed(emu: Emulator) -> tuple[Portal, Installation]:
    app = emu.add_app(scope="crm,user")
    portal = emu.add_portal("ref.bitrix24.test")
    return portal, emu.install(portal, app)


def call(portal: Portal, token: str, method: str, **params: Any) -> requests.Response:
    return requests.post(portal.client_endpoint + method, json={"auth": token, **params}, timeout=5)


# ----------------------------------------------------------------------------- batch sections


def test_batch_numeric_keys_come_back_as_json_lists(installed: tuple[Portal, Installation]) -> None:
    portal, inst = installed
    cmd = {str(i): "event.get" for i in range(3)}
    body = call(portal, inst.access_token, "batch", cmd=cmd).json()["result"]
    assert body["result"] == [[], [], []]  # PHP encodes keys 0..n-1 as a list ([fb24] #44)
    assert isinstance(body["result_time"], list) and len(body["result_time"]) == 3
    assert body["result_error"] == []

    # A gap in the keys (the failed command) makes PHP write an object again.
    cmd = {"0": "event.get", "1": "event.unbind?event=ONX", "2": "event.get"}
    body = call(portal, inst.access_token, "batch", cmd=cmd).json()["result"]
    assert body["result"] == {"0": [], "2": []}
    assert body["result_error"] == {
        "1": {"error": "ERROR_ARGUMENT", "error_description": "Argument 'HANDLER' is null or empty"}
    }

    # A JSON list of commands is keyed 0..n-1 as well; "01" is not an integer key in PHP.
    assert call(portal, inst.access_token, "batch", cmd=["event.get", "event.get"]).json()["result"]["result"] == [
        [],
        [],
    ]
    odd = call(portal, inst.access_token, "batch", cmd={"01": "event.get"}).json()["result"]
    assert odd["result"] == {"01": []}


# ----------------------------------------------------------------------------- event scope


def test_event_bind_refuses_an_event_outside_the_apps_scope(installed: tuple[Portal, Installation]) -> None:
    portal, inst = installed  # scope crm,user
    refused = call(portal, inst.access_token, "event.bind", event="ONTASKADD", handler=URL)
    assert (refused.status_code, refused.json()["error"]) == (400, "ERROR_EVENT_NOT_FOUND")
    assert call(portal, inst.access_token, "event.bind", event="ONCRMLEADADD", handler=URL).ok
    assert call(portal, inst.access_token, "event.bind", event="ONAPPUNINSTALL", handler=URL).ok  # basic
    assert [h["event"] for h in portal.handlers(inst.app)] == ["ONCRMLEADADD", "ONAPPUNINSTALL"]


# ----------------------------------------------------------------------------- operating time


def test_operating_time_is_counted_per_method_and_blocks_over_480_s(installed: tuple[Portal, Installation]) -> None:
    portal, inst = installed
    portal.method_cost["event.get"] = 100.0  # simulated processing seconds per call
    operating = []
    for _ in range(5):
        answer = call(portal, inst.access_token, "event.get")
        assert answer.status_code == 200
        operating.append(answer.json()["time"]["operating"])
    assert [round(x, -1) for x in operating] == [100, 200, 300, 400, 500]

    blocked = call(portal, inst.access_token, "event.get")  # 500 s used > 480 s
    body = blocked.json()
    assert (blocked.status_code, body["error"]) == (429, "OPERATION_TIME_LIMIT")
    reset_at = body["time"]["operating_reset_at"]
    assert time.time() < reset_at <= time.time() + 600
    assert portal.operating(inst.app, "event.get") == pytest.approx(500, abs=1)  # refusals cost nothing
    # Per method: another method of the same app is not blocked.
    assert call(portal, inst.access_token, "event.bind", event="ONCRMLEADADD", handler=URL).ok


def test_a_batch_is_billed_to_batch_as_one_request(installed: tuple[Portal, Installation]) -> None:
    portal, inst = installed
    portal.method_cost["event.get"] = 100.0
    for _ in range(5):
        call(portal, inst.access_token, "event.get")
    assert call(portal, inst.access_token, "event.get").status_code == 429

    # event.get is blocked, but inside a batch it runs: the batch is billed, not event.get.
    batch = call(portal, inst.access_token, "batch", cmd={"a": "event.get", "b": "event.get"}).json()
    assert batch["result"]["result"] == {"a": [], "b": []}
    assert portal.operating(inst.app, "event.get") == pytest.approx(500, abs=1)
    assert batch["time"]["operating"] == pytest.approx(200, abs=1)  # the sub-commands' work, billed to batch
    for _ in range(2):
        assert call(portal, inst.access_token, "batch", cmd={"a": "event.get", "b": "event.get"}).ok
    assert call(portal, inst.access_token, "batch", cmd={"a": "event.get"}).status_code == 429  # 600 > 480


# ----------------------------------------------------------------------------- OAuth answers


def test_the_projects_oauth_client_fails_on_wrong_client_with_http_200(
    emu: Emulator, installed: tuple[Portal, Installation]
) -> None:
    _, inst = installed
    stranger = OAuthClient(AppCredentials("local.unknown.00000000", "whatever"))
    raw = requests.get(
        emu.oauth_url,
        params={
            "grant_type": "refresh_token",
            "client_id": "local.unknown.00000000",
            "client_secret": "whatever",
            "refresh_token": inst.refresh_token,
        },
        timeout=5,
    )
    assert (raw.status_code, raw.json()["error"]) == (200, "wrong_client")
    # Not evidence about the portal (design §5 step 7 lists no wrong_client): permanent, never "gone".
    with pytest.raises(PermanentError) as refused:
        stranger.refresh(emu.oauth_url, inst.refresh_token)
    assert (refused.value.code, refused.value.status) == ("wrong_client", 200)

    wrong_secret = OAuthClient(AppCredentials(inst.app.client_id, "not-the-secret"))
    with pytest.raises(InvalidGrantError) as caught:
        wrong_secret.refresh(emu.oauth_url, inst.refresh_token)
    assert (caught.value.code, caught.value.status) == ("invalid_client", 400)
    # Neither refusal spent the token.
    good = OAuthClient(AppCredentials(inst.app.client_id, inst.app.client_secret))
    assert good.refresh(emu.oauth_url, inst.refresh_token)["member_id"] == inst.member_id


# ----------------------------------------------------------------------------- auth_connector in batch


def _offline_rows(portal: Portal, app: App) -> list[str]:
    return sorted(h["connector_id"] for h in portal.handlers(app) if h["offline"] == 1)


def test_batch_sub_commands_inherit_the_batch_auth_connector_and_ignore_their_own(
    installed: tuple[Portal, Installation],
) -> None:
    portal, inst = installed
    for connector in ("", "sync", "other"):
        portal.bind(inst.app, "ONCRMDEALUPDATE", offline=True, connector_id=connector)
    unbind = "event.unbind?event=ONCRMDEALUPDATE&event_type=offline"

    # A per-command auth_connector is not read: the row WITHOUT a connector goes (design §10.15).
    body = call(portal, inst.access_token, "batch", cmd={"u": unbind + "&auth_connector=sync"}).json()
    assert body["result"]["result"] == {"u": {"count": 1}}
    assert _offline_rows(portal, inst.app) == ["other", "sync"]

    # A batch-level auth_connector applies to every sub-command.
    body = call(portal, inst.access_token, "batch", cmd={"u": unbind}, auth_connector="sync").json()
    assert body["result"]["result"] == {"u": {"count": 1}}
    assert _offline_rows(portal, inst.app) == ["other"]

    # A single call reads it top-level.
    assert call(
        portal, inst.access_token, "event.unbind", event="ONCRMDEALUPDATE", event_type="offline", auth_connector="other"
    ).json()["result"] == {"count": 1}
    assert _offline_rows(portal, inst.app) == []
