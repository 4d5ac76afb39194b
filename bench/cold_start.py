"""Table 4, cold start: a fresh interpreter per run imports each handler and makes its first request's
clients; with a `sam build` output, also the artifact as Lambda runs it (python3.13, read-only, the
bytecode it ships and none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import FAKE_AWS, HANDLER_ENV, ROOT, median, print_table

NAME = "coldstart"
TITLE = "4. Cold start"


@dataclass(frozen=True)
class Sizes:
    min_runs: int  # fresh interpreters per measurement at the least (--runs may ask for more)
    zip_artifacts: bool  # also zip each artifact to report its deployed size


FULL = Sizes(min_runs=7, zip_artifacts=True)
QUICK = dataclasses.replace(FULL, min_runs=1, zip_artifacts=False)

_COLD_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
import {module} as m
t1 = time.perf_counter()
{init}
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "init": t2 - t1, "artifact": {artifact_check}}}))
"""
_COLD_TARGETS = [
    # The handler's first request builds what it uses through the process's runtime (already imported).
    ("handlers.endpoint", "b24_cleanup.handlers.endpoint", "r = m.runtime; r.settings(); r.store().client; r.sqs()"),
    ("handlers.scheduler", "b24_cleanup.handlers.scheduler", "r = m.runtime; r.settings(); r.store().client; r.sqs()"),
    ("handlers.worker", "b24_cleanup.handlers.worker", "e = m.runtime.engine(); e.store.client"),
    ("import boto3 + boto3.client('ssm')", "boto3", "m.client('ssm')"),
]
_ARTIFACT_DIRS = {
    "b24_cleanup.handlers.endpoint": "EndpointFunction",
    "b24_cleanup.handlers.scheduler": "SchedulerFunction",
    "b24_cleanup.handlers.worker": "WorkerFunction",
}


def _cold_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "B24_", "POWERTOOLS_", "PYTHON"))}
    env.update(FAKE_AWS)
    env.update(HANDLER_ENV)
    env.update(
        B24_SSM_PREFIX="/b24-cleanup/bench",
        B24_QUEUE_URL="https://sqs.us-east-1.amazonaws.com/123456789012/b24-cleanup-jobs.fifo",
    )
    env.update(extra or {})
    return env


def _cold_once(
    module: str,
    init: str,
    *,
    artifact: Path | None = None,
    extra_env: dict[str, str] | None = None,
    importtime: bool = False,
    python: str = sys.executable,
    runtime: Path | None = None,
) -> tuple[dict[str, float], str, float]:
    code = _COLD_SNIPPET.format(
        module=module,
        init=init,
        artifact_check=f"m.__file__.startswith({str(artifact)!r})" if artifact else "None",
    )
    if artifact is not None:
        # A Lambda-like path: the artifact first, then (for a foreign interpreter) the runtime's boto3.
        path = [str(artifact)] + ([str(runtime)] if runtime else [])
        code = f"import sys; sys.path[:0] = {path!r}\n" + code
    cmd = [python, "-X", "importtime", "-c", code] if importtime else [python, "-c", code]
    started = time.perf_counter()
    done = subprocess.run(
        cmd,
        env=_cold_env(extra_env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tempfile.gettempdir(),
    )
    process = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"cold start of {module} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr, process


RUNTIME_MODULES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "six.py")


def _runtime_python() -> str | None:
    """The Lambda runtime's interpreter (python3.13), through pyenv where that is how it is installed."""
    env = dict(os.environ)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        versions = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True, timeout=20).stdout
        newest = sorted(
            (v for v in versions.split() if v.startswith("3.13.")), key=lambda v: [int(x) for x in v.split(".")]
        )
        if newest:
            env["PYENV_VERSION"] = newest[-1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(
            ["python3.13", "-c", "import sys; print(sys.executable)"],
            capture_output=True,
            text=True,
            env=env,
            timeout=20,
        )
        if found.returncode == 0:
            return found.stdout.strip()
    return None


def _runtime_stand_in(python: str, into: Path) -> Path:
    """boto3 and its dependencies as the Lambda runtime has them: compiled for its Python."""
    import boto3

    site = Path(boto3.__file__).resolve().parent.parent
    for name in RUNTIME_MODULES:
        source = site / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.is_file():
            shutil.copy2(source, into / name)
    subprocess.run([python, "-m", "compileall", "-q", "-j", "0", str(into)], check=True, timeout=600)
    return into


def _direct_imports(importtime_text: str, top: int = 5) -> list[tuple[str, float]]:
    """The modules our code imports directly (and what they pull in), by cumulative import time."""
    entries = []
    for text_line in importtime_text.splitlines():
        if not text_line.startswith("import time:") or "self [us]" in text_line:
            continue
        _, cumulative, name = text_line.split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        entries.append((depth, name.strip(), int(cumulative)))
    found: list[tuple[str, float]] = []
    stack: list[str] = []
    for depth, name, cumulative in reversed(entries):  # post-order reversed = parents first
        del stack[depth:]
        parent = stack[-1] if stack else None
        stack.append(name)
        if not name.startswith("b24_cleanup") and (parent is None or parent.startswith("b24_cleanup")):
            found.append((name, cumulative / 1000))
    found.sort(key=lambda item: -item[1])
    return found[:top]


def _artifact_sizes(build: Path, zipped: bool) -> list[str]:
    notes = []
    for function_dir in sorted(p for p in build.iterdir() if p.is_dir()):
        files = [p for p in function_dir.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        ours = sum(p.stat().st_size for p in files if "b24_cleanup" in p.parts)
        not_lambda = sum(p.stat().st_size for p in files if "b24_cleanup" in p.parts and "ops" in p.parts)
        text = (
            f"{function_dir.name}: {len(files)} files, {size / 2**20:.1f} MiB unpacked, b24_cleanup "
            f"{ours / 1024:.0f} KiB of which {not_lambda / 1024:.0f} KiB never run on Lambda (emulator, sandbox, "
            f"demo, cli); .pyc files: {sum(1 for p in files if p.suffix == '.pyc')}"
        )
        if zipped:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for p in files:
                    archive.write(p, p.relative_to(function_dir))
            text += f"; zipped {len(buffer.getvalue()) / 2**20:.1f} MiB"
        notes.append(text)
    return notes


def measure(sizes: Sizes, runs: int) -> None:
    n = max(runs, sizes.min_runs)
    build = ROOT / ".aws-sam" / "build"
    have_build = build.is_dir() and all((build / d).is_dir() for d in _ARTIFACT_DIRS.values())
    rows: list[list[Any]] = []
    measured: dict[str, tuple[float, float]] = {}
    notes: list[str] = []
    python = _runtime_python() if have_build else None
    scratch = Path(tempfile.mkdtemp(prefix="b24-coldstart-"))
    lambda_like: tuple[str, Path, Path] | None = None
    if python:
        runtime = _runtime_stand_in(python, scratch / "runtime")
        stripped = scratch / "bare"
        for module, directory in _ARTIFACT_DIRS.items():
            shutil.copytree(build / directory, stripped / module, ignore=shutil.ignore_patterns("__pycache__"))
        lambda_like = (python, runtime, stripped)
    for label, module, init in _COLD_TARGETS:
        imports, inits, processes = [], [], []
        for _ in range(n):
            result, _, process = _cold_once(module, init, extra_env={"PYTHONDONTWRITEBYTECODE": "1"})
            imports.append(result["import"])
            inits.append(result["init"])
            processes.append(process)
        artifact_ms: Any = "-"
        bare_ms: Any = "-"
        if lambda_like is not None and module in _ARTIFACT_DIRS:
            # As on Lambda: read-only /var/task (nothing written), the runtime's Python, boto3 from the
            # runtime. Once with the bytecode the build ships, once with it removed.
            python, runtime, stripped = lambda_like
            for variant, artifact in (("shipped", build / _ARTIFACT_DIRS[module]), ("bare", stripped / module)):
                timings = []
                with contextlib.suppress(RuntimeError):
                    for _ in range(n):
                        result, _, _ = _cold_once(
                            module,
                            init,
                            artifact=artifact,
                            python=python,
                            runtime=runtime,
                            extra_env={"PYTHONDONTWRITEBYTECODE": "1"},
                        )
                        if result["artifact"]:
                            timings.append(result["import"] + result["init"])
                value = median(timings) * 1000 if timings else "failed"
                if variant == "shipped":
                    artifact_ms = value
                else:
                    bare_ms = value
        measured[label] = (median(imports), median(inits))
        rows.append(
            [
                label,
                median(imports) * 1000,
                median(inits) * 1000,
                (median(imports) + median(inits)) * 1000,
                median(processes) * 1000,
                artifact_ms,
                bare_ms,
            ]
        )
        if module.startswith("b24_cleanup"):
            _, stderr, _ = _cold_once(module, init, importtime=True, extra_env={"PYTHONDONTWRITEBYTECODE": "1"})
            heavy = ", ".join(f"{name} {ms:.0f}" for name, ms in _direct_imports(stderr))
            notes.append(f"{label} imports (cumulative ms under -X importtime, inflated): {heavy}")
    base = sum(measured[_COLD_TARGETS[-1][0]])
    for row in rows:
        row.insert(4, row[3] / base / 1000)
    notes.insert(
        0,
        "import = the module import (Lambda's INIT phase); first request = the clients and settings the "
        "first request creates lazily; process = the whole fresh interpreter, start to exit.",
    )
    notes.insert(
        1,
        "artifact = import + init from .aws-sam/build/<Function> as on Lambda: python3.13, nothing written "
        "(read-only /var/task), boto3 from a compiled stand-in of the runtime; 'as built' uses the bytecode "
        "functions/Makefile ships, 'no .pyc' the same files with it removed (what the default pip builder ships)."
        + ("" if lambda_like else " (not measured: no .aws-sam/build or no python3.13 here)"),
    )
    shutil.rmtree(scratch, ignore_errors=True)
    if have_build:
        try:
            notes.extend(_artifact_sizes(build, sizes.zip_artifacts))
        except OSError as exc:  # `sam build` rewrote the directory under us
            notes.append(f"artifact sizes not measured: .aws-sam/build changed while reading it ({exc.strerror})")
    else:
        notes.append(
            "no .aws-sam/build here: run `bash .ci/check-template` (cfn-lint, sam validate, sam build) "
            "to measure the artifacts' size and no-.pyc import."
        )
    print_table(
        TITLE,
        f"fresh interpreter per run (subprocess), design §4 env set, median of {n} run(s)",
        [
            "module",
            "import ms",
            "first request ms",
            "import+init ms",
            "vs boto3+client",
            "process ms",
            "artifact as built ms",
            "artifact no .pyc ms",
        ],
        rows,
        notes,
    )
