"""The suite's plugins: every shared fixture and helper has one definition, in tests/fixtures/, and the
session-wide leak guard is tests/leakguard.py (its docstring says why it exists).

- fixtures.aws: moto account (`mock_aws`), `lambda_context`, `stdout`/`emf`, `api_calls`, sample events,
  and the autouse fixtures that give every test fake AWS credentials and fresh Powertools state;
- fixtures.sandbox: `box` (the emulator and moto, configured by the `box` marker), `handler_env`, the
  handler URLs and the engine options (FAST, PATIENT, SHORT_TIMEOUTS);
- fixtures.template: the `template` fixture and `load_template`;
- leakguard: fails the session when a test leaked a secret any emulator issued (design §7);
- pytester: for the test that proves the leak guard fails a leaking run.

Tests import helpers from those modules. The names below are re-exported because `from conftest import`
was the way to reach them before the split.
"""

from __future__ import annotations

import pytest

# The re-exports below import the plugins before pytest does: have their asserts rewritten all the same.
pytest.register_assert_rewrite("fixtures", "leakguard")

from fixtures.aws import (  # noqa: E402, F401 - re-exported for `from conftest import ...`
    APPLICATION_TOKEN,
    DECLARED_SET,
    EVENTS,
    MEMBER_ID,
    PREFIX,
    QUEUE_NAME,
    REGION,
    ROOT,
    ApiCalls,
    AwsAccount,
    FakeLambdaContext,
    Stdout,
    load_event,
)
from leakguard import emulator_secrets, find_secrets  # noqa: E402, F401 - re-exported for `from conftest import ...`

pytest_plugins = ["fixtures.aws", "fixtures.sandbox", "fixtures.template", "leakguard", "pytester"]
