"""The process's runtime (runtime.py): built on first use, one reset clears everything; thin handlers."""

from __future__ import annotations

from pathlib import Path

import pytest

from b24_cleanup import runtime
from b24_cleanup.access import TokenAccess
from b24_cleanup.engine import Engine
from b24_cleanup.record import PortalRecord
from b24_cleanup.store import PortalStore
from b24_cleanup.tokens import Latest, Rotation

HANDLERS = Path(__file__).resolve().parents[2] / "functions" / "b24_cleanup" / "handlers"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("B24_SSM_PREFIX", "/b24-cleanup/test")
    monkeypatch.setenv("B24_QUEUE_URL", "https://sqs.us-east-1.amazonaws.com/123456789012/jobs.fifo")


def test_nothing_is_built_until_it_is_used(env: None) -> None:
    assert runtime.created() == 0
    runtime.settings()
    assert runtime.created() == 0  # settings are no client
    runtime.store()
    assert runtime.created() == 1
    runtime.queue()
    assert runtime.created() == 2


def test_everything_is_kept_for_the_process(env: None) -> None:
    assert runtime.settings() is runtime.settings()
    assert runtime.store() is runtime.store()
    assert runtime.sqs() is runtime.sqs()
    assert runtime.engine() is runtime.engine()


def test_one_reset_clears_settings_clients_engine_and_chain_state(env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, store, sqs, engine = runtime.settings(), runtime.store(), runtime.sqs(), runtime.engine()
    chains = runtime.chains()
    chains.latest["m1"] = Latest(PortalRecord({"member_id": "m1"}), "r0")
    chains.pending["m1"] = Rotation({"refresh_token": "r1"}, "app", "r0")
    lock = chains.lock("m1")

    monkeypatch.setenv("B24_DRY_RUN", "true")
    assert runtime.settings().dry_run is False  # read once per process, not keyed on the environment
    runtime.reset()

    assert runtime.created() == 0
    assert runtime.settings() is not settings and runtime.settings().dry_run is True
    assert runtime.store() is not store
    assert runtime.sqs() is not sqs
    assert runtime.engine() is not engine and runtime.engine().dry_run is True
    assert runtime.chains() is chains  # one object for the process, emptied
    assert chains.latest == {} and chains.pending == {}
    assert chains.lock("m1") is not lock


def test_every_engine_and_token_access_of_the_process_share_one_chain_state(env: None) -> None:
    store = PortalStore("/b24-cleanup/test")
    assert Engine(store).chains is runtime.chains()
    assert TokenAccess(store).chains is runtime.chains()
    assert runtime.engine().chains is runtime.chains()


def test_use_engine_hands_the_handlers_that_engine_until_a_reset(env: None) -> None:
    engine = Engine(PortalStore("/b24-cleanup/test"))
    runtime.use_engine(engine)
    assert runtime.engine() is engine
    runtime.reset()
    assert runtime.engine() is not engine


@pytest.mark.parametrize("name", ["endpoint.py", "scheduler.py", "worker.py"])
def test_handlers_stay_thin(name: str) -> None:
    """Handlers parse the event, call the core and shape the answer: queue and proof logic live in the core."""
    assert len((HANDLERS / name).read_text().splitlines()) <= 150
