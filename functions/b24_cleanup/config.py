"""Settings from the environment (design §4), read once per process and validated up front."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from botocore.config import Config

    from .store import PortalStore

DEFAULT_GRACE_DAYS = 7
# design §4: SSM's PutParameter quota (about 3/s per account and region) and the template's default
# MaximumConcurrency; the sweep shards over at most 30 nights so every refresh token is used well
# within its 180 days.
DEFAULT_SSM_WRITE_RATE = 3.0
DEFAULT_WORKER_CONCURRENCY = 5
MAX_SWEEP_EVERY_NIGHTS = 30
STORES = ("ssm", "dynamodb")
DEFAULT_ORPHAN_GRACE_DAYS = 2
# A grace longer than SSM keeps the declared set's history (100 versions) is rarely meaningful,
# but a year is the most that is still plausibly a decision rather than a typo.
MAX_ORPHAN_GRACE_DAYS = 365
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _number(env: Mapping[str, str], name: str, default: float, *, whole: bool = False) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{name} must be {kind}, not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name} must be a positive number, not {text!r}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def _days(env: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    text = env.get(name, "").strip() or str(default)
    try:
        days = int(text)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number of days, not {text!r}") from None
    if not 0 <= days <= maximum:
        raise ConfigError(f"{name} must be between 0 and {maximum} days, not {days}")
    return days


@dataclass(frozen=True)
class Settings:
    ssm_prefix: str
    queue_url: str | None = None
    oauth_url: str | None = None
    dry_run: bool = False
    revoked_grace_days: int = DEFAULT_GRACE_DAYS
    accept_install: bool = False
    ssm_kms_key_id: str | None = None  # B24_SSM_KMS_KEY_ID: key for *new* records (overwrites keep theirs)
    store_kind: str = "ssm"  # B24_STORE
    table: str | None = None  # B24_TABLE
    ssm_write_rate: float = DEFAULT_SSM_WRITE_RATE  # B24_SSM_WRITE_RATE, all workers together
    worker_concurrency: int = DEFAULT_WORKER_CONCURRENCY  # B24_WORKER_CONCURRENCY
    sweep_every_nights: int = 1  # B24_SWEEP_EVERY_NIGHTS
    orphan_grace_days: int = DEFAULT_ORPHAN_GRACE_DAYS  # design §3 held orphans; 0 = at once

    @property
    def ssm_write_share(self) -> float:
        """The SSM writes/s one worker container may spend: its share of the account's budget."""
        return self.ssm_write_rate / self.worker_concurrency

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
        store_kind = env.get("B24_STORE", "").strip().lower() or "ssm"
        if store_kind not in STORES:
            raise ConfigError(f"B24_STORE must be ssm or dynamodb, not {store_kind!r}")
        table = env.get("B24_TABLE", "").strip() or None
        if store_kind == "dynamodb" and not table:
            raise ConfigError("B24_TABLE must name the DynamoDB table of portal records when B24_STORE=dynamodb")
        every = int(_number(env, "B24_SWEEP_EVERY_NIGHTS", 1, whole=True))
        if every > MAX_SWEEP_EVERY_NIGHTS:
            raise ConfigError(f"B24_SWEEP_EVERY_NIGHTS must be at most {MAX_SWEEP_EVERY_NIGHTS}, not {every}")
        orphan_grace = _days(env, "B24_ORPHAN_GRACE_DAYS", DEFAULT_ORPHAN_GRACE_DAYS, MAX_ORPHAN_GRACE_DAYS)
        return cls(
            ssm_prefix=prefix,
            queue_url=env.get("B24_QUEUE_URL", "").strip() or None,
            oauth_url=env.get("B24_OAUTH_URL", "").strip() or None,
            dry_run=_flag(env, "B24_DRY_RUN"),
            revoked_grace_days=grace,
            accept_install=_flag(env, "B24_ACCEPT_INSTALL"),
            ssm_kms_key_id=env.get("B24_SSM_KMS_KEY_ID", "").strip() or None,
            store_kind=store_kind,
            table=table,
            ssm_write_rate=_number(env, "B24_SSM_WRITE_RATE", DEFAULT_SSM_WRITE_RATE),
            worker_concurrency=int(_number(env, "B24_WORKER_CONCURRENCY", DEFAULT_WORKER_CONCURRENCY, whole=True)),
            sweep_every_nights=every,
            orphan_grace_days=orphan_grace,
        )

    def store(self, boto_config: Config | None = None) -> PortalStore:
        """The store these settings name: portal records in SSM, or in the DynamoDB table (design §3a).

        Its AWS clients are made with `boto_config` (default: store.BOTO_CONFIG, adaptive retries).
        """
        if self.store_kind == "dynamodb" and self.table:
            from .dynamostore import DynamoPortalStore

            return DynamoPortalStore(self.ssm_prefix, self.table, kms_key_id=self.ssm_kms_key_id, config=boto_config)
        from .store import PortalStore

        return PortalStore(
            self.ssm_prefix, kms_key_id=self.ssm_kms_key_id, write_rate=self.ssm_write_share, config=boto_config
        )

    def require_queue(self) -> str:
        if not self.queue_url:
            raise ConfigError("B24_QUEUE_URL must be set to the portal job queue's URL")
        return self.queue_url
