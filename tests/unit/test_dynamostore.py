"""The DynamoDB record store (design §3a) on moto: item layout, compare-and-swap, guarded delete, Scan."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from b24_cleanup.dynamostore import MAX_CAS_ATTEMPTS, DynamoPortalStore, create_table
from b24_cleanup.errors import ConfigError, RecordChangedError, TransientError
from b24_cleanup.ops.atomic import atomic_moto
from b24_cleanup.record import PortalRecord
from b24_cleanup.store import PortalStore

PREFIX = "/b24-cleanup/test"
TABLE = "portals"


@pytest.fixture
def aws() -> Iterator[tuple[Any, Any]]:
    with mock_aws():
        dynamodb = boto3.client("dynamodb", region_name="us-east-1")
        ssm = boto3.client("ssm", region_name="us-east-1")
        create_table(dynamodb, TABLE)
        yield dynamodb, ssm


@pytest.fixture
def store(aws: tuple[Any, Any]) -> DynamoPortalStore:
    dynamodb, ssm = aws
    return DynamoPortalStore(PREFIX, TABLE, dynamodb, ssm=ssm)


def record(member_id: str = "m1", **extra: object) -> PortalRecord:
    return PortalRecord({"member_id": member_id, "application_token": "app-1", "refresh_token": "r", **extra})


def item(aws: tuple[Any, Any], member_id: str = "m1") -> dict[str, Any]:
    return aws[0].get_item(TableName=TABLE, Key={"member_id": {"S": member_id}}, ConsistentRead=True).get("Item", {})


def test_is_a_portal_store_and_needs_a_table(aws: tuple[Any, Any]) -> None:
    assert isinstance(DynamoPortalStore(PREFIX, TABLE), PortalStore)
    with pytest.raises(ConfigError, match="B24_TABLE"):
        DynamoPortalStore(PREFIX, "")


def test_item_is_member_id_record_json_and_version(store: DynamoPortalStore, aws: tuple[Any, Any]) -> None:
    store.put("m1", record(custom={"a": 1}))
    stored = item(aws)
    assert set(stored) == {"member_id", "record", "version"}
    assert stored["member_id"] == {"S": "m1"}
    assert json.loads(stored["record"]["S"])["custom"] == {"a": 1}
    assert stored["version"] == {"N": "1"}
    store.put("m1", record(access_token="new"))
    assert item(aws)["version"] == {"N": "2"}
    assert store.get("m1").access_token == "new"
    assert store.get("nobody") is None


def test_no_portal_record_reaches_ssm(store: DynamoPortalStore, aws: tuple[Any, Any]) -> None:
    store.put("m1", record())
    store.modify("m1", lambda r: r.data.update(x=1) is None)
    assert aws[1].get_parameters_by_path(Path="/", Recursive=True)["Parameters"] == []


def test_write_is_conditional_on_the_version_read(store: DynamoPortalStore) -> None:
    assert store.write("m1", record(), 0) == 1
    with pytest.raises(RecordChangedError):
        store.write("m1", record(n=2), 0)  # absent-only: someone created it first
    assert store.write("m1", record(n=2), 1) == 2
    with pytest.raises(RecordChangedError):
        store.write("m1", record(n=3), 1)  # a stale version loses
    assert store.read("m1")[1] == 2
    assert store.get("m1").data["n"] == 2


def test_create_is_absent_only(store: DynamoPortalStore) -> None:
    assert store.create("m1", record(n=1)) is True
    assert store.create("m1", record(n=2)) is False
    assert store.get("m1").data["n"] == 1


def test_modify_declines_and_misses_write_nothing(store: DynamoPortalStore) -> None:
    assert store.modify("m1", lambda r: True) is None
    store.put("m1", record())
    assert store.modify("m1", lambda r: False).refresh_token == "r"
    assert store.read("m1")[1] == 1


def test_concurrent_modifies_lose_no_update(store: DynamoPortalStore, aws: tuple[Any, Any]) -> None:
    """Threads with stores of their own (separate containers) each add a key: all survive, however many."""
    store.put("m1", record())
    barrier = threading.Barrier(6, timeout=10)
    errors: list[Exception] = []

    def add(n: int) -> None:
        mine = DynamoPortalStore(PREFIX, TABLE, boto3.client("dynamodb", region_name="us-east-1"))
        barrier.wait()
        try:
            mine.modify("m1", lambda r: r.data.update({f"k{n}": n}) is None)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert not errors
    final, version = store.read("m1")
    assert {f"k{n}" for n in range(6)} <= set(final.data)
    assert version == 7


def test_guarded_delete_only_removes_the_same_install(store: DynamoPortalStore) -> None:
    store.put("m1", record())
    assert store.delete_if_token("m1", "app-0") is False
    assert store.get("m1") is not None
    assert store.delete_if_token("m1", "app-1") is True
    assert store.get("m1") is None
    assert store.delete_if_token("m1", "app-1") is False


def test_guarded_delete_racing_a_reinstall_keeps_the_new_record(store: DynamoPortalStore) -> None:
    store.put("m1", record())
    original = store.read

    def read(member_id: str) -> tuple[PortalRecord | None, int]:
        answer = original(member_id)
        if answer[1] == 1:  # the reinstall is stored right after the delete's read
            store.write("m1", record(application_token="app-2"), 1)
        return answer

    store.read = read  # type: ignore[method-assign]
    assert store.delete_if_token("m1", "app-1") is False
    assert store.get("m1").application_token == "app-2"


def test_guarded_delete_after_a_refresh_of_the_same_install_still_deletes(store: DynamoPortalStore) -> None:
    store.put("m1", record())
    original = store.read

    def read(member_id: str) -> tuple[PortalRecord | None, int]:
        answer = original(member_id)
        if answer[1] == 1:
            store.write("m1", record(refresh_token="r2"), 1)  # same install, new pair
        return answer

    store.read = read  # type: ignore[method-assign]
    assert store.delete_if_token("m1", "app-1") is True
    assert store.get("m1") is None


def test_delete_if_decides_on_the_whole_record(store: DynamoPortalStore) -> None:
    store.put("m1", record())
    assert store.delete_if("m1", lambda r: r.refresh_token == "other") is False
    assert store.delete_if("m1", lambda r: r.refresh_token == "r") is True
    assert store.delete("m1") is False


def test_endless_contention_is_transient(store: DynamoPortalStore, aws: tuple[Any, Any]) -> None:
    store.put("m1", record())
    other = DynamoPortalStore(PREFIX, TABLE, aws[0], ssm=aws[1])  # another container's store
    original = store.read

    def read(member_id: str) -> tuple[PortalRecord | None, int]:
        current, version = original(member_id)
        other.write("m1", record(), version)  # someone always writes in between
        return current, version

    other.write("m1", record(), 1)  # and once before: the item this store saw is already old
    store.read = read  # type: ignore[method-assign]
    with pytest.raises(TransientError, match="RECORD_CONTENDED"):
        store.modify("m1", lambda r: True)
    assert other.read("m1")[1] == 1 + MAX_CAS_ATTEMPTS


def test_a_modify_swaps_against_the_item_just_read_without_reading_it_again(
    store: DynamoPortalStore, aws: tuple[Any, Any]
) -> None:
    store.put("m1", record())
    current = store.get("m1")  # what a job does first
    assert current is not None
    reads: list[str] = []
    store.dynamodb.meta.events.register("before-call.dynamodb.GetItem", lambda **kw: reads.append("GetItem"))

    store.modify("m1", lambda r: r.data.update(mark="x") is None)

    assert reads == []  # one conditional write on the version already seen
    assert store.get("m1").data["mark"] == "x"  # type: ignore[union-attr]
    # Another writer meanwhile: the swap fails, the change is decided again on a fresh read.
    other = DynamoPortalStore(PREFIX, TABLE, aws[0], ssm=aws[1])
    other.modify("m1", lambda r: r.data.update(refresh_token="newer") is None)
    store.modify("m1", lambda r: r.data.update(mark="y") is None)
    final = other.get("m1")
    assert final is not None and final.data["mark"] == "y" and final.refresh_token == "newer"


def test_a_change_declined_on_the_item_seen_earlier_is_decided_again_on_a_fresh_read(
    store: DynamoPortalStore, aws: tuple[Any, Any]
) -> None:
    store.put("m1", record())
    other = DynamoPortalStore(PREFIX, TABLE, aws[0], ssm=aws[1])
    other.modify("m1", lambda r: r.data.update(refresh_token="rotated") is None)

    # The change applies only to the newer record: declined on the old copy, it must not give up.
    written = store.modify("m1", lambda r: r.refresh_token == "rotated" and r.data.update(mark="z") is None)

    assert written is not None and written.data["mark"] == "z"
    assert other.get("m1").data["mark"] == "z"  # type: ignore[union-attr]


def test_iter_member_ids_scans_every_page_projecting_the_key(store: DynamoPortalStore, aws: tuple[Any, Any]) -> None:
    big = "x" * 20_000  # ~20 KB items: moto pages a Scan at 1 MB, as DynamoDB does
    for i in range(120):
        store.put(f"m{i:03d}", record(f"m{i:03d}", padding=big))
    calls: list[dict[str, Any]] = []
    store.dynamodb.meta.events.register(
        "provide-client-params.dynamodb.Scan", lambda params, **kw: calls.append(dict(params))
    )

    ids = list(store.iter_member_ids())

    assert sorted(ids) == [f"m{i:03d}" for i in range(120)]
    assert len(calls) > 1  # paginated
    assert all(c["ProjectionExpression"] == "member_id" for c in calls)


def test_app_parameters_stay_in_ssm(store: DynamoPortalStore, aws: tuple[Any, Any]) -> None:
    aws[1].put_parameter(
        Name=f"{PREFIX}/app/credentials",
        Value=json.dumps({"client_id": "app", "client_secret": "s3cr3t"}),
        Type="SecureString",
    )
    aws[1].put_parameter(Name=f"{PREFIX}/app/handlers", Value="{}", Type="String")
    assert store.app_credentials().client_id == "app"
    assert store.declared_set_text() == "{}"


def test_errors_are_classified(store: DynamoPortalStore, aws: tuple[Any, Any]) -> None:
    def fail(code: str, status: int) -> Any:
        def raiser(**kwargs: object) -> None:
            raise ClientError(
                {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetItem"
            )

        return raiser

    store.dynamodb.meta.events.register("before-call.dynamodb.GetItem", fail("ThrottlingException", 400), "t")
    with pytest.raises(TransientError, match="DYNAMODB_ThrottlingException"):
        store.get("m1")
    store.dynamodb.meta.events.unregister("before-call.dynamodb.GetItem", unique_id="t")
    missing = DynamoPortalStore(PREFIX, "no-such-table", aws[0])
    with pytest.raises(ConfigError, match="no-such-table"):
        missing.get("m1")


def test_corrupt_item_is_a_config_error(store: DynamoPortalStore, aws: tuple[Any, Any]) -> None:
    aws[0].put_item(TableName=TABLE, Item={"member_id": {"S": "m1"}, "record": {"S": "[]"}, "version": {"N": "1"}})
    with pytest.raises(ConfigError, match="m1"):
        store.get("m1")


def test_malformed_member_id_never_reaches_dynamodb(store: DynamoPortalStore) -> None:
    with pytest.raises(ValueError, match="member_id"):
        store.get("../app/credentials")
    with pytest.raises(ValueError, match="member_id"):
        store.put("", record())


def test_moto_is_made_atomic_once_however_often_it_is_asked() -> None:
    from moto.dynamodb.models import DynamoDBBackend
    from moto.ssm.models import SimpleSystemManagerBackend

    atomic_moto()
    atomic_moto()
    for put in (DynamoDBBackend.put_item, SimpleSystemManagerBackend.put_parameter):
        assert getattr(put, "_b24_atomic", False) and not getattr(put.__wrapped__, "_b24_atomic", False)
