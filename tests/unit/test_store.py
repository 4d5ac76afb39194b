"""The SSM token store on moto: layout, type/KMS/tier kept, guarded delete, listing without decryption."""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from b24_cleanup.errors import ConfigError, TransientError
from b24_cleanup.record import PortalRecord
from b24_cleanup.store import MAX_MENDS, PortalStore, tombstone

PREFIX = "/b24-cleanup/test"


@pytest.fixture
def ssm() -> Iterator[object]:
    # Fake credentials and region come from the autouse fixture in tests/fixtures/aws.py.
    with mock_aws():
        yield boto3.client("ssm", region_name="us-east-1")


@pytest.fixture
def store(ssm: object) -> PortalStore:
    return PortalStore(PREFIX, client=ssm)  # type: ignore[arg-type]


def record(member_id: str = "m1", **extra: object) -> PortalRecord:
    return PortalRecord({"member_id": member_id, "application_token": "app-1", "refresh_token": "r", **extra})


def test_prefix_must_be_absolute() -> None:
    with pytest.raises(ConfigError):
        PortalStore("relative")


def test_new_record_is_a_secure_string_and_round_trips(store: PortalStore, ssm) -> None:
    store.put("m1", record(custom={"a": 1}))
    meta = ssm.describe_parameters(ParameterFilters=[{"Key": "Name", "Values": [f"{PREFIX}/portals/m1"]}])
    assert meta["Parameters"][0]["Type"] == "SecureString"
    assert store.get("m1").data["custom"] == {"a": 1}
    assert store.get("nobody") is None


def test_overwrite_keeps_kms_key_and_tier(store: PortalStore, ssm) -> None:
    key_id = boto3.client("kms", region_name="us-east-1").create_key()["KeyMetadata"]["KeyId"]
    name = f"{PREFIX}/portals/m1"
    ssm.put_parameter(Name=name, Value=record().to_json(), Type="SecureString", KeyId=key_id, Tier="Advanced")

    store.put("m1", record(access_token="new"))

    meta = ssm.describe_parameters(ParameterFilters=[{"Key": "Name", "Values": [name]}])["Parameters"][0]
    assert meta["KeyId"] == key_id
    assert meta["Tier"] == "Advanced"
    assert meta["Version"] == 2
    assert store.get("m1").access_token == "new"


def test_guarded_delete_only_removes_the_same_install(store: PortalStore) -> None:
    store.put("m1", record())
    assert store.delete_if_token("m1", "app-0") is False
    assert store.get("m1") is not None
    assert store.delete_if_token("m1", "app-1") is True
    assert store.get("m1") is None
    assert store.delete_if_token("m1", "app-1") is False


def test_a_change_nobody_raced_costs_one_read_and_one_write(store: PortalStore, ssm) -> None:
    store.put("m1", record())
    calls = []
    ssm.meta.events.register("before-call.ssm.*", lambda model, **kw: calls.append(model.name))

    store.modify("m1", lambda r: r.data.update(x=1) is None)

    # The key and tier are looked up before the read: the window another write can land in is one round trip.
    assert calls == ["DescribeParameters", "GetParameter", "PutParameter"]
    assert store.get("m1").data["x"] == 1


def test_a_write_that_replaced_its_own_first_attempt_needs_no_mend(store: PortalStore, ssm, caplog) -> None:
    """botocore sends a write again when its reply was lost: the version skips one, nothing was lost."""
    store.put("m1", record())
    puts = []
    ssm.meta.events.register("before-call.ssm.PutParameter", lambda model, **kw: puts.append(model.name))

    def change(current: PortalRecord) -> bool:
        current.data["x"] = 1
        ssm.put_parameter(Name=f"{PREFIX}/portals/m1", Value=current.to_json(), Type="SecureString", Overwrite=True)
        return True

    store.modify("m1", change)

    assert len(puts) == 2  # the first attempt (played here) and the one resent; no mend
    assert "putting it back" not in caplog.text
    assert store.get("m1").data["x"] == 1


def test_a_change_that_overwrote_a_tombstone_is_left_for_the_migrations_final_pass(store: PortalStore, ssm) -> None:
    """What this write stored may be a rotated pair: ops/migrate.py's final pass moves it to the table."""
    store.put("m1", record())

    def change(current: PortalRecord) -> bool:
        ssm.put_parameter(Name=f"{PREFIX}/portals/m1", Value=tombstone("portals"), Type="String", Overwrite=True)
        current.data["x"] = 1
        return True

    assert store.modify("m1", change).data["x"] == 1
    assert store.get("m1").data["x"] == 1


def test_a_change_to_a_record_deleted_meanwhile_leaves_it_deleted(store: PortalStore, ssm) -> None:
    """As a conditional write would: an uninstall's delete is not undone by a mark that read before it."""
    store.put("m1", record())

    def change(current: PortalRecord) -> bool:
        ssm.delete_parameter(Name=f"{PREFIX}/portals/m1")
        current.data["revoked_at"] = 1
        return True

    assert store.modify("m1", change) is None
    assert store.get("m1") is None


def test_a_writer_storm_gives_up_as_transient_after_a_bounded_number_of_mends(store: PortalStore, ssm) -> None:
    store.put("m1", record())
    calls = [0]

    def change(current: PortalRecord) -> bool:
        calls[0] += 1  # another writer lands before every write of this one
        value = record(refresh_token=f"r{calls[0]}").to_json()
        ssm.put_parameter(Name=f"{PREFIX}/portals/m1", Value=value, Type="SecureString", Overwrite=True)
        current.data["x"] = 1
        return True

    with pytest.raises(TransientError, match="kept changing"):
        store.modify("m1", change)
    assert calls[0] == MAX_MENDS + 1


def test_iter_member_ids_pages_through_everything_without_other_paths(store: PortalStore, ssm) -> None:
    for i in range(120):
        ssm.put_parameter(Name=f"{PREFIX}/portals/m{i:03d}", Value="{}", Type="SecureString")
    ssm.put_parameter(Name=f"{PREFIX}/app/handlers", Value="{}", Type="String")
    ssm.put_parameter(Name="/other/portals/zzz", Value="{}", Type="String")

    calls = []
    ssm.meta.events.register("before-call.ssm.*", lambda model, **kw: calls.append(model.name))
    ids = list(store.iter_member_ids())

    assert sorted(ids) == [f"m{i:03d}" for i in range(120)]
    assert set(calls) == {"DescribeParameters"}  # nothing decrypted, nothing read
    assert len(calls) > 1  # paginated (real SSM gives 50 a page; moto gives 10)


def test_app_credentials(store: PortalStore, ssm) -> None:
    name = f"{PREFIX}/app/credentials"
    with pytest.raises(ConfigError, match="missing"):
        store.app_credentials()
    ssm.put_parameter(Name=name, Value="not json", Type="SecureString")
    with pytest.raises(ConfigError, match="JSON") as err:
        store.app_credentials()
    assert "not json" not in str(err.value)
    ssm.put_parameter(
        Name=name,
        Value=json.dumps({"client_id": "app", "client_secret": "s3cr3t"}),
        Type="SecureString",
        Overwrite=True,
    )
    creds = store.app_credentials()
    assert (creds.client_id, creds.client_secret) == ("app", "s3cr3t")
    assert "s3cr3t" not in repr(creds)


def test_corrupt_record_is_a_config_error(store: PortalStore, ssm) -> None:
    ssm.put_parameter(Name=f"{PREFIX}/portals/m1", Value="[]", Type="SecureString")
    with pytest.raises(ConfigError):
        store.get("m1")


def test_throttling_is_transient(store: PortalStore, ssm) -> None:
    from botocore.exceptions import ClientError

    def throttle(**kwargs: object) -> None:
        raise ClientError(
            {
                "Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            },
            "GetParameter",
        )

    ssm.meta.events.register("before-call.ssm.GetParameter", throttle)
    with pytest.raises(TransientError):
        store.get("m1")


def test_a_missing_parameter_is_none_for_reads_and_false_for_deletes(store: PortalStore) -> None:
    assert store.get("m1") is None and store.declared_set_text() is None
    assert store.delete("m1") is False
    store.put("m1", record())
    assert store.delete("m1") is True
    assert store.get("m1") is None


@pytest.mark.parametrize(
    ("code", "status", "raised"),
    [
        ("AccessDeniedException", 400, ConfigError),
        ("ThrottlingException", 400, TransientError),
        ("InternalServerError", 500, TransientError),
    ],
)
@pytest.mark.parametrize("operation", ["GetParameter", "DeleteParameter"])
def test_reads_and_deletes_classify_ssm_refusals_alike(
    store: PortalStore, ssm, operation: str, code: str, status: int, raised: type[Exception]
) -> None:
    from botocore.exceptions import ClientError

    def refuse(**kwargs: object) -> None:
        raise ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)

    store.put("m1", record())
    ssm.meta.events.register(f"before-call.ssm.{operation}", refuse)
    act, what = (
        (store.get, f"reading {PREFIX}/portals/m1")
        if operation == "GetParameter"
        else (store.delete, "deleting the record of m1")
    )
    with pytest.raises(raised, match=what) as caught:
        act("m1")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # raised `from None`


@pytest.mark.parametrize("operation", ["get", "delete"])
def test_an_unreachable_ssm_is_transient_for_reads_and_deletes(operation: str) -> None:
    from botocore.config import Config

    dead = boto3.client(
        "ssm",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",  # discard port: nothing listens
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=0.5),
    )
    store = PortalStore(PREFIX, client=dead)
    with pytest.raises(TransientError, match="SSM_UNREACHABLE"):
        getattr(store, operation)("m1")


def test_malformed_member_id_never_reaches_ssm(store: PortalStore) -> None:
    with pytest.raises(ValueError, match="member_id"):
        store.get("../app/credentials")


def test_new_records_use_the_configured_key_and_overwrites_keep_theirs(ssm) -> None:
    kms = boto3.client("kms", region_name="us-east-1")
    configured, other = (kms.create_key()["KeyMetadata"]["KeyId"] for _ in range(2))
    store = PortalStore(PREFIX, client=ssm, kms_key_id=configured)
    ssm.put_parameter(Name=f"{PREFIX}/portals/old", Value=record("old").to_json(), Type="SecureString", KeyId=other)

    store.put("new", record("new"))
    store.put("old", record("old", access_token="x"))

    keys = {p["Name"].rsplit("/", 1)[-1]: p["KeyId"] for p in ssm.describe_parameters()["Parameters"]}
    assert keys == {"new": configured, "old": other}
