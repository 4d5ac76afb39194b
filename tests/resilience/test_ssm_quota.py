"""The quota-faithful SSM (ops/quota.py): real SSM's answers beyond its rates, on the real wire."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from b24_cleanup.errors import TransientError
from b24_cleanup.ops.quota import QuotaAws, SsmQuotas, TokenBucket, operation_class, ssm_quotas
from b24_cleanup.ops.sandbox import sandbox
from b24_cleanup.record import PortalRecord
from b24_cleanup.store import PortalStore

PREFIX = "/b24-cleanup/quota"
NO_RETRY = {"retries": {"mode": "standard", "total_max_attempts": 1}}


@pytest.fixture
def direct() -> Iterator[Any]:
    """moto in-process, and an unmetered client to seed it."""
    with mock_aws():
        client = boto3.client("ssm", region_name="us-east-1")
        client.put_parameter(Name=f"{PREFIX}/portals/m1", Value='{"member_id": "m1"}', Type="SecureString")
        yield client


def hammer(call: Any, count: int) -> tuple[int, int, float]:
    """Call `call` `count` times back to back: (admitted, throttled, elapsed).

    Counted, not timed: how fast a loaded machine gets through the calls changes how many the
    bucket refills for, never the bounds the test asserts.
    """
    ok = throttled = 0
    start = time.monotonic()
    for _ in range(count):
        try:
            call()
            ok += 1
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ThrottlingException":
                raise
            throttled += 1
    return ok, throttled, time.monotonic() - start


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(3, 3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 1 / 3
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] += 100  # an idle hour banks no more than the capacity
    assert sum(bucket.take() for _ in range(10)) == 3
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0, 1)


def test_operations_are_metered_by_class() -> None:
    assert {operation_class(op) for op in ("GetParameter", "GetParameters", "GetParametersByPath")} == {"read"}
    assert {operation_class(op) for op in ("PutParameter", "DeleteParameter", "DeleteParameters")} == {"write"}
    assert operation_class("DescribeParameters") == "describe"
    assert operation_class("GetParameterHistory") is None


def test_reads_writes_and_describes_throttle_separately_at_their_rates(direct: Any) -> None:
    name = f"{PREFIX}/portals/m1"
    with ssm_quotas(SsmQuotas(read=5, write=2, describe=3)) as quota:
        client = quota.client(**NO_RETRY)
        calls = {
            "write": lambda: client.put_parameter(Name=name, Value="{}", Type="SecureString", Overwrite=True),
            "read": lambda: client.get_parameter(Name=name, WithDecryption=True),
            "describe": lambda: client.describe_parameters(),
        }
        for kind, rate in (("write", 2), ("read", 5), ("describe", 3)):
            count = 4 * rate + 4
            ok, throttled, elapsed = hammer(calls[kind], count)
            # A one-second bucket: the full burst first, then the rate over the time, never more.
            assert rate <= ok <= rate + rate * elapsed + 1, (kind, ok, elapsed)
            assert ok + throttled == count
            assert (quota.admitted(kind), quota.throttled(kind)) == (ok, throttled)
        # Each class spent only its own bucket: writes hammered first did not starve the reads.
        assert quota.stats()["GetParameter"]["admitted"] >= 5


def test_a_throttled_call_answers_as_real_ssm_does(direct: Any) -> None:
    with ssm_quotas(SsmQuotas(read=1)) as quota:
        client = quota.client(**NO_RETRY)
        client.get_parameter(Name=f"{PREFIX}/portals/m1")
        with pytest.raises(ClientError) as err:
            client.get_parameter(Name=f"{PREFIX}/portals/m1")
    response = err.value.response
    assert response["Error"] == {"Code": "ThrottlingException", "Message": "Rate exceeded"}
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert response["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/x-amz-json-1.1"


def test_adaptive_retries_see_the_throttling_and_slow_down(direct: Any) -> None:
    name = f"{PREFIX}/portals/m1"
    with ssm_quotas(SsmQuotas(write=5)) as quota:
        client = quota.client()  # store.py's adaptive configuration
        retried = 0
        start = time.monotonic()
        for _ in range(15):
            answer = client.put_parameter(Name=name, Value="{}", Type="SecureString", Overwrite=True)
            retried += answer["ResponseMetadata"]["RetryAttempts"]
        elapsed = time.monotonic() - start
        assert quota.throttled("write") > 0 and retried > 0  # botocore met ThrottlingException and retried
        assert quota.admitted("write") == 15
        assert elapsed >= (15 - 5) / 5 * 0.9  # the burst, then no faster than the rate

        # With the retries used up, the adaptive client raises what SSM answered.
        quota.set_quotas(SsmQuotas(write=0.01))
        short = quota.client(retries={"mode": "adaptive", "total_max_attempts": 2})
        short.put_parameter(Name=name, Value="{}", Type="SecureString", Overwrite=True)  # the fresh bucket's one
        with pytest.raises(ClientError) as err:
            short.put_parameter(Name=name, Value="{}", Type="SecureString", Overwrite=True)
        assert err.value.response["Error"]["Code"] == "ThrottlingException"
        assert err.value.response["ResponseMetadata"]["RetryAttempts"] == 1


def test_the_store_sees_throttling_as_transient_through_the_environment(direct: Any) -> None:
    before = os.environ.get("AWS_ENDPOINT_URL_SSM")
    with ssm_quotas(SsmQuotas(read=1)) as quota:
        assert os.environ["AWS_ENDPOINT_URL_SSM"] == quota.endpoint_url
        store = PortalStore(PREFIX)  # the production client, adaptive retries, from the environment
        store._client = boto3.client("ssm", config=store.client.meta.config.merge(_no_retry()))
        assert store.get("m1") is not None
        with pytest.raises(TransientError, match="SSM_ThrottlingException"):
            store.get("m1")
        assert quota.stats()["GetParameter"] == {"admitted": 1, "throttled": 1}
    assert os.environ.get("AWS_ENDPOINT_URL_SSM") == before


def _no_retry() -> Any:
    from botocore.config import Config

    return Config(**NO_RETRY)


def test_the_parameter_cap_refuses_new_standard_parameters(direct: Any) -> None:
    with ssm_quotas(SsmQuotas(write=None, parameter_limit=2)) as quota:
        client = quota.client(**NO_RETRY)
        client.put_parameter(Name=f"{PREFIX}/portals/m2", Value="{}", Type="SecureString")  # the 2nd
        with pytest.raises(ClientError) as err:
            client.put_parameter(Name=f"{PREFIX}/portals/m3", Value="{}", Type="SecureString")
        assert err.value.response["Error"]["Code"] == "ParameterLimitExceeded"
        # Overwrites and the Advanced tier are not the Standard cap's business.
        client.put_parameter(Name=f"{PREFIX}/portals/m1", Value="{}", Type="SecureString", Overwrite=True)
        client.put_parameter(Name=f"{PREFIX}/portals/m4", Value="{}", Type="SecureString", Tier="Advanced")
        assert quota.stats()["PutParameter"]["limited"] == 1
    assert len(direct.describe_parameters()["Parameters"]) == 3


def test_a_sandbox_with_quotas_meters_the_handlers_and_not_its_own_seeding() -> None:
    with sandbox(ssm_quotas=SsmQuotas(write=2)) as box:
        quota: QuotaAws | None = box.quota
        assert quota is not None
        for i in range(5):  # seeding goes around the quota
            box.store.put(f"m{i}", PortalRecord({"member_id": f"m{i}"}))
        assert quota.stats() == {}
        # What a handler builds: through the quotas, its writes paced to its share of the rate.
        store = PortalStore(box.prefix, write_rate=2)
        for i in range(4):
            store.put(f"m{i}", PortalRecord({"member_id": f"m{i}", "n": 1}))
        assert quota.admitted("write") == 4
        assert box.record("m3").data["n"] == 1
