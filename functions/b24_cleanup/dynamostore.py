"""Portal records in DynamoDB (design §3a), behind the interface of the SSM store.

Past a few thousand portals SSM is the wrong home for the records: ~3 writes/s account-wide,
10,000 standard parameters, and no conditional write. Here each portal is one item,
``{member_id (S), record (S) = the §3 JSON, version (N)}``, and every write is conditional on the
``version`` it read (compare-and-swap): two writers can never silently overwrite each other, the
loser re-reads and decides again. The one-chain rule (design §9) thus holds by the database, not
by narrowing a read-write window.

The app's credentials, declared set and orphan ledger stay in SSM either way: this class is a
:class:`~b24_cleanup.store.PortalStore` whose portal-record methods are the table's, so every
caller (engine, tokens, registration, the CLI) works with either store unchanged.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from .errors import ConfigError, RecordChangedError, TransientError
from .record import PortalRecord, valid_member_id
from .store import BOTO_CONFIG, PortalStore

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_ssm import SSMClient

log = logging.getLogger(__name__)

_TRANSIENT_CODES = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionConflictException",
}
_CONDITION_FAILED = "ConditionalCheckFailedException"
# A CAS loser re-reads and decides again; this many losses in a row means a writer storm that a
# retry of the job (seconds later) settles better than spinning here.
MAX_CAS_ATTEMPTS = 16
SEEN_ITEMS = 1024  # portals whose last-seen item a store keeps (a few MB at most)


def dynamodb_client(config: Config = BOTO_CONFIG) -> DynamoDBClient:
    """A DynamoDB client (store.py's adaptive retries by default); endpoints from the standard AWS variables."""
    region = None if os.environ.get("AWS_DEFAULT_REGION") else os.environ.get("AWS_REGION") or None
    try:
        return boto3.client("dynamodb", config=config, region_name=region)
    except NoRegionError:
        raise ConfigError("no AWS region: set AWS_REGION or AWS_DEFAULT_REGION, or a profile's region") from None


class DynamoPortalStore(PortalStore):
    """Records in the table `table`; the app's parameters under `prefix` in SSM (the base class)."""

    def __init__(
        self,
        prefix: str,
        table: str,
        client: DynamoDBClient | None = None,
        *,
        ssm: SSMClient | None = None,
        kms_key_id: str | None = None,
        config: Config | None = None,
    ) -> None:
        super().__init__(prefix, ssm, kms_key_id=kms_key_id, config=config)
        if not table:
            raise ConfigError("B24_TABLE must name the DynamoDB table of portal records when B24_STORE=dynamodb")
        self.table = table
        self._dynamodb = client
        # The item as this store last read or wrote it, per portal: a modify's first compare-and-swap
        # goes against it instead of a second read (the job has just read the record).
        self._seen: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._seen_lock = threading.Lock()

    def _remember(self, member_id: str, text: str | None, version: int) -> None:
        with self._seen_lock:
            self._seen.pop(member_id, None)
            if text is not None:
                self._seen[member_id] = (text, version)
                while len(self._seen) > SEEN_ITEMS:
                    self._seen.popitem(last=False)

    def _last_seen(self, member_id: str) -> tuple[PortalRecord, int] | None:
        with self._seen_lock:
            seen = self._seen.get(member_id)
        return None if seen is None else (PortalRecord.from_json(seen[0]), seen[1])

    @property
    def dynamodb(self) -> DynamoDBClient:
        if self._dynamodb is None:  # created on first use, not on import (cold start)
            self._dynamodb = dynamodb_client(self._config)
        return self._dynamodb

    def portal_name(self, member_id: str) -> str:
        """Where the record lives, for messages: the table and the key, never a parameter name."""
        if not valid_member_id(member_id):
            raise ValueError("malformed member_id")
        return f"dynamodb:{self.table}/{member_id}"

    @property
    def portals_path(self) -> str:
        return f"dynamodb:{self.table}/"

    # -- raw access ----------------------------------------------------------------------
    def _error(self, exc: Exception, what: str) -> Exception:
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _TRANSIENT_CODES or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
                return TransientError(f"DYNAMODB_{code or 'ERROR'}", what)
            if code == "ResourceNotFoundException":
                return ConfigError(f"DynamoDB table {self.table} not found (B24_TABLE) while {what}")
            return ConfigError(f"DynamoDB {code} while {what}")
        if isinstance(exc, NoCredentialsError):
            return ConfigError("no AWS credentials found (environment, profile or instance role)")
        return TransientError("DYNAMODB_UNREACHABLE", f"{what}: {type(exc).__name__}")

    def _key(self, member_id: str) -> dict[str, Any]:
        if not valid_member_id(member_id):
            raise ValueError("malformed member_id")
        return {"member_id": {"S": member_id}}

    def read(self, member_id: str) -> tuple[PortalRecord | None, int]:
        """The record and its version (0 = no item), read strongly consistent (no cache)."""
        key = self._key(member_id)
        try:
            answer = self.dynamodb.get_item(TableName=self.table, Key=key, ConsistentRead=True)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, f"reading the record of {member_id}") from None
        item = answer.get("Item")
        if not item:
            self._remember(member_id, None, 0)
            return None, 0
        try:
            version = int(item["version"]["N"])
            text = item["record"]["S"]
            record = PortalRecord.from_json(text)
        except (KeyError, ValueError, TypeError):
            raise ConfigError(f"portal record of {member_id} in {self.table} is not a versioned JSON object") from None
        self._remember(member_id, text, version)
        return record, version

    def write(self, member_id: str, record: PortalRecord, expected_version: int) -> int:
        """Store `record` only while the item is at `expected_version` (0: only while absent).

        Returns the new version; raises :class:`RecordChangedError` when another writer won.
        """
        new_version = expected_version + 1
        text = record.to_json()
        args: dict[str, Any] = {
            "TableName": self.table,
            "Item": {**self._key(member_id), "record": {"S": text}, "version": {"N": str(new_version)}},
        }
        if expected_version == 0:
            args["ConditionExpression"] = "attribute_not_exists(member_id)"
        else:
            args.update(_at_version(expected_version))
        self._conditional(self.dynamodb.put_item, args, member_id, "writing")
        self._remember(member_id, text, new_version)
        return new_version

    def _remove(self, member_id: str, expected_version: int | None) -> bool:
        args: dict[str, Any] = {"TableName": self.table, "Key": self._key(member_id), "ReturnValues": "ALL_OLD"}
        if expected_version is not None:
            args.update(_at_version(expected_version))
        answer = self._conditional(self.dynamodb.delete_item, args, member_id, "deleting")
        self._remember(member_id, None, 0)
        return bool(answer.get("Attributes"))

    def _conditional(self, call: Callable[..., Any], args: dict[str, Any], member_id: str, doing: str) -> Any:
        """One conditional item call: RecordChangedError when its condition failed (another writer won)."""
        try:
            return call(**args)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == _CONDITION_FAILED:
                raise RecordChangedError(member_id) from None
            raise self._error(exc, f"{doing} the record of {member_id}") from None
        except BotoCoreError as exc:
            raise self._error(exc, f"{doing} the record of {member_id}") from None

    # -- portal records (the PortalStore interface) ----------------------------------------
    def get(self, member_id: str) -> PortalRecord | None:
        return self.read(member_id)[0]

    def put(self, member_id: str, record: PortalRecord, *, secure: bool = False) -> None:
        """Write the whole record, conditional on the version just read (absent-only if none).

        Whole-record writes mean "this is the record now" (a registration's install, a rotated
        pair): the CAS still makes each write land on a version it saw, so a concurrent writer is
        never overwritten blind between the read and the write. `secure` is the SSM store's: the
        table is encrypted at rest (SSE, the customer's key when given) for every item.
        """
        del secure
        for _ in range(MAX_CAS_ATTEMPTS):
            _, version = self.read(member_id)
            try:
                self.write(member_id, record, version)
                return
            except RecordChangedError:
                continue
        raise TransientError("RECORD_CONTENDED", f"the record of {member_id} kept changing under a write")

    def modify(self, member_id: str, change: Callable[[PortalRecord], bool]) -> PortalRecord | None:
        """Apply `change` to a fresh read and write it back, by compare-and-swap.

        When another writer stores the record between the read and the write, the write fails
        and `change` decides again on the new record (so it must be a pure function of the
        record it is given). Returns the record as written, or as found when `change` declined.
        """
        seen = self._last_seen(member_id)  # as the job just read it: tried first, the swap checks it
        current: PortalRecord | None
        for _ in range(MAX_CAS_ATTEMPTS):
            if seen is not None:
                current, version = seen
                seen = None
                if not change(current):
                    continue  # declined on what may be an old copy: decide on a fresh read
            else:
                current, version = self.read(member_id)
                if current is None or not change(current):
                    return current
            try:
                self.write(member_id, current, version)
                return current
            except RecordChangedError:
                log.info("portal %s: the record changed under a write; deciding again", member_id)
        raise TransientError("RECORD_CONTENDED", f"the record of {member_id} kept changing under a write")

    def create(self, member_id: str, record: PortalRecord) -> bool:
        """Store `record` only if the portal has none; False when one exists (nothing written)."""
        try:
            self.write(member_id, record, 0)
        except RecordChangedError:
            return False
        return True

    def delete_if_token(self, member_id: str, application_token: str) -> bool:
        """Delete only while the `application_token` is still `application_token`, by version."""
        return self.delete_if(
            member_id,
            lambda current: hmac.compare_digest(current.application_token.encode(), (application_token or "").encode()),
        )

    def delete_if(self, member_id: str, condition: Callable[[PortalRecord], bool]) -> bool:
        """Delete the record only if `condition` holds for it, conditional on the version it was read at.

        A write that lands between the read and the delete makes the delete fail; `condition` then
        decides again on the new record (a refresh of the same install still deletes, a reinstall
        does not). False when the record is gone or `condition` declines.
        """
        for _ in range(MAX_CAS_ATTEMPTS):
            current, version = self.read(member_id)
            if current is None or not condition(current):
                return False
            try:
                return self._remove(member_id, version)
            except RecordChangedError:
                log.info("portal %s: the record changed under a delete; deciding again", member_id)
        raise TransientError("RECORD_CONTENDED", f"the record of {member_id} kept changing under a delete")

    def delete(self, member_id: str) -> bool:
        return self._remove(member_id, None)

    def iter_member_ids(self) -> Iterator[str]:
        """Every stored portal's member id: a paginated Scan projecting the key only."""
        paginator = self.dynamodb.get_paginator("scan")
        pages = paginator.paginate(TableName=self.table, ProjectionExpression="member_id")
        try:
            for page in pages:
                for item in page.get("Items", []):
                    member_id = item.get("member_id", {}).get("S", "")
                    if valid_member_id(member_id):
                        yield member_id
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "listing portals") from None


def _at_version(version: int) -> dict[str, Any]:
    """The condition of a compare-and-swap: the item is still at `version`."""
    return {"ConditionExpression": "version = :read", "ExpressionAttributeValues": {":read": {"N": str(version)}}}


def create_table(client: DynamoDBClient, table: str) -> None:
    """The table as template.yaml declares it (key schema, on-demand), for the sandbox and tests."""
    client.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "member_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "member_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
