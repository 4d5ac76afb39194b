"""A REST command as the client sends it, and its answer (design §10.9).

Its own small module so that the planner, which builds commands, and the scheduler, which imports
the planner for the declared set, stay free of the HTTP client and its imports (a cold start pays
for every module).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from .errors import B24Error


@dataclass(frozen=True)
class Command:
    """One REST call, ready for `PortalClient.batch` under `key`.

    `key` is never a digit string: numeric keys turn the answer's sections into lists (reference
    §9). `params` hold strings only, because batch commands travel as query strings. `alone`: the
    command must be a single call of its own, never a `batch` sub-command (design §5 step 5: a
    sub-command's `auth_connector` is not read, the batch's auth data is).
    """

    key: str
    method: str
    params: Mapping[str, str] = field(hash=False)
    alone: bool = False

    def batch_query(self) -> str:
        """The command as a `batch` `cmd` value: `method?a=...&b=...` (encoded once)."""
        return f"{self.method}?{urlencode(dict(self.params))}"


@dataclass(frozen=True)
class CommandResult:
    """One command's answer: its `result`, or its classified error, or not attempted at all."""

    value: Any = None
    error: B24Error | None = None
    attempted: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None and self.attempted
