"""Settings from the environment (SPEC §4), read once per process and validated up front."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .store import PortalStore

DEFAULT_GRACE_DAYS = 7
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


@dataclass(frozen=True)
class Settings:
    ssm_prefix: str
    queue_url: str | None = None
    oauth_url: str | None = None
    dry_run: bool = False
    revoked_grace_days: int = DEFAULT_GRACE_DAYS
    accept_install: bool = False
    ssm_kms_key_id: str | None = None  # B24_SSM_KMS_KEY_ID: key for *new* records (overwrites keep theirs)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        prefix = env.get("B24_SSM_PREFIX", "").strip().rstrip("/")
        if not prefix.startswith("/") or len(prefix) < 2:
            raise ConfigError("B24_SSM_PREFIX must be set to an absolute SSM path such as /b24-cleanup/prod")
        grace_text = env.get("B24_REVOKED_GRACE_DAYS", "").strip() or str(DEFAULT_GRACE_DAYS)
        try:
            grace = int(grace_text)
        except ValueError:
            raise ConfigError(f"B24_REVOKED_GRACE_DAYS must be a whole number of days, not {grace_text!r}") from None
        if grace < 0:
            raise ConfigError("B24_REVOKED_GRACE_DAYS must not be negative")
        return cls(
            ssm_prefix=prefix,
            queue_url=env.get("B24_QUEUE_URL", "").strip() or None,
            oauth_url=env.get("B24_OAUTH_URL", "").strip() or None,
            dry_run=_flag(env, "B24_DRY_RUN"),
            revoked_grace_days=grace,
            accept_install=_flag(env, "B24_ACCEPT_INSTALL"),
            ssm_kms_key_id=env.get("B24_SSM_KMS_KEY_ID", "").strip() or None,
        )

    def store(self) -> PortalStore:
        """The SSM store these settings name."""
        from .store import PortalStore

        return PortalStore(self.ssm_prefix, kms_key_id=self.ssm_kms_key_id)

    def require_queue(self) -> str:
        if not self.queue_url:
            raise ConfigError("B24_QUEUE_URL must be set to the portal job queue's URL")
        return self.queue_url
