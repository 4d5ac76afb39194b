"""What the CLI checks once, before the first portal: AWS setup, SSM reachable, the app's parameters.

A mistake that would fail every portal the same way (a wrong profile, an unreachable endpoint, a
missing declared set or app credentials) is one line and exit 2 here, not a thousand identical
failed rows later. These checks use a client that gives up within seconds: the engine's own
client retries patiently (SSM throttling is normal at scale), which is right for work and wrong
for finding out that nobody is listening.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, NoRegionError, ProfileNotFound

from ..errors import ConfigError, InvalidDeclaredSetError, TransientError
from ..planner import DeclaredSet
from ..store import PortalStore

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

# Two attempts, two seconds to connect: a refused or black-holed endpoint is known in ~4 s.
FAST_CONFIG = Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2, read_timeout=5)


def _region() -> str | None:
    # As store.ssm_client: AWS_REGION is honoured when AWS_DEFAULT_REGION is not set.
    return None if os.environ.get("AWS_DEFAULT_REGION") else os.environ.get("AWS_REGION") or None


def check_aws_setup() -> None:
    """A profile that does not exist, broken config files, no credentials, no region: one line each."""
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    try:
        session = boto3.Session(region_name=_region())
        region = session.region_name
        credentials = session.get_credentials() if region else None
    except ProfileNotFound:
        raise ConfigError(
            f"AWS profile {profile!r} is not configured: check AWS_PROFILE (aws configure list-profiles)"
        ) from None
    except BotoCoreError as exc:  # unreadable config, partial keys, a failing credential_process
        raise ConfigError(f"the AWS configuration is not usable: {exc}") from None
    if not region:
        raise ConfigError("no AWS region: set AWS_REGION or AWS_DEFAULT_REGION, or a profile's region")
    if credentials is None:
        raise ConfigError("no AWS credentials found (environment, profile or instance role)")


def fast_ssm_client() -> SSMClient:
    try:
        return boto3.client("ssm", config=FAST_CONFIG, region_name=_region())
    except NoRegionError:
        raise ConfigError("no AWS region: set AWS_REGION or AWS_DEFAULT_REGION, or a profile's region") from None
    except BotoCoreError as exc:
        raise ConfigError(f"the AWS configuration is not usable: {exc}") from None


def _unreachable(client: SSMClient, exc: TransientError) -> ConfigError:
    return ConfigError(
        f"cannot reach SSM at {client.meta.endpoint_url} ({exc.description}): "
        "check the network, or AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SSM if you set one"
    )


def check_app_parameters(prefix: str, *, declared: bool = True, credentials: bool = True) -> None:
    """The declared set (valid) and the app credentials (present) under `prefix`, read once, fast."""
    client = fast_ssm_client()
    store = PortalStore(prefix, client=client)
    try:
        if declared:
            text = store.declared_set_text()
            if text is None:
                raise ConfigError(
                    f"no declared handler set at {prefix}/app/handlers (is the prefix right?): "
                    "a sweep would unbind nothing on any portal; store a valid set first"
                )
            try:
                DeclaredSet.parse(text)
            except InvalidDeclaredSetError as exc:
                raise ConfigError(
                    f"the declared handler set at {prefix}/app/handlers is invalid ({exc}): "
                    "a sweep would unbind nothing on any portal; store a valid set first"
                ) from None
        if credentials:
            store.app_credentials()  # ConfigError names the parameter when it is missing or malformed
    except TransientError as exc:
        if exc.code == "SSM_UNREACHABLE":
            raise _unreachable(client, exc) from None
        raise
