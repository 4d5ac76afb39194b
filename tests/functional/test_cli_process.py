"""The CLI as a user runs it: a real process, its exit status and its one-line errors.

Each test starts `python -m b24_cleanup.ops.cli` with an environment built from nothing (the
developer's shell never leaks in), so what is asserted is what a newcomer's terminal shows.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "b24_cleanup.ops.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """The machine's environment without any AWS, B24, Powertools or proxy setting, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "B24_", "POWERTOOLS_")) and k.upper() not in {"HTTP_PROXY", "HTTPS_PROXY"}
    }
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONPATH=str(ROOT / "functions"),
    )
    env.update(extra)
    return env


def cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *argv], capture_output=True, text=True, env=env or clean_env(), timeout=timeout, check=False
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The process said exactly one line on stderr, with no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- the demo --------------------------------------------------------------------------------


def test_the_demo_ignores_a_hostile_environment(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("[default]\nregion = mars-1\nendpoint_url = http://127.0.0.1:1\n")
    hostile = clean_env(
        B24_DRY_RUN="true",
        B24_SSM_PREFIX="not-a-path",
        B24_ACCEPT_INSTALL="maybe",
        AWS_PROFILE="doesnotexist",
        AWS_ENDPOINT_URL="http://127.0.0.1:1",
        AWS_ENDPOINT_URL_SSM="http://127.0.0.1:1",
        AWS_ENDPOINT_URL_SQS="http://127.0.0.1:1",
        AWS_CONFIG_FILE=str(config),
        AWS_REGION="mars-1",
        HTTP_PROXY="http://127.0.0.1:1",
        http_proxy="http://127.0.0.1:1",
        POWERTOOLS_METRICS_DISABLED="true",
    )
    proc = cli("demo", env=hostile, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "14/14 portals ended as expected" in proc.stdout
    assert "UNEXPECTED" not in proc.stdout


def test_a_plain_install_without_moto_says_which_extra_to_install(tmp_path: Path) -> None:
    # What `pip install b24-cleanup` (no extra) leaves: `import moto` fails.
    shim = tmp_path / "moto"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'moto'\", name='moto')\n")
    env = clean_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT / 'functions'}")
    proc = cli("demo", env=env)
    assert proc.returncode == 2
    assert one_line(proc) == "b24-cleanup: the demo needs moto: pip install 'b24-cleanup[demo]'"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_the_demo_says_at_once_when_its_emulator_cannot_be_reached() -> None:
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("unprivileged network namespaces are not allowed here")
    started = time.monotonic()
    proc = subprocess.run(
        ["unshare", "-rn", *CLI, "demo"], capture_output=True, text=True, env=clean_env(), timeout=120, check=False
    )
    assert proc.returncode == 2
    assert "cannot be reached" in one_line(proc) and "loopback" in proc.stderr
    assert time.monotonic() - started < 30  # it took 62 s of retries before


# -- one line instead of a traceback ---------------------------------------------------------


def test_version_comes_from_the_package() -> None:
    from importlib.metadata import version

    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"b24-cleanup {version('b24-cleanup')}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("sweep", "--workers", "0"), "--workers must be between 1 and 64, not 0"),
        (("sweep", "--workers", "many"), "--workers must be a whole number, not 'many'"),
        (("emulator", "--port", "70000"), "--port must be between 0 and 65535, not 70000"),
        (("emulator", "--port", "-1"), "--port must be between 0 and 65535, not -1"),
    ],
)
def test_bad_numbers_are_usage_errors(argv: tuple[str, ...], message: str) -> None:
    proc = cli(*argv)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_an_emulator_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("emulator", "--port", str(port))
    assert proc.returncode == 2
    assert one_line(proc) == f"b24-cleanup: cannot use port {port} for the emulator: Address already in use"


def test_a_missing_profile_is_a_configuration_mistake() -> None:
    proc = cli("sweep", env=clean_env(AWS_PROFILE="nope", AWS_REGION="eu-central-1", B24_SSM_PREFIX="/b24/prod"))
    assert proc.returncode == 2
    line = one_line(proc)
    assert "AWS profile 'nope' is not configured" in line and "try again" not in line


def test_an_unreachable_ssm_endpoint_is_said_within_seconds() -> None:
    with socket.socket() as closed:  # a port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = clean_env(
        AWS_ACCESS_KEY_ID="k",
        AWS_SECRET_ACCESS_KEY="s",
        AWS_REGION="eu-central-1",
        AWS_ENDPOINT_URL_SSM=f"http://127.0.0.1:{port}",
        B24_SSM_PREFIX="/b24/prod",
    )
    started = time.monotonic()
    proc = cli("sweep", env=env)
    assert time.monotonic() - started < 10  # the engine's patient retries took 15 s
    assert proc.returncode == 2
    assert one_line(proc).startswith(f"b24-cleanup: cannot reach SSM at http://127.0.0.1:{port}")


# -- the local world ---------------------------------------------------------------------------


@dataclass
class World:
    env: dict[str, str]
    member_ids: list[str]
    newcomer_body: Path
    output: str


def _read_until_ready(proc: subprocess.Popen[str], deadline: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the world exited: {''.join(lines)}{proc.stderr.read() if proc.stderr else ''}")
        lines.append(line.rstrip("\n"))
        if line.startswith("Press Ctrl-C"):
            return lines
    raise AssertionError("the world did not come up in time")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    proc = subprocess.Popen(
        [*CLI, "emulator", "--portals", "6", "--aws"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        cwd=tmp_path_factory.mktemp("world"),
    )
    try:
        lines = _read_until_ready(proc, time.monotonic() + 90)
        source = next(line for line in lines if "(or: source " in line)
        env_file = Path(source.split("(or: source ", 1)[1].rstrip("):"))
        env = clean_env()
        for line in env_file.read_text().splitlines():
            words = shlex.split(line)
            if words[0] == "unset":
                for name in words[1:]:
                    env.pop(name, None)
            elif words[0] == "export":
                env.update(word.split("=", 1) for word in words[1:])  # type: ignore[arg-type]
        member_ids = [w.split("=", 1)[1] for line in lines for w in line.split() if w.startswith("member_id=")]
        body = next(line for line in lines if "ONAPPINSTALL body in" in line).rsplit(" ", 1)[1]
        yield World(env, member_ids, Path(body), "\n".join(lines))
    finally:
        proc.terminate()
        assert proc.wait(15) == 0  # SIGTERM stops the world cleanly


def test_the_world_prints_where_things_are_and_no_secret(world: World) -> None:
    assert world.output.splitlines()[0].startswith("Bitrix24 emulator listening on http://127.0.0.1:")
    assert len(world.member_ids) == 5  # five listed, "… and 1 more"
    assert "and 1 more" in world.output
    assert world.env["B24_SSM_PREFIX"] == "/b24-cleanup/local"
    assert world.env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert "client_secret" not in world.output and "refresh_token" not in world.output


def test_plan_sweep_register_and_token_access_work_against_the_world(world: World) -> None:
    stale = world.member_ids[1]  # the second kind: an old deployment's URL under two users
    proc = cli("plan", "--member-id", stale, env=world.env)
    assert proc.returncode == 0, proc.stderr
    assert "https://old-deploy.example.com/b24/events" in proc.stdout

    proc = cli("sweep", "--dry-run", "--json", env=world.env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["dry_run"] is True and len(data["portals"]) == 6
    assert all(p["domain"] for p in data["portals"]) and len({p["domain"] for p in data["portals"]}) == 6
    # without a TTY, progress is plain lines on stderr, ending with the total
    assert proc.stderr.strip().splitlines()[-1].startswith("sweep: 6/6 (100%)")

    no_oauth = {k: v for k, v in world.env.items() if k != "B24_OAUTH_URL"}
    proc = cli("register", str(world.newcomer_body), env=no_oauth)
    assert proc.returncode == 2 and "--oauth-url" in one_line(proc)
    proc = cli("register", str(world.newcomer_body), env=world.env)
    assert proc.returncode == 0, proc.stderr
    assert "ONAPPINSTALL for portal" in proc.stdout and "registered (new record)" in proc.stdout

    app_side = (
        "import sys\n"
        "from b24_cleanup.access import TokenAccess\n"
        "portal = TokenAccess.from_env().get(sys.argv[1])\n"
        "print(portal.client_endpoint, bool(portal.access_token))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", app_side, stale], capture_output=True, text=True, env=world.env, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[1] == "True" and "/rest/" in proc.stdout.split()[0]


def test_json_into_a_closed_pipe_is_quiet(world: World) -> None:
    """`b24-cleanup sweep --json | head -c 1`: the reader goes away; no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [*CLI, "plan", "--member-id", world.member_ids[0], "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=world.env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err
