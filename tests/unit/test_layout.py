"""The shipping boundary: what Lambda runs never imports what only operators run.

functions/Makefile drops `b24_cleanup/ops` from the artifact, so an import of it from the core
or a handler would be a ModuleNotFoundError on Lambda. Read every module's imports (including
ones inside functions) and make sure none outside ops/ reaches into it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "functions" / "b24_cleanup"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of every module `path` (named `module`) imports, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (module or _module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_outside_ops_imports_from_ops() -> None:
    offenders = {
        _module_name(path): sorted(n for n in _imported(path) if n.split(".")[:2] == ["b24_cleanup", "ops"])
        for path in PACKAGE.rglob("*.py")
        if "ops" not in path.relative_to(PACKAGE).parts
    }
    offenders = {module: names for module, names in offenders.items() if names}
    assert offenders == {}, f"Lambda code imports operator-only modules: {offenders}"


def test_the_checker_sees_relative_and_nested_imports(tmp_path: Path) -> None:
    """The reader above must catch the forms an accidental import takes, or it proves nothing."""
    fake = tmp_path / "x.py"
    fake.write_text(
        "import b24_cleanup.ops.sandbox\nfrom ..ops import demo\n\ndef f():\n    from ..ops.emulator import Emulator\n"
    )
    names = _imported(fake, "b24_cleanup.handlers.x")
    assert {"b24_cleanup.ops.sandbox", "b24_cleanup.ops", "b24_cleanup.ops.demo", "b24_cleanup.ops.emulator"} <= names


def test_ops_is_the_only_operator_code() -> None:
    """The modules that need moto, the emulator or a terminal all live under ops/."""
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert not top & {"cli", "demo", "sandbox", "functionurl"}
    assert not (PACKAGE / "emulator").exists()
    assert (PACKAGE / "ops" / "emulator").is_dir()


def test_operator_only_libraries_are_imported_only_by_ops() -> None:
    """rich (progress) and moto (demo, local world) are not in the Lambda artifact's requirements."""
    operator_only = {"rich", "moto"}
    offenders = {
        _module_name(path): sorted(n for n in _imported(path) if n.split(".")[0] in operator_only)
        for path in PACKAGE.rglob("*.py")
        if "ops" not in path.relative_to(PACKAGE).parts
    }
    offenders = {module: names for module, names in offenders.items() if names}
    assert offenders == {}, f"Lambda code imports operator-only libraries: {offenders}"
    requirements = (PACKAGE.parent / "requirements.txt").read_text().lower()
    assert not any(line.split("=")[0].strip() in operator_only for line in requirements.splitlines())
