"""One place per constant: timeouts, rate and burst, grace days, event names, the version."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from fixtures.aws import AwsAccount

import b24_cleanup
from b24_cleanup import client, config, oauth, pacing, payload, planner, runtime
from b24_cleanup.engine import Engine, EngineOptions
from b24_cleanup.store import PortalStore

ROOT = Path(__file__).resolve().parents[2]


def test_the_worker_oauth_client_uses_the_oauth_timeouts(mock_aws: AwsAccount) -> None:
    engine = runtime.engine()  # what the worker runs
    assert engine.oauth_client().timeout == oauth.DEFAULT_TIMEOUT
    assert engine.options.timeout == client.DEFAULT_TIMEOUT  # the portal's REST requests keep theirs
    assert oauth.DEFAULT_TIMEOUT != client.DEFAULT_TIMEOUT


def test_engine_defaults_are_the_owning_modules_constants() -> None:
    options = EngineOptions()
    assert (options.rate, options.burst) == (pacing.DEFAULT_RATE, pacing.DEFAULT_BURST)
    assert options.max_time_limit_wait == pacing.RetryPolicy().max_time_limit_wait
    assert Engine(PortalStore("/b24-cleanup/test")).grace_days == config.DEFAULT_GRACE_DAYS


def test_event_names_have_one_home() -> None:
    assert {payload.ONAPPINSTALL, payload.ONAPPUPDATE} == payload.INSTALL_EVENTS
    assert planner.UNINSTALL_EVENT is payload.ONAPPUNINSTALL


def test_the_version_is_set_once_and_names_the_user_agent() -> None:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert b24_cleanup.__version__.count(".") == 2
    assert f"b24-cleanup/{b24_cleanup.__version__}" == oauth.USER_AGENT
    assert client.USER_AGENT == oauth.USER_AGENT
