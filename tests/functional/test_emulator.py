"""The Bitrix24 emulator on its own, over real HTTP (design §10.2-§5, §7-§11)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
import requests

from b24_cleanup.ops.emulator import App, Emulator, Installation, Portal, TokenPair, serve_forever
from b24_cleanup.ops.emulator.phpform import flatten, parse_pairs, parse_query

URL = "https://app.example.com/b24/events"
OLD = "https://old.example.com/b24/events"


# ----------------------------------------------------------------------------------- helpers


def rest(portal_or_endpoint: Portal | str, method: str, token: str | None, **params: Any) -> requests.Response:
    endpoint = portal_or_endpoint if isinstance(portal_or_endpoint, str) else portal_or_endpoint.client_endpoint
    body = dict(params)
    if token is not None:
        body["auth"] = token
    return requests.post(endpoint + method, json=body, timeout=5, allow_redirects=False)


def ok(response: requests.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["result"]


def err(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    body = response.json()
    assert (response.status_code, body.get("error")) == (status, code), response.text
    assert set(body) == {"error", "error_description"}
    return body


def refresh(emu: Emulator, app: App, refresh_token: str, *, secret: str | None = None) -> requests.Response:
    query = {
        "grant_type": "refresh_token",
        "client_id": app.client_id,
        "client_secret": app.client_secret if secret is None else secret,
        "refresh_token": refresh_token,
    }
    return requests.get(emu.oauth_url, params=query, timeout=5)


@dataclass
class World:
    emu: Emulator
    app: App
    portal: Portal
    admin: Installation
    user: TokenPair  # user 2, not an admin


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(rate_limit=False) as emulator:
        yield emulator


@pytest.fixture
def world(emu: Emulator) -> World:
    app = emu.add_app()
    portal = emu.add_portal("acme.bitrix24.test")
    admin = emu.install(portal, app)
    return World(emu, app, portal, admin, emu.issue_tokens(portal, app, 2))


@dataclass
class Receiver:
    url: str
    posts: list[dict[str, Any]] = field(default_factory=list)
    on_post: Any = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A tiny app backend that records the event POSTs it receives."""
    box = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            post = {"path": self.path, "ctype": self.headers.get("Content-Type"), "pairs": parse_qsl(raw)}
            if box.on_post:
                post["seen"] = box.on_post()
            box.posts.append(post)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    box.url = f"http://127.0.0.1:{server.server_port}/b24/"
    yield box
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------------- event.get


def test_event_get_shapes_admin_sees_all_users_non_admin_only_his(world: World, emu: Emulator) -> None:
    other = emu.add_app()
    emu.install(world.portal, other)
    world.portal.bind(world.app, "ONCRMLEADADD", URL)
    world.portal.bind(world.app, "ONCRMLEADADD", URL, user_id=2)
    world.portal.bind(world.app, "ONCRMDEALUPDATE", offline=True)
    world.portal.bind(other, "ONCRMLEADADD", URL)  # another app's row: never listed

    admin = ok(rest(world.portal, "event.get", world.admin.access_token))
    mine = ok(rest(world.portal, "event.get", world.user.access_token))

    assert admin == [
        {"event": "ONCRMLEADADD", "handler": URL, "auth_type": "0", "offline": 0},
        {"event": "ONCRMLEADADD", "handler": URL, "auth_type": "2", "offline": 0},
        {"event": "ONCRMDEALUPDATE", "connector_id": "", "offline": 1},
    ]
    assert mine == [{"event": "ONCRMLEADADD", "handler": URL, "auth_type": "2", "offline": 0}]
    assert world.portal.handlers(world.app) == admin


def test_event_get_empty_is_a_json_list_and_success_has_time(world: World) -> None:
    response = rest(world.portal, "event.get.json", world.admin.access_token)
    body = response.json()
    assert body["result"] == []
    assert set(body["time"]) == {
        "start",
        "finish",
        "duration",
        "processing",
        "date_start",
        "date_finish",
        "operating",
        "operating_reset_at",
    }


# ----------------------------------------------------------------------------------- event.bind


@pytest.mark.parametrize(
    ("who", "params", "status", "code"),
    [
        ("admin", {"handler": URL}, 400, "ERROR_ARGUMENT"),
        ("admin", {"event": "ONCRMLEADADD"}, 400, "ERROR_ARGUMENT"),
        ("admin", {"event": "ONCRMLEADADD", "handler": "https://localhost/h"}, 400, "ERROR_WRONG_HANDLER_URL"),
        ("admin", {"event": "ONCRMLEADADD", "handler": "not a url"}, 400, "ERROR_WRONG_HANDLER_URL"),
        ("admin", {"event": "ONCRMLEADADD", "handler": "ftp://files.example.com/h"}, 400, "ERROR_UNSUPPORTED_PROTOCOL"),
        ("admin", {"event": "ONCRMLEADADD", "handler": URL, "event_type": "sometimes"}, 400, "ERROR_ARGUMENT"),
        ("admin", {"event": "NOSUCHEVENT", "handler": URL}, 400, "ERROR_EVENT_NOT_FOUND"),
        ("admin", {"event": "ONOFFLINEEVENT", "event_type": "offline"}, 400, "ERROR_ARGUMENT"),
        ("user", {"event": "ONCRMLEADADD", "event_type": "offline"}, 403, "ACCESS_DENIED"),
        ("user", {"event": "ONCRMLEADADD", "handler": URL, "auth_type": 1}, 403, "ACCESS_DENIED"),
    ],
)
def test_event_bind_errors(world: World, who: str, params: dict[str, Any], status: int, code: str) -> None:
    token = world.admin.access_token if who == "admin" else world.user.access_token
    err(rest(world.portal, "event.bind", token, **params), status, code)
    assert world.portal.handlers(world.app) == []


def test_event_bind_stores_user_and_refuses_duplicates(world: World) -> None:
    admin, user = world.admin.access_token, world.user.access_token
    assert ok(rest(world.portal, "event.bind", admin, EVENT="onCrmLeadAdd", HANDLER=URL)) is True
    ok(rest(world.portal, "event.bind", user, event="ONCRMLEADADD", handler=URL))  # no auth_type: his own id
    ok(rest(world.portal, "event.bind", user, event="ONCRMDEALADD", handler=URL, auth_type="2"))
    ok(rest(world.portal, "event.bind", admin, event="ONCRMDEALADD", handler=URL, auth_type=1))
    ok(rest(world.portal, "event.bind", admin, event="ONCRMDEALUPDATE", event_type="offline", handler=URL))

    err(rest(world.portal, "event.bind", admin, event="ONCRMLEADADD", handler=URL), 400, "ERROR_CORE")
    assert [(h["event"], h.get("auth_type"), h["offline"]) for h in world.portal.handlers(world.app)] == [
        ("ONCRMLEADADD", "0", 0),
        ("ONCRMLEADADD", "2", 0),
        ("ONCRMDEALADD", "2", 0),
        ("ONCRMDEALADD", "1", 0),
        ("ONCRMDEALUPDATE", None, 1),  # offline: the handler URL is ignored
    ]


def test_auth_connector_needs_the_licence(world: World) -> None:
    admin = world.admin.access_token
    world.portal.license_auth_connector = False
    params = {"event": "ONCRMDEALUPDATE", "event_type": "offline", "auth_connector": "sync"}
    err(rest(world.portal, "event.bind", admin, **params), 403, "WRONG_LICENSE")
    world.portal.license_auth_connector = True
    ok(rest(world.portal, "event.bind", admin, **params))
    assert world.portal.handlers(world.app) == [{"event": "ONCRMDEALUPDATE", "connector_id": "sync", "offline": 1}]


# ----------------------------------------------------------------------------------- event.unbind


def _seed_pairs(world: World) -> None:
    for user in (0, 1, 2):
        world.portal.bind(world.app, "ONCRMLEADADD", URL, user_id=user)
    world.portal.bind(world.app, "ONCRMLEADADD", OLD, user_id=2)


def _users_left(world: World, handler: str = URL) -> list[str]:
    return [h["auth_type"] for h in world.portal.handlers(world.app) if h.get("handler") == handler]


def test_unbind_admin_without_auth_type_removes_every_users_row(world: World) -> None:
    _seed_pairs(world)
    result = ok(rest(world.portal, "event.unbind", world.admin.access_token, event="oncrmleadadd", handler=URL))
    assert result == {"count": 3}
    assert _users_left(world) == []
    assert _users_left(world, OLD) == ["2"]


def test_unbind_non_admin_without_auth_type_removes_only_his_rows(world: World) -> None:
    _seed_pairs(world)
    result = ok(rest(world.portal, "event.unbind", world.user.access_token, event="ONCRMLEADADD", handler=URL))
    assert result == {"count": 1}
    assert _users_left(world) == ["0", "1"]


def test_unbind_admin_with_auth_type_int_or_numeric_string(world: World) -> None:
    _seed_pairs(world)
    admin = world.admin.access_token
    assert ok(rest(world.portal, "event.unbind", admin, event="ONCRMLEADADD", handler=URL, auth_type=2)) == {"count": 1}
    assert ok(rest(world.portal, "event.unbind", admin, event="ONCRMLEADADD", handler=URL, auth_type="0")) == {
        "count": 1
    }
    assert _users_left(world) == ["1"]


def test_unbind_non_admin_auth_type_must_be_his_id_as_integer(world: World) -> None:
    _seed_pairs(world)
    user = world.user.access_token
    for bad in ("2", 0, 1):
        err(
            rest(world.portal, "event.unbind", user, event="ONCRMLEADADD", handler=URL, auth_type=bad),
            403,
            "ACCESS_DENIED",
        )
    assert _users_left(world) == ["0", "1", "2"]
    assert ok(rest(world.portal, "event.unbind", user, event="ONCRMLEADADD", handler=URL, auth_type=2)) == {"count": 1}


def test_unbind_argument_errors_exact_match_and_idempotence(world: World) -> None:
    _seed_pairs(world)
    admin = world.admin.access_token
    err(rest(world.portal, "event.unbind", admin, handler=URL), 400, "ERROR_ARGUMENT")
    err(rest(world.portal, "event.unbind", admin, event="ONCRMLEADADD"), 400, "ERROR_ARGUMENT")
    assert ok(rest(world.portal, "event.unbind", admin, event="ONCRMLEADADD", handler=URL + "/")) == {"count": 0}
    assert ok(rest(world.portal, "event.unbind", admin, event="ONCRMLEADADD", handler=URL)) == {"count": 3}
    assert ok(rest(world.portal, "event.unbind", admin, event="ONCRMLEADADD", handler=URL)) == {"count": 0}


def test_unbind_offline_admin_only_and_by_connector(world: World) -> None:
    world.portal.bind(world.app, "ONCRMDEALUPDATE", offline=True)
    world.portal.bind(world.app, "ONCRMDEALUPDATE", offline=True, connector_id="sync")
    world.portal.bind(world.app, "ONCRMDEALUPDATE", URL)
    admin = world.admin.access_token
    offline = {"event": "ONCRMDEALUPDATE", "event_type": "offline"}

    err(rest(world.portal, "event.unbind", world.user.access_token, **offline), 403, "ACCESS_DENIED")
    world.portal.license_auth_connector = False
    err(rest(world.portal, "event.unbind", admin, **offline, auth_connector="sync"), 403, "WRONG_LICENSE")
    world.portal.license_auth_connector = True
    assert len(world.portal.handlers(world.app)) == 3

    assert ok(rest(world.portal, "event.unbind", admin, **offline)) == {"count": 1}
    assert ok(rest(world.portal, "event.unbind", admin, **offline, auth_connector="sync")) == {"count": 1}
    assert world.portal.handlers(world.app) == [
        {"event": "ONCRMDEALUPDATE", "handler": URL, "auth_type": "0", "offline": 0}
    ]


def test_unbind_leaves_other_apps_rows(world: World, emu: Emulator) -> None:
    other = emu.add_app()
    emu.install(world.portal, other)
    world.portal.bind(other, "ONCRMLEADADD", URL)
    world.portal.bind(world.app, "ONCRMLEADADD", URL)
    ok(rest(world.portal, "event.unbind", world.admin.access_token, event="ONCRMLEADADD", handler=URL))
    assert world.portal.handlers(world.app) == []
    assert len(world.portal.handlers(other)) == 1


# ----------------------------------------------------------------------------------- batch


def _unbind_cmd(handler: str, **extra: Any) -> str:
    return "event.unbind?" + urlencode({"event": "ONCRMLEADADD", "handler": handler, **extra})


def test_batch_empty_sections_are_json_lists(world: World) -> None:
    world.portal.bind(world.app, "ONCRMLEADADD", URL)
    admin = world.admin.access_token
    good = ok(rest(world.portal, "batch", admin, halt=0, cmd={"u1": _unbind_cmd(URL), "g": "event.get"}))
    assert good["result"] == {"u1": {"count": 1}, "g": []}
    assert good["result_error"] == []
    assert good["result_total"] == []
    assert good["result_next"] == []
    assert set(good["result_time"]) == {"u1", "g"}

    bad = ok(rest(world.portal, "batch", admin, halt=0, cmd={"x": "event.unbind?handler=" + URL}))
    assert bad["result"] == []
    assert bad["result_time"] == []
    assert bad["result_error"]["x"]["error"] == "ERROR_ARGUMENT"

    assert ok(rest(world.portal, "batch", admin, halt=0, cmd={}))["result"] == []


def test_batch_over_fifty_fails_the_extras_and_runs_fifty(world: World) -> None:
    handlers = [f"https://app.example.com/h{i}" for i in range(52)]
    for h in handlers:
        world.portal.bind(world.app, "ONCRMLEADADD", h)
    cmd = {f"c{i}": _unbind_cmd(h) for i, h in enumerate(handlers)}
    result = ok(rest(world.portal, "batch", world.admin.access_token, halt=0, cmd=cmd))
    assert len(result["result"]) == 50
    assert result["result_error"] == {
        key: {"error": "ERROR_BATCH_LENGTH_EXCEEDED", "error_description": "Max batch length exceeded"}
        for key in ("c50", "c51")
    }
    assert [h["handler"] for h in world.portal.handlers(world.app)] == handlers[50:]


def test_batch_nested_batch_is_refused_inside_a_200(world: World) -> None:
    response = rest(world.portal, "batch", world.admin.access_token, cmd={"inner": "batch?cmd[a]=event.get"})
    assert response.status_code == 200
    assert response.json()["result"]["result_error"]["inner"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"


def test_batch_halt_stops_at_the_first_error(world: World) -> None:
    world.portal.bind(world.app, "ONCRMLEADADD", URL)
    world.portal.bind(world.app, "ONCRMLEADADD", OLD)
    cmd = {"a": _unbind_cmd(URL), "b": "event.unbind?event=ONCRMLEADADD", "c": _unbind_cmd(OLD)}
    halted = ok(rest(world.portal, "batch", world.admin.access_token, halt=1, cmd=cmd))
    assert set(halted["result"]) == {"a"}
    assert set(halted["result_error"]) == {"b"}
    assert _users_left(world, OLD) == ["0"]  # `c` never ran

    world.portal.bind(world.app, "ONCRMLEADADD", URL)
    full = ok(rest(world.portal, "batch", world.admin.access_token, halt=0, cmd=cmd))
    assert set(full["result"]) == {"a", "c"}
    assert set(full["result_error"]) == {"b"}


def test_batch_params_are_strings_so_non_admin_auth_type_is_refused(world: World) -> None:
    _seed_pairs(world)
    cmd = {"typed": _unbind_cmd(URL, auth_type=2), "omitted": _unbind_cmd(URL)}
    result = ok(rest(world.portal, "batch", world.user.access_token, halt=0, cmd=cmd))
    assert result["result_error"]["typed"]["error"] == "ACCESS_DENIED"
    assert result["result"]["omitted"] == {"count": 1}
    assert _users_left(world) == ["0", "1"]


def test_refused_batch_answers_method_not_found(world: World) -> None:
    world.portal.refuse_batch = True
    err(rest(world.portal, "batch", world.admin.access_token, cmd={"g": "event.get"}), 404, "ERROR_METHOD_NOT_FOUND")
    assert ok(rest(world.portal, "event.get", world.admin.access_token)) == []


# ----------------------------------------------------------------------------------- rate limit


def test_leaky_bucket_rejects_above_burst_without_counting_and_drains() -> None:
    with Emulator(rate=2.0, burst=5) as emu:
        app = emu.add_app()
        portal, calm = emu.add_portal("busy.bitrix24.test"), emu.add_portal("calm.bitrix24.test")
        token = emu.install(portal, app).access_token
        calm_token = emu.install(calm, app).access_token
        for _ in range(5):
            ok(rest(portal, "event.get", token))
        rejected = rest(portal, "event.bind", token, event="ONCRMLEADADD", handler=URL)
        err(rejected, 503, "QUERY_LIMIT_EXCEEDED")
        assert portal.handlers(app) == []  # a rejected request is not executed
        for _ in range(20):  # rejected requests do not raise the level
            assert rest(portal, "event.get", token).status_code == 503
        ok(rest(calm, "event.get", calm_token))  # buckets are per portal

        time.sleep(1.1)  # 2.2 units drained (less than 3 even on a slow machine)
        ok(rest(portal, "event.get", token))
        ok(rest(portal, "batch", token, cmd={f"k{i}": "event.get" for i in range(10)}))  # one unit
        err(rest(portal, "event.get", token), 503, "QUERY_LIMIT_EXCEEDED")
        assert len(emu.requests_log(member_id=portal.member_id, kind="rest")) == 29
        assert sum(e.status == 503 for e in emu.requests_log(member_id=portal.member_id)) == 22

        emu.rate_limit = False
        for _ in range(10):
            ok(rest(portal, "event.get", token))


# ----------------------------------------------------------------------------------- OAuth


def test_refresh_rotates_and_spends_the_old_pair(world: World, emu: Emulator) -> None:
    old = world.admin.tokens
    response = refresh(emu, world.app, old.refresh_token)
    body = response.json()
    assert response.status_code == 200
    assert set(body) == {
        "access_token",
        "client_endpoint",
        "domain",
        "expires",
        "expires_in",
        "member_id",
        "refresh_token",
        "scope",
        "server_endpoint",
        "status",
        "user_id",
    }
    assert body["member_id"] == world.portal.member_id
    assert body["user_id"] == 1
    assert body["client_endpoint"] == world.portal.client_endpoint
    assert body["server_endpoint"] == emu.server_endpoint
    assert body["domain"] == emu.base_url.split("//")[1]
    assert body["expires_in"] == 3600
    assert abs(body["expires"] - time.time() - 3600) < 5
    assert {body["access_token"], body["refresh_token"]}.isdisjoint({old.access_token, old.refresh_token})

    err(refresh(emu, world.app, old.refresh_token), 400, "invalid_grant")
    err(rest(world.portal, "event.get", old.access_token), 401, "expired_token")
    assert ok(rest(world.portal, "event.get", body["access_token"])) == []
    assert emu.record_for(world.admin, latest=True)["refresh_token"] == body["refresh_token"]


def test_refresh_client_errors(world: World, emu: Emulator) -> None:
    token = world.admin.refresh_token
    err(refresh(emu, world.app, token, secret="wrong"), 400, "invalid_client")
    unknown = App("local.nobody.1", "nope")
    err(refresh(emu, unknown, token), 200, "wrong_client")  # HTTP 200 (design §10.15)
    err(refresh(emu, world.app, ""), 400, "invalid_request")
    err(refresh(emu, world.app, "f" * 64), 400, "invalid_grant")
    assert requests.post(emu.oauth_url, data={"grant_type": "refresh_token"}, timeout=5).status_code == 405
    assert refresh(emu, world.app, token).status_code == 200  # none of the above spent it


def test_refresh_token_of_another_app_is_wrong_client_with_200(world: World, emu: Emulator) -> None:
    other = emu.add_app()
    theirs = emu.install(world.portal, other)
    err(refresh(emu, world.app, theirs.refresh_token), 200, "wrong_client")
    assert refresh(emu, other, theirs.refresh_token).status_code == 200  # not spent by the refusal


def test_uninstall_removes_rows_revokes_tokens_and_refresh(world: World, emu: Emulator) -> None:
    world.portal.bind(world.app, "ONCRMLEADADD", URL)
    emu.uninstall(world.portal, world.app)

    assert world.portal.handlers(world.app) == []
    assert not world.portal.is_installed(world.app)
    err(rest(world.portal, "event.get", world.admin.access_token), 401, "APPLICATION_NOT_FOUND")
    err(rest(world.portal, "event.get", world.user.access_token), 401, "APPLICATION_NOT_FOUND")
    err(refresh(emu, world.app, world.admin.refresh_token), 400, "invalid_grant")

    again = emu.install(world.portal, world.app)  # a reinstall: old tokens stay dead
    assert again.application_token != world.admin.application_token
    err(rest(world.portal, "event.get", world.admin.access_token), 401, "invalid_token")
    err(refresh(emu, world.app, world.user.refresh_token), 400, "invalid_grant")
    assert ok(rest(world.portal, "event.get", again.access_token)) == []


def test_uninstalled_refresh_error_is_configurable() -> None:
    with Emulator(rate_limit=False, uninstalled_refresh_error="NOT_INSTALLED") as emu:
        app, portal = emu.add_app(), emu.add_portal("x.bitrix24.test")
        inst = emu.install(portal, app)
        emu.uninstall(portal, app)
        err(refresh(emu, app, inst.refresh_token), 401, "NOT_INSTALLED")


def test_token_checks(world: World, emu: Emulator) -> None:
    # NO_AUTH_FOUND only when no token came at all; a token the portal never issued is
    # invalid_token (design §10.15, b24pysdk's live-portal tests).
    err(rest(world.portal, "event.get", None), 401, "NO_AUTH_FOUND")
    err(rest(world.portal, "event.get", ""), 401, "NO_AUTH_FOUND")
    secret_looking = "deadbeef" * 8
    refused = err(rest(world.portal, "event.get", secret_looking), 401, "invalid_token")
    assert refused["error_description"] == "Unable to get application by token"
    assert secret_looking not in str(refused)
    elsewhere = emu.add_portal("elsewhere.bitrix24.test")
    err(rest(elsewhere, "event.get", world.admin.access_token), 401, "invalid_token")

    stale = emu.issue_tokens(world.portal, world.app, 1, expires_in=-1)
    err(rest(world.portal, "event.get", stale.access_token), 401, "expired_token")
    world.portal.expire_tokens(world.app)
    err(rest(world.portal, "event.get", world.admin.access_token), 401, "expired_token")
    fresh = refresh(emu, world.app, world.admin.refresh_token).json()
    assert ok(rest(world.portal, "event.get", fresh["access_token"])) == []

    user = emu.issue_tokens(world.portal, world.app, 2)
    del world.portal.users[2]  # a deactivated user
    err(rest(world.portal, "event.get", user.access_token), 401, "authorization_error")


def test_other_ways_to_pass_the_token(world: World) -> None:
    token = world.admin.access_token
    endpoint = world.portal.client_endpoint
    form = requests.post(
        endpoint + "event.bind", data={"auth": token, "event": "ONCRMLEADADD", "handler": URL}, timeout=5
    )
    assert form.json()["result"] is True
    assert requests.get(endpoint + "event.get.json", params={"auth": token}, timeout=5).json()["result"]
    bearer = requests.post(endpoint + "EVENT.GET", json={}, headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert len(bearer.json()["result"]) == 1
    bad = requests.post(
        endpoint + "event.get", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=5
    )
    err(bad, 400, "INVALID_REQUEST")


def test_unknown_method_portal_and_deleted_portal(world: World, emu: Emulator) -> None:
    err(rest(world.portal, "crm.lead.list", world.admin.access_token), 404, "ERROR_METHOD_NOT_FOUND")
    # No path segment names a portal: the OAuth server's host serves no portal's REST.
    path_style = requests.post(f"{emu.base_url}/{world.portal.name}/rest/event.get", json={}, timeout=5)
    assert path_style.status_code == 404
    # An address no portal was given: nothing listens there.
    with pytest.raises(requests.ConnectionError):
        requests.post(f"http://127.0.0.254:{emu.port}/rest/event.get", json={}, timeout=5)
    world.portal.deleted = True
    # [docs] _includes/system-errors.md (newer revision): 403 "Portal was deleted".
    body = err(rest(world.portal, "event.get", world.admin.access_token), 403, "PORTAL_DELETED")
    assert body["error_description"] == "Portal was deleted"


# ----------------------------------------------------------------------------------- rename


def test_renamed_portal_redirects_without_executing(world: World, emu: Emulator) -> None:
    old_endpoint, old_host = world.portal.client_endpoint, world.portal.host
    world.portal.rename("renamed.bitrix24.test")
    token = world.admin.access_token
    new_host = world.portal.host
    assert new_host != old_host  # a rename moves the portal to another host, as a real one does
    assert world.portal.client_endpoint == f"http://{new_host}:{emu.port}/rest/"

    moved = rest(old_endpoint, "event.bind.json", token, event="ONCRMLEADADD", handler=URL)
    assert moved.status_code == 302
    assert moved.headers["Location"] == f"http://{new_host}:{emu.port}/rest/event.bind.json"
    assert world.portal.handlers(world.app) == []
    ok(rest(moved.headers["Location"].removesuffix("event.bind.json"), "event.bind", token, event="ONX", handler=URL))

    fresh = refresh(emu, world.app, world.admin.refresh_token).json()
    assert fresh["client_endpoint"] == world.portal.client_endpoint
    assert emu.record_for(world.admin)["domain"] == new_host == world.portal.domain
    assert emu.portal(old_host) is emu.portal("renamed.bitrix24.test") is world.portal


# ----------------------------------------------------------------------------------- faults


def test_fail_next_fails_matching_requests_without_executing(world: World) -> None:
    world.portal.bind(world.app, "ONCRMLEADADD", URL)
    admin = world.admin.access_token
    world.portal.fail_next(2, methods={"event.unbind"})
    assert len(ok(rest(world.portal, "event.get", admin))) == 1  # not a matching method
    for _ in range(2):
        err(rest(world.portal, "event.unbind", admin, event="ONCRMLEADADD", handler=URL), 500, "INTERNAL_SERVER_ERROR")
    assert len(world.portal.handlers(world.app)) == 1
    assert ok(rest(world.portal, "event.unbind", admin, event="ONCRMLEADADD", handler=URL)) == {"count": 1}

    world.portal.fail_next(1, "QUERY_LIMIT_EXCEEDED")  # the documented status by default
    err(rest(world.portal, "event.get", admin), 503, "QUERY_LIMIT_EXCEEDED")


def test_fail_command_inside_batch_and_single(world: World) -> None:
    world.portal.bind(world.app, "ONCRMLEADADD", URL)
    world.portal.bind(world.app, "ONCRMLEADADD", OLD)
    admin = world.admin.access_token
    seen: list[tuple[str, dict[str, Any]]] = []

    def match(method: str, params: dict[str, Any]) -> bool:
        seen.append((method, params))
        return method == "event.unbind" and params.get("handler") == OLD

    world.portal.fail_command(match, "ACCESS_DENIED", times=2)  # 403, the documented status
    result = ok(rest(world.portal, "batch", admin, halt=0, cmd={"a": _unbind_cmd(URL), "b": _unbind_cmd(OLD)}))
    assert result["result"] == {"a": {"count": 1}}
    assert result["result_error"]["b"]["error"] == "ACCESS_DENIED"
    assert ("event.unbind", {"event": "ONCRMLEADADD", "handler": OLD}) in seen  # strings, no auth
    err(rest(world.portal, "event.unbind", admin, event="ONCRMLEADADD", handler=OLD), 403, "ACCESS_DENIED")
    assert ok(rest(world.portal, "event.unbind", admin, event="ONCRMLEADADD", handler=OLD)) == {"count": 1}


def test_chaos_fails_rest_not_oauth_and_never_executes(world: World, emu: Emulator) -> None:
    admin = world.admin.access_token
    emu.chaos(1.0, ["OVERLOAD_LIMIT"], seed=1)
    err(rest(world.portal, "event.bind", admin, event="ONCRMLEADADD", handler=URL), 503, "OVERLOAD_LIMIT")
    assert world.portal.handlers(world.app) == []
    fresh = refresh(emu, world.app, world.admin.refresh_token)
    assert fresh.status_code == 200

    emu.chaos(0.5, ["INTERNAL_SERVER_ERROR", "QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT"], seed=7)
    statuses = [rest(world.portal, "event.get", fresh.json()["access_token"]).status_code for _ in range(30)]
    assert set(statuses) <= {200, 500, 503, 429}
    assert 0 < statuses.count(200) < 30
    emu.chaos(0)
    assert ok(rest(world.portal, "event.get", fresh.json()["access_token"])) == []
    with pytest.raises(ValueError, match="unknown chaos faults"):
        emu.chaos(0.1, ["NOPE"])


def test_timeout_fault_drops_the_connection(world: World, emu: Emulator) -> None:
    emu.timeout_delay = 0.2
    world.portal.fail_next(1, "timeout")
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        rest(world.portal, "event.bind", world.admin.access_token, event="ONCRMLEADADD", handler=URL)
    assert time.monotonic() - started >= 0.2
    assert world.portal.handlers(world.app) == []
    dropped = emu.requests_log(method="event.bind")
    assert [(e.status, e.error) for e in dropped] == [(0, "timeout")]


def test_latency_sleeps_outside_the_lock(emu: Emulator) -> None:
    app = emu.add_app()
    portals = [emu.add_portal(f"slow{i}.bitrix24.test") for i in range(3)]
    tokens = [emu.install(p, app).access_token for p in portals]
    for p in portals:
        p.latency = 0.3
    durations: list[float] = []

    def call(portal: Portal, token: str) -> None:
        t0 = time.monotonic()
        ok(rest(portal, "event.get", token))
        durations.append(time.monotonic() - t0)

    started = time.monotonic()
    threads = [threading.Thread(target=call, args=pair) for pair in zip(portals, tokens, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(durations) == 3
    assert min(durations) >= 0.3
    assert time.monotonic() - started < 0.75  # three 0.3 s requests overlapped


# ----------------------------------------------------------------------------------- event POSTs


def test_install_update_uninstall_post_the_documented_forms(emu: Emulator, receiver: Receiver) -> None:
    app = emu.add_app()
    portal = emu.add_portal("posted.bitrix24.test")
    inst = emu.install(portal, app, install_url=receiver.url)
    assert inst.status == 200
    post = receiver.posts[-1]
    assert post["ctype"] == "application/x-www-form-urlencoded"
    form = dict(post["pairs"])
    assert set(form) == {
        "event",
        "event_handler_id",
        "data[VERSION]",
        "data[ACTIVE]",
        "data[INSTALLED]",
        "data[LANGUAGE_ID]",
        "ts",
        "auth[domain]",
        "auth[scope]",
        "auth[access_token]",
        "auth[refresh_token]",
        "auth[expires_in]",
        "auth[server_endpoint]",
        "auth[status]",
        "auth[client_endpoint]",
        "auth[member_id]",
        "auth[application_token]",
    }
    assert form["event"] == "ONAPPINSTALL"
    assert form["ts"].isdigit()
    assert form["event_handler_id"].isdigit()
    assert form["auth[refresh_token]"] == inst.refresh_token
    assert form["auth[access_token]"] == inst.access_token
    assert form["auth[application_token]"] == inst.application_token
    assert len(inst.application_token) == 32
    assert form["auth[member_id]"] == portal.member_id
    assert form["auth[client_endpoint]"] == portal.client_endpoint
    assert form["auth[server_endpoint]"] == emu.server_endpoint
    assert form["auth[expires_in]"] == "3600"
    assert parse_pairs(post["pairs"])["auth"]["domain"] == portal.domain == portal.host  # the host it lives at

    portal.bind(app, "ONCRMLEADADD", URL)
    updated = emu.update(portal, app, install_url=receiver.url)
    form = dict(receiver.posts[-1]["pairs"])
    assert form["event"] == "ONAPPUPDATE"
    assert form["data[PREVIOUS_VERSION]"] == "1"
    assert form["data[VERSION]"] == "2"
    assert updated.application_token != inst.application_token == emu.record_for(inst)["application_token"]
    assert form["auth[application_token]"] == updated.application_token
    assert form["auth[refresh_token]"] == updated.refresh_token != inst.refresh_token
    assert len(portal.handlers(app)) == 1  # handlers are kept on update
    assert ok(rest(portal, "event.get", inst.access_token))  # so are earlier tokens

    receiver.on_post = lambda: (portal.handlers(app), portal.is_installed(app))
    assert emu.uninstall(portal, app, uninstall_url=receiver.url, clean=False) == 200
    post = receiver.posts[-1]
    form = dict(post["pairs"])
    assert set(form) == {
        "event",
        "data[LANGUAGE_ID]",
        "data[CLEAN]",
        "ts",
        "auth[domain]",
        "auth[server_endpoint]",
        "auth[client_endpoint]",
        "auth[member_id]",
        "auth[application_token]",
    }
    assert form["event"] == "ONAPPUNINSTALL"
    assert form["data[CLEAN]"] == "0"
    assert form["auth[application_token]"] == updated.application_token
    assert post["seen"] == ([], False)  # the portal cleaned up before it sent the event


def test_unreachable_install_url_gives_status_zero(emu: Emulator) -> None:
    app, portal = emu.add_app(), emu.add_portal("lonely.bitrix24.test")
    with Emulator() as other:
        dead = other.base_url
    assert emu.install(portal, app, install_url=dead + "/install").status == 0
    assert portal.is_installed(app)


# ----------------------------------------------------------------------------------- log, secrets


def test_request_log_counts_and_holds_no_token(world: World, emu: Emulator) -> None:
    admin = world.admin.access_token
    ok(rest(world.portal, "event.get", admin))
    ok(rest(world.portal, "batch", admin, cmd={"a": "event.get", "b": _unbind_cmd(URL)}))
    requests.get(world.portal.client_endpoint + "event.get", params={"auth": admin}, timeout=5)
    fresh = refresh(emu, world.app, world.admin.refresh_token).json()
    err(refresh(emu, world.app, fresh["refresh_token"], secret="guess"), 400, "invalid_client")
    rest(world.portal, "event.get", "00" * 32)

    log = emu.requests_log()
    assert [e.kind for e in log] == ["rest", "rest", "rest", "oauth", "oauth", "rest"]
    batch = emu.requests_log(method="batch")[0]
    assert batch.commands == ["event.get", "event.unbind"]
    assert batch.params_keys == ["cmd"]
    assert batch.client_id == world.app.client_id
    assert batch.user_id == 1
    assert len(emu.requests_log(member_id=world.portal.member_id, kind="rest")) == 4
    assert emu.requests_log(kind="oauth")[1].error == "invalid_client"

    secrets = {
        admin,
        world.admin.refresh_token,
        world.admin.application_token,
        world.app.client_secret,
        fresh["access_token"],
        fresh["refresh_token"],
        "00" * 32,
    }
    text = repr(log) + repr(world.admin) + repr(world.user) + repr(world.app)
    assert not any(s in text for s in secrets)
    emu.clear_log()
    assert emu.requests_log() == []


def test_serve_forever_prints_addresses_not_secrets() -> None:
    lines: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=serve_forever, kwargs={"out": lines.append, "stop": stop}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not any(line.startswith("Press Ctrl-C") for line in lines) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        output = "\n".join(lines)
        base = lines[0].rsplit(" ", 1)[-1]
        portals = requests.get(f"{base}/_emulator/portals", timeout=5).json()
        assert len(portals) == 3
        assert all(p["member_id"] in output for p in portals)
        record = requests.get(f"{base}/_emulator/records/{portals[1]['member_id']}", timeout=5).json()
        client_id = next(line.split(": ")[1] for line in lines if "client_id:" in line)
        creds = requests.get(f"{base}/_emulator/apps/{client_id}", timeout=5).json()
        assert record["client_endpoint"] in output
        for secret in (record["access_token"], record["refresh_token"], record["application_token"]):
            assert secret not in output
        assert creds["client_secret"] not in output
        # The served record works: it is a live portal's token chain.
        handlers = ok(rest(record["client_endpoint"], "event.get", record["access_token"]))
        assert {"event": "ONCRMCONTACTADD", "handler": URL, "auth_type": "15", "offline": 0} in handlers
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_stopped_emulator_refuses_connections() -> None:
    emu = Emulator().start()
    app, portal = emu.add_app(), emu.add_portal("gone.bitrix24.test")
    token = emu.install(portal, app).access_token
    session = requests.Session()
    assert session.post(portal.client_endpoint + "event.get", json={"auth": token}, timeout=5).status_code == 200
    emu.stop()
    emu.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        session.post(portal.client_endpoint + "event.get", json={"auth": token}, timeout=2)


def test_phpform_round_trip_and_php_rules() -> None:
    data = {"event": "ONAPPINSTALL", "data": {"VERSION": "1"}, "auth": {"domain": "x", "flag": True}}
    pairs = flatten(data)
    assert pairs == [("event", "ONAPPINSTALL"), ("data[VERSION]", "1"), ("auth[domain]", "x"), ("auth[flag]", "1")]
    assert parse_pairs(pairs) == {
        "event": "ONAPPINSTALL",
        "data": {"VERSION": "1"},
        "auth": {"domain": "x", "flag": "1"},
    }
    assert parse_query("a[]=1&a[]=2&b[c][d]=3&odd[=4") == {
        "a": {"0": "1", "1": "2"},
        "b": {"c": {"d": "3"}},
        "odd[": "4",
    }
    assert flatten({"l": ["x", "y"]}) == [("l[0]", "x"), ("l[1]", "y")]


def test_seeding_and_lifecycle_guards(world: World, emu: Emulator) -> None:
    with pytest.raises(ValueError, match="already installed"):
        emu.install(world.portal, world.app)
    with pytest.raises(ValueError, match="taken"):
        emu.add_portal("acme.bitrix24.test")
    with pytest.raises(ValueError, match="domain"):
        emu.add_portal("bad/domain")
    with pytest.raises(ValueError, match="user"):
        emu.issue_tokens(world.portal, world.app, 99)
    with pytest.raises(ValueError, match="handler"):
        world.portal.bind(world.app, "ONCRMLEADADD")
    world.portal.bind(world.app, "onCrmLeadAdd", URL)
    with pytest.raises(ValueError, match="already binded"):
        world.portal.bind(world.app, "ONCRMLEADADD", URL)
    emu.uninstall(world.portal, world.app)
    with pytest.raises(ValueError, match="not installed"):
        emu.update(world.portal, world.app)
