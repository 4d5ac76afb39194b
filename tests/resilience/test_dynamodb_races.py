"""Every token race the SSM store is tested against, on the DynamoDB store (design §3a), plus CAS losers.

The race tests of test_reliability.py (two jobs for one due portal, the app's backend refreshing
while a job runs, marks and deletes racing a reinstall) and of test_registration.py run here
unchanged against a sandbox whose records live in a moto DynamoDB table: the same behaviour is the
contract (design §3a: "behaviour, outcomes, metrics and the one-chain protocol are the same with
either store"). Then the races that only compare-and-swap can settle exactly.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "functional"))  # test_registration's home

from fixtures.sandbox import DECLARED, FAST
from test_registration import test_refresh_raced_by_another_writer_adopts_its_pair, works_at
from test_reliability import (
    DECLARED_ROWS,
    ORPHAN_ROWS,
    chain_works,
    isolation,
    run,
    sweep,
    test_a_stale_uninstall_racing_a_reinstall_keeps_the_new_record,
    test_clearing_revoked_at_keeps_a_pair_the_app_stored_meanwhile,
    test_the_app_backend_refreshing_while_a_job_unbinds,
    test_the_revoked_mark_never_overwrites_a_newer_install,
    test_two_jobs_for_one_expired_portal_keep_one_chain,
)

from b24_cleanup.access import TokenAccess
from b24_cleanup.dynamostore import DynamoPortalStore
from b24_cleanup.engine import Engine
from b24_cleanup.jobs import Outcome
from b24_cleanup.oauth import OAuthClient
from b24_cleanup.ops.sandbox import Sandbox, sandbox
from b24_cleanup.record import PortalRecord

REUSED = (
    isolation,
    test_two_jobs_for_one_expired_portal_keep_one_chain,
    test_the_app_backend_refreshing_while_a_job_unbinds,
    test_clearing_revoked_at_keeps_a_pair_the_app_stored_meanwhile,
    test_the_revoked_mark_never_overwrites_a_newer_install,
    test_a_stale_uninstall_racing_a_reinstall_keeps_the_new_record,
    test_refresh_raced_by_another_writer_adopts_its_pair,
)


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox(declared=DECLARED, store="dynamodb") as sb:
        assert isinstance(sb.store, DynamoPortalStore) and isinstance(sb.new_store(), DynamoPortalStore)
        yield sb


def test_the_records_live_in_the_table(box: Sandbox) -> None:
    seeded = box.add_portal("table.bitrix24.test")
    assert box.env()["B24_STORE"] == "dynamodb" and box.env()["B24_TABLE"] == box.table
    ssm_names = [p["Name"] for p in box.store.client.describe_parameters()["Parameters"]]
    assert not [n for n in ssm_names if "/portals/" in n]
    assert box.new_store().get(seeded.member_id).application_token == seeded.installation.application_token


def test_a_mark_loses_to_a_refresh_and_decides_again(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CAS loser at the engine: the app's backend stores a new pair between the mark's read and write."""
    seeded = box.add_portal("loser.bitrix24.test", handlers=DECLARED_ROWS + ORPHAN_ROWS, extra={"revoked_at": 1})
    store = box.new_store()
    assert isinstance(store, DynamoPortalStore)
    original_write = store.write
    raced: list[str] = []

    def write(member_id: str, record: PortalRecord, expected_version: int) -> int:
        if not raced and "revoked_at" not in record.data:  # the job clearing the stale mark
            seeded.portal.expire_tokens(box.app)
            access = TokenAccess(box.new_store(), oauth_url=box.emulator.oauth_url, settle_seconds=FAST.settle_seconds)
            raced.append(access.after_expired(member_id, record.access_token).access_token)
        return original_write(member_id, record, expected_version)

    monkeypatch.setattr(store, "write", write)

    result = run(
        Engine(store, oauth_url=box.emulator.oauth_url, orphan_grace_days=0, options=FAST), sweep(seeded.member_id)
    )

    assert result.outcome is Outcome.CLEANED, result.reason
    final = box.record(seeded.member_id)
    assert final.revoked_at is None  # the loser decided again and cleared the mark ...
    assert raced and final.access_token == raced[0]  # ... on the app's new pair, which it kept
    assert chain_works(box, seeded.member_id)


def _child(member_id: str, prefix: str, table: str, env: dict[str, str], out: Any) -> None:
    """A second process asking for a token, against moto's server and the same emulator."""
    os.environ.update(env)
    try:
        portal = TokenAccess(
            DynamoPortalStore(prefix, table), oauth_url=os.environ["B24_OAUTH_URL"], settle_seconds=0.5
        ).get(member_id)
        out.put(("ok", portal.access_token))
    except Exception as exc:
        out.put(("error", type(exc).__name__))


def test_threads_and_a_second_process_end_with_one_chain_on_dynamodb() -> None:
    """Two threads and another process ask for a due portal's token at once: one chain survives."""
    from moto.server import ThreadedMotoServer

    from b24_cleanup.dynamostore import create_table, dynamodb_client
    from b24_cleanup.ops.emulator import Emulator

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    try:
        with Emulator() as emu:
            app = emu.add_app()
            create_table(dynamodb_client(), "race")
            store = DynamoPortalStore("/race", "race")
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
            env["B24_OAUTH_URL"] = emu.oauth_url  # the emulator is no trusted OAuth host
            child = ctx.Process(target=_child, args=(portal.member_id, "/race", "race", env, out))
            child.start()
            results: list[tuple[str, str]] = []

            def ask() -> None:
                try:
                    access = TokenAccess(
                        DynamoPortalStore("/race", "race"), oauth_url=emu.oauth_url, settle_seconds=0.5
                    )
                    results.append(("ok", access.get(portal.member_id).access_token))
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
            answer = OAuthClient(store.app_credentials()).refresh(emu.oauth_url, final.refresh_token)
            assert answer["access_token"]  # the stored refresh token is the live end of the chain
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
        server.stop()
