"""The SSM Parameter Store layout of design §3: portal records, app credentials, declared set.

The portal record is the portal's only token store (design §9), so reads are never cached and
every write keeps the parameter's type, KMS key and tier. SSM has no conditional writes: the
guarded delete re-reads and compares the `application_token` right before deleting, and a
change (`modify`) that overwrote another writer's record by the version it got back writes
that record again (`PortalStore._mend`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from . import logsafety  # noqa: F401 - imported for its effect: no secrets in DEBUG logs
from .errors import ConfigError, MovedRecordError, TransientError, UnreadableRecordError
from .pacing import LeakyBucket
from .record import PortalRecord, valid_member_id

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

# SSM allows ~40 reads/s and a few writes/s per account: throttling is normal at scale, and
# botocore's adaptive mode both retries and slows the caller down (design §11.4).
BOTO_CONFIG = Config(retries={"mode": "adaptive", "max_attempts": 10}, connect_timeout=5, read_timeout=10)
# The endpoint answers Bitrix24 inside its own 25 s timeout. Forged requests are free to send and each
# costs one GetParameter, so a flood throttles SSM: the endpoint's clients try three times in all,
# briefly (throttled: a few seconds a call, standard backoff), start no attempt after the request's
# deadline (:func:`stop_at`), and the request is answered 503, never left to a platform timeout
# (design §5). No adaptive mode: its client-side rate limiter is what held one request ~84 s.
ENDPOINT_BOTO_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 3}, connect_timeout=1, read_timeout=2)


def stop_at(client: Any, deadline: Callable[[], float | None]) -> Any:
    """Make `client` start no attempt (first or retry) once `deadline()` (time.monotonic) has passed.

    botocore has no total limit for a call; this bounds one at the deadline plus one attempt.
    """

    def check(**_: Any) -> None:
        limit = deadline()
        if limit is not None and time.monotonic() >= limit:
            raise TransientError("AWS_OUT_OF_TIME", "no time left for another AWS attempt")

    client.meta.events.register("before-send.*.*", check, unique_id="b24-cleanup-stop-at")
    return client


# Writes go through a client of their own: the caller (tokens.persist) retries them within the time
# it has, so botocore gets few attempts and no client-side limiter (the WritePacer paces instead; an
# adaptive limiter slowed by write throttling would also slow every read of a shared client).
WRITE_BOTO_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=3, read_timeout=5)

_T = TypeVar("_T")

log = logging.getLogger(__name__)

# A write that replaced another writer's is mended by writing that record again (PortalStore._mend);
# this many mends in a row means a writer storm, which the job's retry settles better.
MAX_MENDS = 8

_THROTTLE_CODES = {"ThrottlingException", "TooManyUpdates", "InternalServerError", "ServiceUnavailable"}


def ssm_client(config: Config = BOTO_CONFIG) -> SSMClient:
    """An SSM client (adaptive retries by default); endpoints come from the standard AWS variables."""
    # botocore reads AWS_DEFAULT_REGION or a profile; AWS_REGION (what Lambda and most tools set)
    # is honoured as a fallback so that the CLI behaves like the AWS CLI v2.
    region = None if os.environ.get("AWS_DEFAULT_REGION") else os.environ.get("AWS_REGION") or None
    try:
        return boto3.client("ssm", config=config, region_name=region)
    except NoRegionError:
        raise ConfigError("no AWS region: set AWS_REGION or AWS_DEFAULT_REGION, or a profile's region") from None


MOVED_TO = "moved_to"


def tombstone(table: str) -> str:
    """What `migrate --to dynamodb` leaves in a moved record's parameter (design §3a): no tokens."""
    return json.dumps({MOVED_TO: "dynamodb", "table": table}, separators=(",", ":"))


def is_tombstone(text: str) -> bool:
    """True for a moved record's parameter value (a JSON object naming where it went)."""
    if MOVED_TO not in text:
        return False
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return isinstance(data, dict) and MOVED_TO in data


@dataclass(frozen=True)
class AppCredentials:
    client_id: str
    client_secret: str

    def __repr__(self) -> str:
        return f"AppCredentials(client_id={self.client_id!r})"


def write_pacer(rate: float, **clock: Any) -> LeakyBucket:
    """The bucket SSM writes of one process wait on (design §5 step 3): `rate` a second, one second banked.

    SSM takes a few PutParameter a second per account; the workers share `B24_SSM_WRITE_RATE` and
    each container takes `rate ÷ B24_WORKER_CONCURRENCY`. Paced, the nightly refreshes do not
    throttle themselves into losing rotated pairs. A container writes in bursts (a batch's
    refreshes land together, then its REST calls leave the writes idle for a second or more), so
    strict spacing would leave part of its share unspent every batch; banking one second of it
    recovers that. The bank is one second of the share even below one write a second (a first
    write then waits for its fraction): the containers' banks add up to one second of the whole
    rate, the burst SSM's own bucket is modelled with (ops/quota.py), so a fleet whose pauses
    line up still stays within what SSM admits. Containers that start together would also write
    together, slot for slot, all night: each starts at a random point of its first write interval.
    `clock` takes the bucket's clock and sleep (tests).
    """
    if not rate > 0:
        raise ValueError("a write pacer needs a positive rate")
    return LeakyBucket(rate, rate * 1.0, level=random.random(), **clock)


@dataclass(frozen=True)
class _ParamMeta:
    type: str
    key_id: str | None
    tier: str


def _aws_error(exc: Exception, what: str) -> Exception:
    """Throttling and 5xx from SSM are transient (the job is retried); the rest is a bug or config."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _THROTTLE_CODES or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
            return TransientError(f"SSM_{code or 'ERROR'}", what)
        return ConfigError(f"SSM {code} while {what}")
    if isinstance(exc, NoCredentialsError):
        return ConfigError("no AWS credentials found (environment, profile or instance role)")
    return TransientError("SSM_UNREACHABLE", f"{what}: {type(exc).__name__}")


def _unless_missing(call: Callable[[], _T], what: str) -> _T | None:
    """`call()`, or None when SSM answers that the parameter (or the version asked for) does not exist;
    any other failure as :func:`_aws_error`."""
    try:
        return call()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("ParameterNotFound", "ParameterVersionNotFound"):
            return None
        raise _aws_error(exc, what) from None
    except BotoCoreError as exc:
        raise _aws_error(exc, what) from None


def _record_of(member_id: str, text: str) -> PortalRecord:
    """A stored portal record; a moved or unreadable one raises (design §3a, §9)."""
    if is_tombstone(text):
        raise MovedRecordError(member_id, text)
    try:
        return PortalRecord.from_json(text)
    except (ValueError, RecursionError):
        raise UnreadableRecordError(f"portal record of {member_id} is not a JSON object") from None


class PortalStore:
    """Records under `{prefix}/portals/{member_id}` and the app's parameters under `{prefix}/app/`."""

    def __init__(
        self,
        prefix: str,
        client: SSMClient | None = None,
        *,
        kms_key_id: str | None = None,
        write_rate: float | None = None,
        config: Config | None = None,
    ) -> None:
        prefix = (prefix or "").rstrip("/")
        if not prefix.startswith("/") or len(prefix) < 2:
            raise ConfigError("B24_SSM_PREFIX must be an absolute SSM path such as /b24-cleanup/prod")
        self.prefix = prefix
        self._client = client
        # An injected client serves the writes too (tests watch or fault one client).
        self._writer: SSMClient | None = client
        self.kms_key_id = kms_key_id  # for new parameters only: an overwrite keeps the key it finds
        self.pacer = write_pacer(write_rate) if write_rate else None  # SSM writes/s of this process
        self._held = threading.local()  # a write slot a thread took ahead (write_slot)
        # For the clients made on first use; a caller's own config (the endpoint's) serves the writes too.
        self._config = config or BOTO_CONFIG
        self._write_config = config or WRITE_BOTO_CONFIG

    @property
    def client(self) -> SSMClient:
        if self._client is None:  # created on first use, not on import (cold start)
            self._client = ssm_client(self._config)
        return self._client

    @property
    def writer(self) -> SSMClient:
        """The client of the SSM writes (and their DescribeParameters): bounded retries, see WRITE_BOTO_CONFIG."""
        if self._writer is None:
            self._writer = ssm_client(self._write_config)
        return self._writer

    def clients(self) -> tuple[SSMClient, ...]:
        """Every SSM client this store uses (to watch or fault them all)."""
        return (self.client,) if self.writer is self.client else (self.client, self.writer)

    def _pace(self) -> None:
        """Take a write slot. Before the fresh read a write depends on, so that the read is as
        fresh as it can be when the write goes out (the wait can be seconds at the quota)."""
        if getattr(self._held, "slot", False):
            self._held.slot = False  # the slot this thread holds serves this write
            return
        if self.pacer is not None:
            self.pacer.acquire()

    @contextmanager
    def write_slot(self) -> Iterator[None]:
        """Hold the next write slot for the first write this thread makes inside the block.

        A refresh takes it before it spends the refresh token (design §5 step 3): the rotated pair
        is then stored as soon as the OAuth server answers, not a pacer wait later (seconds at the
        quota, a window in which a timeout loses the chain), and the OAuth round trip overlaps the
        wait for the slot instead of lengthening the pauses between a container's writes.
        """
        self._pace()
        self._held.slot = True
        try:
            yield
        finally:
            self._held.slot = False

    # -- names ---------------------------------------------------------------------------
    @property
    def portals_path(self) -> str:
        return f"{self.prefix}/portals/"

    def portal_name(self, member_id: str) -> str:
        if not valid_member_id(member_id):
            raise ValueError("malformed member_id")
        return f"{self.portals_path}{member_id}"

    # -- raw access ----------------------------------------------------------------------
    def _get(self, name: str, *, decrypt: bool) -> str | None:
        seen = self._read(name, decrypt=decrypt)
        return None if seen is None else seen[0]

    def _read(self, name: str, *, decrypt: bool = True) -> tuple[str, int] | None:
        """The parameter's value and version (`name` may select one, as ``name:3``), or None."""
        answer = _unless_missing(
            lambda: self.client.get_parameter(Name=name, WithDecryption=decrypt), f"reading {name}"
        )
        if answer is None:
            return None
        return answer["Parameter"]["Value"], int(answer["Parameter"].get("Version", 0))

    def _replaced(self, name: str, version: int) -> str | None:
        """The value that the write SSM numbered `version` replaced (None: it created the parameter)."""
        before = self._read(f"{name}:{version - 1}") if version > 1 else None
        return None if before is None else before[0]

    def _meta(self, name: str) -> _ParamMeta | None:
        try:
            answer = self.writer.describe_parameters(
                ParameterFilters=[{"Key": "Name", "Option": "Equals", "Values": [name]}]
            )
        except (ClientError, BotoCoreError) as exc:
            raise _aws_error(exc, f"describing {name}") from None
        for param in answer.get("Parameters", []):
            if param.get("Name") == name:
                return _ParamMeta(param.get("Type", "SecureString"), param.get("KeyId"), param.get("Tier", "Standard"))
        return None

    def _put(self, name: str, value: str, meta: _ParamMeta | None, *, secure: bool = False) -> int:
        """Overwrite the parameter; returns the version SSM gave this write."""
        args: dict[str, Any] = {"Name": name, "Value": value, "Overwrite": True}
        if meta is None:
            args["Type"] = "SecureString"
            if self.kms_key_id:
                args["KeyId"] = self.kms_key_id
        else:
            # Without KeyId an overwrite would silently move to the default aws/ssm key, and a
            # Standard tier on an Advanced parameter fails: keep what the operator chose.
            args["Type"] = "SecureString" if secure else meta.type
            args["Tier"] = meta.tier
            if args["Type"] == "SecureString" and meta.key_id:
                args["KeyId"] = meta.key_id
        try:
            answer = self.writer.put_parameter(**args)
        except (ClientError, BotoCoreError) as exc:
            raise _aws_error(exc, f"writing {name}") from None
        return int(answer.get("Version", 0))

    # -- portal records -----------------------------------------------------------------
    def get(self, member_id: str) -> PortalRecord | None:
        """The portal's record, read fresh (no cache), or None when there is none."""
        text = self._get(self.portal_name(member_id), decrypt=True)
        return None if text is None else _record_of(member_id, text)

    def put(self, member_id: str, record: PortalRecord, *, secure: bool = False) -> None:
        """Write the whole record, keeping the parameter's type, KMS key and tier.

        `secure` forces SecureString (registration stores tokens only encrypted, design §9).
        """
        self._pace()
        self._write(member_id, record, secure=secure)

    def _write(self, member_id: str, record: PortalRecord, *, secure: bool = False) -> None:
        """Write the record (a write slot already taken)."""
        name = self.portal_name(member_id)
        self._put(name, record.to_json(), self._meta(name), secure=secure)

    def modify(self, member_id: str, change: Callable[[PortalRecord], bool]) -> PortalRecord | None:
        """Apply `change` to a fresh read of the record and write it back if `change` says so.

        For edits of one field (a mark, an address, a rotated pair): whatever another writer stored
        meanwhile (a refreshed pair, a reinstall) is kept. SSM has no conditional write, so a write
        can still land between the read and the put; the put's version then shows it, and
        :meth:`_mend` puts back what was overwritten, with `change` applied again where it still
        applies. `change` must decide on the record alone: it may be called more than once.
        """
        self._pace()
        name = self.portal_name(member_id)
        meta = self._meta(name)  # before the read: the read-to-put window is one round trip
        seen = self._read(name)
        if seen is None:
            return None
        current = _record_of(member_id, seen[0])
        if not change(current):
            return current
        return self._mend(member_id, current, seen[1], self._put(name, current.to_json(), meta), change, meta)

    def _mend(
        self,
        member_id: str,
        written: PortalRecord,
        read: int,
        version: int,
        change: Callable[[PortalRecord], bool],
        meta: _ParamMeta | None,
    ) -> PortalRecord | None:
        """Undo a lost update: `written` (a change to version `read`) went out as `version`.

        Any other number than ``read + 1`` means other writes landed after the read, and this one
        replaced the newest of them, ``version - 1``, which may hold the only copy of a rotated
        pair. That record is written again, with `change` applied if it still applies to it, and
        the check repeats on that write. Version 1 means the record was deleted after the read:
        this write is deleted again, as a conditional write would not have made it. A replaced
        tombstone is left to the migration's final pass, which moves what this write stored
        (design §3a).
        """
        name = self.portal_name(member_id)
        mends = 0
        while read and version != read + 1:
            if version == 1:
                log.warning("portal %s: the record was deleted while it changed; it stays deleted", member_id)
                self._delete(member_id)
                return None
            replaced = self._replaced(name, version)
            # Also when it replaced itself: an attempt whose reply was lost, sent again by botocore.
            if replaced is None or is_tombstone(replaced) or replaced == written.to_json():
                return written
            if mends == MAX_MENDS:
                raise TransientError("SSM_CONTENDED", f"the record of {member_id} kept changing under its writes")
            mends += 1
            log.warning("portal %s: another write landed between a read and its write; putting it back", member_id)
            written = _record_of(member_id, replaced)
            change(written)  # applied again where it still applies; either way the other write is kept
            # Put back at once: no key lookup and no wait for the pacer (at the quota a slot can be
            # seconds away, all of it a window for readers of the spent pair; mends are rare).
            read, version = version, self._put(name, written.to_json(), meta)
        return written

    def delete_if_token(self, member_id: str, application_token: str) -> bool:
        """Delete the record only while its `application_token` still equals `application_token`.

        Returns False (and deletes nothing) when the record is gone or belongs to a newer install.
        """
        return self.delete_if(
            member_id,
            lambda current: hmac.compare_digest(current.application_token.encode(), (application_token or "").encode()),
        )

    def delete_if(self, member_id: str, condition: Callable[[PortalRecord], bool]) -> bool:
        """Delete the record only if `condition` holds for a fresh read of it.

        False (nothing deleted) when the record is gone or `condition` declines. SSM has no
        conditional delete: the window is one read-delete round trip (the DynamoDB store closes it).
        """
        self._pace()
        current = self.get(member_id)
        if current is None or not condition(current):
            return False
        return self._delete(member_id)

    def delete(self, member_id: str) -> bool:
        self._pace()
        return self._delete(member_id)

    def _delete(self, member_id: str) -> bool:
        name = self.portal_name(member_id)
        gone = _unless_missing(lambda: self.writer.delete_parameter(Name=name), f"deleting the record of {member_id}")
        return gone is not None  # None: there was no record to delete

    def iter_member_ids(self) -> Iterator[str]:
        """Every stored portal's member id, page by page, without decrypting anything."""
        paginator = self.client.get_paginator("describe_parameters")
        pages = paginator.paginate(
            ParameterFilters=[{"Key": "Path", "Option": "OneLevel", "Values": [self.portals_path.rstrip("/")]}],
            PaginationConfig={"PageSize": 50},
        )
        try:
            for page in pages:
                for param in page.get("Parameters", []):
                    member_id = param["Name"].rsplit("/", 1)[-1]
                    if valid_member_id(member_id):
                        yield member_id
        except (ClientError, BotoCoreError) as exc:
            raise _aws_error(exc, "listing portals") from None

    # -- the app's parameters -----------------------------------------------------------
    def app_credentials(self) -> AppCredentials:
        name = f"{self.prefix}/app/credentials"
        text = self._get(name, decrypt=True)
        if text is None:
            raise ConfigError(f"app credentials are missing: put {{client_id, client_secret}} at {name}")
        try:
            data = json.loads(text)
            creds = AppCredentials(str(data["client_id"]), str(data["client_secret"]))
        except (ValueError, TypeError, KeyError):
            raise ConfigError(f"app credentials at {name} are not {{client_id, client_secret}} JSON") from None
        if not creds.client_id or not creds.client_secret:
            raise ConfigError(f"app credentials at {name} have an empty client_id or client_secret")
        return creds

    def declared_set_text(self) -> str | None:
        """The raw declared handler set, or None when the parameter is missing."""
        return self._get(f"{self.prefix}/app/handlers", decrypt=False)

    def put_text(self, name: str, value: str, *, tier: str = "Standard") -> None:
        """Overwrite (or create) the plain String parameter `name`: paced, on the write client.

        For the app's own bookkeeping that holds no secret (the orphan ledger): its type and tier
        are the caller's, never read back first, and no KMS key applies to a String.
        """
        self._pace()
        self._put(name, value, _ParamMeta("String", None, tier))
