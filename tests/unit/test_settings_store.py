"""design §4 settings of issue 15: B24_STORE / B24_TABLE select the store; the write budget; sharding N."""

from __future__ import annotations

import pytest

from b24_cleanup.config import Settings
from b24_cleanup.dynamostore import DynamoPortalStore
from b24_cleanup.errors import ConfigError
from b24_cleanup.store import PortalStore

BASE = {"B24_SSM_PREFIX": "/b24/test"}


def test_defaults_are_the_ssm_store_three_writes_a_second_five_containers_every_night() -> None:
    settings = Settings.from_env(BASE)
    assert (settings.store_kind, settings.table) == ("ssm", None)
    assert (settings.ssm_write_rate, settings.worker_concurrency, settings.sweep_every_nights) == (3.0, 5, 1)
    assert settings.ssm_write_share == pytest.approx(0.6)
    store = settings.store()
    assert type(store) is PortalStore


def test_b24_store_dynamodb_selects_the_table() -> None:
    settings = Settings.from_env({**BASE, "B24_STORE": "DynamoDB", "B24_TABLE": "portals"})
    store = settings.store()
    assert isinstance(store, DynamoPortalStore)
    assert (store.table, store.prefix) == ("portals", "/b24/test")  # the app's parameters stay in SSM


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"B24_STORE": "s3"}, "B24_STORE"),
        ({"B24_STORE": "dynamodb"}, "B24_TABLE"),
        ({"B24_SSM_WRITE_RATE": "fast"}, "B24_SSM_WRITE_RATE"),
        ({"B24_SSM_WRITE_RATE": "0"}, "B24_SSM_WRITE_RATE"),
        ({"B24_SSM_WRITE_RATE": "nan"}, "B24_SSM_WRITE_RATE"),
        ({"B24_SSM_WRITE_RATE": "inf"}, "B24_SSM_WRITE_RATE"),
        ({"B24_WORKER_CONCURRENCY": "2.5"}, "B24_WORKER_CONCURRENCY"),
        ({"B24_WORKER_CONCURRENCY": "-1"}, "B24_WORKER_CONCURRENCY"),
        ({"B24_SWEEP_EVERY_NIGHTS": "0"}, "B24_SWEEP_EVERY_NIGHTS"),
        ({"B24_SWEEP_EVERY_NIGHTS": "31"}, "B24_SWEEP_EVERY_NIGHTS"),
    ],
)
def test_bad_values_are_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({**BASE, **env})


def test_the_share_divides_the_budget_by_the_containers() -> None:
    settings = Settings.from_env(
        {**BASE, "B24_SSM_WRITE_RATE": "10", "B24_WORKER_CONCURRENCY": "4", "B24_SWEEP_EVERY_NIGHTS": "30"}
    )
    assert settings.ssm_write_share == 2.5
    assert settings.sweep_every_nights == 30


def test_token_access_follows_b24_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's backend reads the chain where the service keeps it (design §3a): one store, one chain."""
    from b24_cleanup.access import TokenAccess

    monkeypatch.setenv("B24_SSM_PREFIX", "/b24-cleanup/test")
    monkeypatch.setenv("B24_OAUTH_URL", "http://127.0.0.1:9/oauth/token/")
    monkeypatch.setenv("B24_STORE", "dynamodb")
    monkeypatch.setenv("B24_TABLE", "portals")
    access = TokenAccess.from_env()
    assert isinstance(access.store, DynamoPortalStore) and access.oauth_url == "http://127.0.0.1:9/oauth/token/"

    monkeypatch.delenv("B24_STORE")
    access = TokenAccess.from_env()
    assert type(access.store) is PortalStore and access.store.prefix == "/b24-cleanup/test"

    monkeypatch.setenv("B24_STORE", "dynamodb")
    monkeypatch.delenv("B24_TABLE")
    with pytest.raises(ConfigError, match="B24_TABLE"):
        TokenAccess.from_env()
