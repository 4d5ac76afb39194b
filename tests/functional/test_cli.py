"""The operator CLI against moto and the emulator (design §8): commands, --json, exit codes, usual mistakes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from fixtures.aws import ROOT
from fixtures.sandbox import APP_URL, OLD_URL

from b24_cleanup.ops.cli import main
from b24_cleanup.ops.emulator import payloads
from b24_cleanup.ops.sandbox import Sandbox

# The CLI reads B24_SSM_PREFIX like the handlers do.
pytestmark = pytest.mark.box(env=True)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), []
    code = main(list(argv), out=out, err=err.append)
    return code, out.getvalue(), "\n".join(err)


def seed_two(box: Sandbox) -> tuple[Any, Any]:
    dirty = box.add_portal(
        "dirty.bitrix24.test",
        handlers=[{"event": "ONCRMLEADADD", "handler": APP_URL}, {"event": "ONCRMLEADADD", "handler": OLD_URL}],
    )
    tidy = box.add_portal("tidy.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": APP_URL}])
    return dirty, tidy


def test_sweep_all_prints_a_table_and_a_summary(box: Sandbox) -> None:
    dirty, tidy = seed_two(box)
    code, out, err = run("sweep")
    assert code == 0, err
    assert out.splitlines()[0].split()[:3] == ["member_id", "domain", "outcome"]
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert lines[dirty.member_id][1:3] == [dirty.portal.domain, "cleaned"]  # the record's domain
    assert lines[tidy.member_id][1:3] == [tidy.portal.domain, "clean"]
    assert "outcomes: cleaned 1, clean 1" in out
    assert "unbound 1" in out
    assert len(dirty.portal.handlers(box.app)) == 1


def test_sweep_json_and_one_member(box: Sandbox) -> None:
    dirty, _ = seed_two(box)
    code, out, _ = run("sweep", "--member-id", dirty.member_id, "--json")
    data = json.loads(out)
    assert code == 0
    assert [p["member_id"] for p in data["portals"]] == [dirty.member_id]
    assert data["portals"][0]["outcome"] == "cleaned"
    assert data["totals"]["HandlersUnbound"] == 1


def test_sweep_dry_run_changes_nothing(box: Sandbox) -> None:
    dirty, _ = seed_two(box)
    versions = {p["Name"]: p["Version"] for p in box.store.client.describe_parameters()["Parameters"]}
    code, out, _ = run("sweep", "--dry-run")
    assert code == 0
    assert "would unbind 1" in out and "dry run" in out
    assert box.emulator.requests_log(method="event.unbind") == [] == box.emulator.requests_log(method="batch")
    assert len(dirty.portal.handlers(box.app)) == 2
    assert {p["Name"]: p["Version"] for p in box.store.client.describe_parameters()["Parameters"]} == versions


def test_sweep_exits_non_zero_when_a_portal_is_incomplete(box: Sandbox) -> None:
    seeded = box.add_portal("lic.bitrix24.test", handlers=[{"event": "X", "offline": True, "connector_id": "c"}])
    seeded.portal.license_auth_connector = False
    code, out, _ = run("sweep")
    assert code == 1
    assert "incomplete" in out


def test_plan_classifies_without_changing_anything(box: Sandbox) -> None:
    dirty, _ = seed_two(box)
    code, out, _ = run("plan", "--member-id", dirty.member_id)
    assert code == 0
    assert "owned handler rows: 2 (declared 1, orphan 1, held 0)" in out
    assert OLD_URL in out and "the sweep will unbind them" in out
    assert len(dirty.portal.handlers(box.app)) == 2
    code, out, _ = run("plan", "--member-id", dirty.member_id, "--json")
    data = json.loads(out)
    assert [o["handler"] for o in data["orphans"]] == [OLD_URL]
    assert [d["handler"] for d in data["declared"]] == [APP_URL]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("sweep", "--member-id", "f" * 32), "unknown member id"),
        (("plan", "--member-id", "../etc"), "malformed member id"),
        (("sweep", "--prefix", "/nothing/here"), "no portals stored under /nothing/here/portals/"),
    ],
)
def test_usual_mistakes_are_one_line(box: Sandbox, argv: tuple[str, ...], message: str) -> None:
    box.add_portal("x.bitrix24.test")
    if "/nothing/here" in argv:
        box.store.client.put_parameter(
            Name="/nothing/here/app/handlers",
            Type="String",
            Value=json.dumps({"handlers": [{"event": "E", "handler": APP_URL}]}),
        )
        box.store.client.put_parameter(
            Name="/nothing/here/app/credentials",
            Type="SecureString",
            Value=json.dumps({"client_id": "c", "client_secret": "s"}),
        )
    code, out, err = run(*argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and out == ""


def test_missing_declared_set_says_what_it_means_for_a_sweep(box: Sandbox) -> None:
    box.add_portal("x.bitrix24.test")
    box.put_declared(None)
    code, _, err = run("sweep")
    assert code == 2
    assert "declared handler set" in err and "would unbind nothing" in err


def test_register_from_a_file_and_from_stdin(box: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("B24_OAUTH_URL", box.emulator.oauth_url)
    portal = box.emulator.add_portal("reg.bitrix24.test")
    body = urlencode(payloads.install_form(box.emulator.state, box.emulator.install(portal, box.app)))
    path = tmp_path / "install.txt"
    path.write_text(body)

    code, out, err = run("register", str(path))
    assert code == 0, err
    assert f"ONAPPINSTALL for portal {portal.member_id}: registered (new record)" in out
    assert box.record(portal.member_id) is not None

    code, out, err = run("register", str(path))  # replayed: its refresh token is spent
    assert code == 2
    assert "registration rejected, nothing stored" in err

    portal2 = box.emulator.add_portal("reg2.bitrix24.test")
    fields = dict(payloads.install_form(box.emulator.state, box.emulator.install(portal2, box.app)))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(json.dumps(_nest(fields)).encode())))
    code, out, err = run("register", "-", "--json")
    assert code == 0, err
    assert json.loads(out) == {"member_id": portal2.member_id, "event": "ONAPPINSTALL", "created": True}

    code, _, err = run("register", str(tmp_path / "missing.txt"))
    assert code == 2 and "cannot read" in err


def _nest(fields: dict[str, str]) -> dict[str, Any]:
    """`auth[member_id]=…` pairs as the nested JSON the endpoint also accepts."""
    nested: dict[str, Any] = {}
    for key, value in fields.items():
        head, _, rest = key.partition("[")
        if rest:
            nested.setdefault(head, {})[rest.rstrip("]").split("][")[0]] = value
        else:
            nested[head] = value
    return nested


def _isolated_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "B24_"))}
    env.update(
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
        B24_SSM_PREFIX="/b24-cleanup/prod",
        **extra,
    )
    return env


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"AWS_REGION": "eu-central-1"}, "no AWS credentials"), ({}, "no AWS region")],
    ids=["no-credentials", "no-region"],
)
def test_aws_setup_mistakes_in_a_real_process(extra: dict[str, str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "b24_cleanup.ops.cli", "sweep"],
        capture_output=True,
        text=True,
        env=_isolated_env(**extra),
        cwd=ROOT / "functions",
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_prefix_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("B24_SSM_PREFIX", raising=False)
    code, _, err = run("sweep")
    assert code == 2 and "no SSM prefix" in err


def test_demo_runs_offline_and_every_portal_ends_as_expected() -> None:
    code, out, err = run("demo")
    assert code == 0, out + err
    assert "14/14 portals ended as expected" in out
    outcome_table = out.split("sweep detail:")[0]
    assert outcome_table.splitlines()[2].split()[:2] == ["portal", "domain"]
    assert "endpoint HTTP" in outcome_table and "endpoint HTTP: the status" in outcome_table
    rows = {line.split()[0]: line for line in outcome_table.splitlines() if line.split()}
    assert "revoked" in rows["lost"] and "401" in rows["spoofed"] and "skipped" in rows["again"]
    assert "acme.bitrix24.test" in rows["acme"]
    # a portal with none of its declared handlers bound is not shown as simply "clean"
    assert "clean: all 3 declared missing" in rows["bare"]
    assert "clean, 1 missing" in rows["partial"]
    removed = out.split("rows removed from the portals")[1].split("metrics as CloudWatch")[0]
    acme = [line.split() for line in removed.splitlines() if line.startswith("acme ")]
    assert sorted(r[3] for r in acme if r[2].startswith("https://")) == ["0", "1", "2"]
    assert ["acme", "ONCRMLEADUPDATE", "(offline)", "-"] in acme
    assert not [line for line in removed.splitlines() if line.startswith(("tidy ", "bare ", "spoofed "))]
    # A typo in the declared set (a near miss of the live URL) is held: the handler survives.
    held = out.split("orphans held (not unbound yet):")[1].split("\n\n")[0]
    assert [line.split()[:3] for line in held.splitlines() if line.startswith("typo ")] == [
        ["typo", "ONCRMLEADADD", "https://app.example.com/b24/events/"]
    ]
    assert not [line for line in removed.split("orphans held")[0].splitlines() if line.startswith("typo ")]
    assert "found in them: 0" in out
    assert '{"_aws"' not in out and "--verbose shows one" in out
    code, out, _ = run("demo", "--verbose")
    assert code == 0 and '{"_aws"' in out
    code, out, _ = run("demo", "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_emulator_command_serves_and_prints_no_secret() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "b24_cleanup.ops.cli", "emulator", "--port", "0"],
        cwd=ROOT / "functions",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_isolated_env(),
    )
    try:
        first = proc.stdout.readline()
        assert "http://127.0.0.1:" in first
    finally:
        proc.terminate()
        proc.wait(10)


def test_missing_app_credentials_are_one_line_before_the_first_portal(box: Sandbox) -> None:
    for i in range(5):
        box.add_portal(f"p{i}.bitrix24.test", handlers=[{"event": "ONCRMLEADADD", "handler": APP_URL}])
    box.store.client.delete_parameter(Name=f"{box.prefix}/app/credentials")
    box.emulator.clear_log()
    code, out, err = run("sweep")
    assert code == 2 and out == ""
    name = f"{box.prefix}/app/credentials"
    assert err == f"b24-cleanup: app credentials are missing: put {{client_id, client_secret}} at {name}"
    assert box.emulator.requests_log() == []  # no portal was tried


def test_a_wrong_prefix_asks_whether_the_prefix_is_right(box: Sandbox) -> None:
    box.add_portal("x.bitrix24.test")
    code, _, err = run("sweep", "--prefix", "/b24-cleanup/typo")
    assert code == 2
    assert "no declared handler set at /b24-cleanup/typo/app/handlers (is the prefix right?)" in err


@pytest.mark.parametrize("prefix", ["b24-cleanup/prod", "/", " "])
def test_a_prefix_without_a_leading_slash_blames_the_option(box: Sandbox, prefix: str) -> None:
    code, _, err = run("sweep", "--prefix", prefix)
    assert code == 2
    assert err.startswith("b24-cleanup: --prefix must be an absolute SSM path") and "B24_SSM_PREFIX" not in err


def test_register_refusal_says_when_oauth_url_is_needed(
    box: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("B24_OAUTH_URL")  # the box's environment configures it: here nobody did
    portal = box.emulator.add_portal("reg.bitrix24.test")
    path = tmp_path / "install.txt"
    path.write_text(urlencode(payloads.install_form(box.emulator.state, box.emulator.install(portal, box.app))))
    code, _, err = run("register", str(path))  # the emulator's OAuth server is not Bitrix24's
    assert code == 2
    assert "no trusted OAuth server" in err and "pass --oauth-url or set B24_OAUTH_URL" in err
    code, out, err = run("register", str(path), "--oauth-url", box.emulator.oauth_url)  # nothing was spent
    assert code == 0, err
    assert "registered (new record)" in out


def test_every_option_of_every_command_has_help() -> None:
    from b24_cleanup.ops.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) >= {"demo", "plan", "sweep", "emulator", "register"}
    undocumented = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.items()
        for action in sub._actions
        if not action.help
    ]
    assert undocumented == []
