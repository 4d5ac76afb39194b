"""The SSM side of held orphans over moto's wire: history and ledger reads, the ledger's read-modify-write."""

from __future__ import annotations

import json
import logging
import sys
import time

import boto3
import pytest
from botocore.config import Config
from conftest import DECLARED_SET, PREFIX, REGION, ApiCalls, AwsAccount
from fixtures.aws import ROOT

from b24_cleanup.dynamostore import DynamoPortalStore
from b24_cleanup.held import DAY, HoldReason, Ledger, decide, ledger_key
from b24_cleanup.orphans import OrphanRecords
from b24_cleanup.planner import DeclaredSet, HandlerRow
from b24_cleanup.store import PortalStore

if str(ROOT) not in sys.path:  # bench/ lives beside functions/, not inside the package
    sys.path.insert(0, str(ROOT))

from bench.campaign import AwsFaults

OLD = "https://old.example.com/b24/events"
KEY = ledger_key("ONCRMLEADADD", OLD)
LEDGER = f"{PREFIX}/app/orphans"


def records(account: AwsAccount, grace: int = 2, **kwargs: object) -> OrphanRecords:
    return OrphanRecords(PortalStore(PREFIX, account.ssm), grace, **kwargs)  # type: ignore[arg-type]


def stored_ledger(account: AwsAccount) -> dict[str, int]:
    value = account.ssm.get_parameter(Name=LEDGER)["Parameter"]["Value"]
    document = json.loads(value)
    assert set(document) == {"orphans"}
    return document["orphans"]


def put_ledger(account: AwsAccount, entries: dict[str, int] | str) -> None:
    value = entries if isinstance(entries, str) else json.dumps({"orphans": entries})
    account.ssm.put_parameter(Name=LEDGER, Value=value, Type="String", Overwrite=True)


def test_reads_once_per_invocation_and_not_at_all_without_orphans(mock_aws: AwsAccount, api_calls: ApiCalls) -> None:
    api_calls.watch(mock_aws.ssm)
    guard = records(mock_aws)
    assert api_calls == []  # built: nothing read yet
    first = guard.evidence()
    guard.evidence()
    assert api_calls == ["ssm.GetParameterHistory", "ssm.GetParameter"]
    assert first.history is not None and first.ledger.broken  # no ledger yet
    guard.new_invocation()
    guard.evidence()
    assert len(api_calls) == 4
    assert guard.calls == {"GetParameterHistory": 2, "GetParameter": 2}


def test_grace_zero_reads_and_writes_nothing(mock_aws: AwsAccount, api_calls: ApiCalls) -> None:
    api_calls.watch(mock_aws.ssm)
    guard = records(mock_aws, grace=0)
    assert guard.evidence().grace_days == 0
    assert guard.record({KEY}) == 0
    assert api_calls == []


def test_a_missing_ledger_is_replaced_by_a_fresh_one(mock_aws: AwsAccount) -> None:
    guard = records(mock_aws)
    before = time.time()
    assert guard.record({KEY}) == 1
    entries = stored_ledger(mock_aws)
    assert list(entries) == [KEY] and before - 1 <= entries[KEY] <= time.time()
    meta = mock_aws.ssm.describe_parameters(ParameterFilters=[{"Key": "Name", "Values": [LEDGER]}])["Parameters"][0]
    assert meta["Type"] == "String"


def test_writes_only_when_a_key_is_first_seen(mock_aws: AwsAccount, api_calls: ApiCalls) -> None:
    put_ledger(mock_aws, {KEY: 1_700_000_000})
    guard = records(mock_aws)
    api_calls.watch(mock_aws.ssm)
    assert guard.record({KEY}) == 0
    assert guard.record({KEY}) == 0
    assert "ssm.PutParameter" not in api_calls
    new = ledger_key("ONCRMLEADADD", OLD + "/v2")
    assert guard.record({KEY, new}) == 1
    assert guard.record({new}) == 0  # the cache knows it now
    assert api_calls.count("ssm.PutParameter") == 1
    entries = stored_ledger(mock_aws)
    assert entries[KEY] == 1_700_000_000  # a first-seen time is never moved
    assert set(entries) == {KEY, new}


def test_read_modify_write_keeps_what_another_worker_stored(mock_aws: AwsAccount) -> None:
    put_ledger(mock_aws, {})
    guard = records(mock_aws)
    guard.evidence()  # cached: empty ledger
    other = ledger_key("ONCRMDEALADD", OLD)
    put_ledger(mock_aws, {other: int(time.time()) - 100})  # another worker, meanwhile
    assert guard.record({KEY}) == 1
    assert set(stored_ledger(mock_aws)) == {other, KEY}
    # And a key the other worker already stored costs a read, no write.
    earlier = int(time.time()) - 50
    put_ledger(mock_aws, {**stored_ledger(mock_aws), "a" * 16: earlier})
    assert guard.record({"a" * 16}) == 0
    assert stored_ledger(mock_aws)["a" * 16] == earlier


def test_an_unparseable_ledger_holds_everything_and_is_replaced(mock_aws: AwsAccount) -> None:
    put_ledger(mock_aws, "{not json")
    guard = records(mock_aws)
    row = HandlerRow.from_api({"event": "ONCRMLEADADD", "handler": OLD, "auth_type": "0"})
    hold = decide(row, DeclaredSet.parse(json.dumps(DECLARED_SET)), guard.evidence())
    assert hold is not None and hold.reason is HoldReason.FIRST_SEEN_WITHIN_GRACE
    assert guard.record({KEY}) == 1
    assert list(stored_ledger(mock_aws)) == [KEY]


def test_old_keys_not_seen_are_pruned_when_writing(mock_aws: AwsAccount) -> None:
    stale, recent = "a" * 16, "b" * 16
    now = time.time()
    put_ledger(mock_aws, {stale: int(now - 61 * DAY), recent: int(now - DAY)})
    assert records(mock_aws).record({KEY}) == 1
    assert set(stored_ledger(mock_aws)) == {recent, KEY}


def test_a_history_that_lost_versions_within_the_grace_holds_everything(mock_aws: AwsAccount) -> None:
    for i in range(101):  # SSM (and moto) keep the last 100 versions: version 1 is gone
        mock_aws.put_declared(json.dumps({**DECLARED_SET, "comment": i}))
    evidence = records(mock_aws).evidence()
    assert evidence.history is not None and evidence.history.earliest is not None
    row = HandlerRow.from_api({"event": "ONCRMLEADADD", "handler": OLD, "auth_type": "0"})
    put_ledger(mock_aws, {KEY: 1})
    hold = decide(row, DeclaredSet.parse(json.dumps(DECLARED_SET)), records(mock_aws).evidence())
    assert hold is not None and hold.reason is HoldReason.HISTORY_UNKNOWN


def test_an_unreachable_ssm_holds_everything_and_writes_nothing(mock_aws: AwsAccount) -> None:
    dead = boto3.client(
        "ssm",
        region_name=REGION,
        endpoint_url="http://127.0.0.1:9",  # discard port: nothing listens
        config=Config(retries={"max_attempts": 1}, connect_timeout=0.5),
    )
    guard = OrphanRecords(PortalStore(PREFIX, dead), 2)
    evidence = guard.evidence()
    assert evidence.history is None and evidence.ledger.broken and evidence.ledger.unknown
    row = HandlerRow.from_api({"event": "ONCRMLEADADD", "handler": OLD, "auth_type": "0"})
    hold = decide(row, DeclaredSet.parse(json.dumps(DECLARED_SET)), evidence)
    assert hold is not None and hold.reason is HoldReason.HISTORY_UNKNOWN
    assert guard.record({KEY}) == 0
    assert guard.calls["PutParameter"] == 0


@pytest.mark.parametrize("grace", [1, 2])
def test_evidence_carries_the_grace_and_time(mock_aws: AwsAccount, grace: int) -> None:
    evidence = records(mock_aws, grace=grace, clock=lambda: 2_000_000_000.0).evidence()
    assert evidence.grace_days == grace and evidence.now == 2_000_000_000.0
    assert isinstance(evidence.ledger, Ledger)


# ------------------------------------------------------------------ the ledger write goes through the store


def test_the_ledger_write_uses_the_stores_write_client_not_its_read_client(mock_aws: AwsAccount) -> None:
    store = PortalStore(PREFIX)  # clients of its own: the read client and the write client differ
    reads, writes = ApiCalls().watch(store.client), ApiCalls().watch(store.writer)
    assert OrphanRecords(store, 2).record({KEY}) == 1
    assert writes == ["ssm.PutParameter"]
    assert "ssm.PutParameter" not in reads
    assert list(stored_ledger(mock_aws)) == [KEY]
    meta = mock_aws.ssm.describe_parameters(ParameterFilters=[{"Key": "Name", "Values": [LEDGER]}])["Parameters"][0]
    assert meta["Type"] == "String" and "KeyId" not in meta  # no KMS key on a String


def test_the_ledger_write_waits_for_a_write_slot(mock_aws: AwsAccount) -> None:
    store = PortalStore(PREFIX, mock_aws.ssm, write_rate=0.9)  # one write slot every ~1.1 s
    store.put_text(f"{PREFIX}/app/other", "x")  # takes the slot there is
    started = time.monotonic()
    assert OrphanRecords(store, 2).record({KEY}) == 1
    assert time.monotonic() - started >= 0.9  # the ledger write waited for the next slot
    assert list(stored_ledger(mock_aws)) == [KEY]


def test_a_throttled_ledger_write_gets_the_writers_bounded_retries_and_holds(
    mock_aws: AwsAccount, caplog: pytest.LogCaptureFixture
) -> None:
    """The write client tries twice (WRITE_BOTO_CONFIG), not the read client's ten adaptive attempts:
    a throttled night leaves the keys unrecorded (first seen again next time), never a stuck worker."""
    store = PortalStore(PREFIX)
    faults = AwsFaults().attach(store.client, store.writer)
    faults.fail_next("ssm.PutParameter", "throttle", "throttle")
    guard = OrphanRecords(store, 2)
    with caplog.at_level(logging.WARNING, logger="b24_cleanup.orphans"):
        assert guard.record({KEY}) == 0
    assert faults.attempts["ssm.PutParameter"] == 2
    assert "SSM_ThrottlingException" in caplog.text and "the new orphans stay held" in caplog.text
    with pytest.raises(mock_aws.ssm.exceptions.ParameterNotFound):
        mock_aws.ssm.get_parameter(Name=LEDGER)
    assert guard.record({KEY}) == 1  # the next sighting records it


def test_the_dynamodb_store_keeps_the_ledger_in_ssm(mock_aws: AwsAccount) -> None:
    store = DynamoPortalStore(PREFIX, "b24-portals", ssm=mock_aws.ssm)  # no table: the ledger never touches it
    assert OrphanRecords(store, 2).record({KEY}) == 1
    assert list(stored_ledger(mock_aws)) == [KEY]
