"""`b24-cleanup migrate --to dynamodb`: counts, --dry-run, --json, exit status, no token in the output."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import boto3
import pytest

from b24_cleanup.dynamostore import DynamoPortalStore, create_table
from b24_cleanup.ops import cli
from b24_cleanup.ops.sandbox import REGION, Sandbox, sandbox
from b24_cleanup.store import is_tombstone

TABLE = "portals-cli"


@pytest.fixture
def box() -> Iterator[Sandbox]:
    with sandbox(declared=[{"event": "ONCRMLEADADD", "handler": "https://app.example.com/h"}]) as sb:
        create_table(boto3.client("dynamodb", region_name=REGION), TABLE)
        yield sb


def run(*argv: str) -> tuple[int, str, list[str]]:
    out, errors = io.StringIO(), []
    code = cli.main(list(argv), out=out, err=errors.append)
    return code, out.getvalue(), errors


def test_migrate_dry_run_then_for_real_then_again(box: Sandbox) -> None:
    seeded = [box.add_portal(f"cli{i}.bitrix24.test") for i in range(3)]
    base = ("migrate", "--to", "dynamodb", "--table", TABLE, "--prefix", box.prefix, "--settle", "0")

    code, text, _ = run(*base, "--dry-run")
    assert code == 0 and "would move 3, already moved 0, failed 0" in text
    assert DynamoPortalStore(box.prefix, TABLE).get(seeded[0].member_id) is None

    code, text, _ = run(*base)
    assert code == 0 and "moved 3, already moved 0, failed 0" in text
    code, text, _ = run(*base, "--json")
    assert code == 0
    assert json.loads(text) | {"failures": {}} == {
        "dry_run": False, "table": TABLE, "moved": 0, "already_moved": 3, "failed": 0, "failures": {}
    }  # fmt: skip
    for s in seeded:
        name = f"{box.prefix}/portals/{s.member_id}"
        assert is_tombstone(box.store.client.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"])
        assert s.installation.refresh_token not in text and s.installation.application_token not in text


def test_a_record_that_cannot_move_fails_the_command(box: Sandbox) -> None:
    box.store.client.put_parameter(Name=f"{box.prefix}/portals/broken", Value="[]", Type="SecureString")
    code, text, _ = run("migrate", "--to", "dynamodb", "--table", TABLE, "--prefix", box.prefix, "--settle", "0")
    assert code == 1
    assert "broken" in text and "failed 1" in text


def test_migrate_needs_a_table(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("B24_TABLE", raising=False)
    code, _, errors = run("migrate", "--to", "dynamodb", "--prefix", box.prefix)
    assert code == 2 and "--table" in errors[0]
