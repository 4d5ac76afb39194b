"""One exception tree (errors.py): a single root, `*Error` names, every public one defined there."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from b24_cleanup import errors

PACKAGE = Path(__file__).resolve().parents[2] / "functions" / "b24_cleanup"
PRIVATE_SIGNALS = {
    "handlers/endpoint.py": {"Rejected", "Unavailable"},
    "client.py": {"Redirected"},
    # requests' own exception family (so that code handling requests' errors handles them too);
    # the client and the OAuth client turn them into TransientError at once.
    "transport.py": {"AnswerTooSlowError", "AnswerTooLargeError"},
}


def _public_exceptions() -> list[type[BaseException]]:
    return [
        obj
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_")
    ]


def test_every_public_exception_derives_from_the_root_and_is_named_error() -> None:
    found = _public_exceptions()
    assert len(found) >= 19  # the tree drawn in errors.py
    for exc in found:
        assert issubclass(exc, errors.B24CleanupError), exc
        assert exc.__name__.endswith("Error"), exc


def test_no_core_or_handler_module_defines_a_public_exception_outside_errors() -> None:
    """Module-private control flow may stay where it is used, as long as it never escapes: the endpoint's
    `Rejected`/`Unavailable` (turned into answers) and the client's `Redirected` (a 3xx signal from one
    send to its caller), transport's two limits (requests exceptions, turned into TransientError by their
    callers). ops/ (operator code: CliError, the emulator's ApiError) is outside the shipped tree."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "ops" or relative.name == "errors.py":
            continue
        private = PRIVATE_SIGNALS.get(str(relative), set())
        classes = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)]
        offenders += [
            f"{relative}:{node.name}"
            for node in classes
            if not node.name.startswith("_")
            and node.name not in private
            and any(ast.unparse(base).split(".")[-1].endswith(("Error", "Exception")) for base in node.bases)
        ]
    assert offenders == []


@pytest.mark.parametrize(
    ("exc", "builtin"),
    [
        (errors.PayloadError, ValueError),
        (errors.RegistrationInvalidError, ValueError),
        (errors.InvalidJobError, ValueError),
        (errors.PortalNotFoundError, LookupError),
    ],
)
def test_the_builtin_bases_callers_relied_on_are_kept(exc: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(exc, builtin)


def test_config_error_and_the_declared_set_error_are_under_the_root() -> None:
    assert issubclass(errors.InvalidDeclaredSetError, errors.ConfigError)
    assert issubclass(errors.ConfigError, errors.B24CleanupError)
    assert issubclass(errors.RegistrationInvalidError, errors.PayloadError)
    assert issubclass(errors.PayloadTooLargeError, errors.PayloadError)


def test_the_app_side_calls_document_what_they_raise() -> None:
    from b24_cleanup.access import TokenAccess
    from b24_cleanup.registration import register

    for call in (TokenAccess.get, TokenAccess.after_expired, register):
        doc = inspect.getdoc(call) or ""
        assert "Raises:" in doc, call
        assert "Error" in doc.split("Raises:", 1)[1], call
