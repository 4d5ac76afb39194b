"""The SAM template's security and wiring properties (design §2, §4-§6; design §11.2).

Static checks parse template.yaml with a loader that understands CloudFormation's short tags and
evaluate its Conditions for a few parameter scenarios, so that what is granted *with* AcceptInstall
or a KMS key is checked as well as the defaults. Two more checks run only when their inputs exist:

- the SAM translation (what CloudFormation really deploys, including the roles and permissions SAM
  generates), done by the SAM CLI's own translator in .tools/sam (`.ci/install-sam`);
- the artifact `sam build` wrote to .aws-sam/build (`.ci/check-template`), imported in a fresh,
  isolated python3.13 that sees only the artifact and what the Lambda runtime itself provides.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from fixtures.template import ROOT, TEMPLATE, load_template

BUILD_DIR = ROOT / ".aws-sam" / "build"
SAM_PYTHON = ROOT / ".tools" / "sam" / "bin" / "python"
# CI sets this (after .ci/install-sam and .ci/check-template) so that the translation and artifact
# checks can never be skipped silently: a missing or stale input fails instead.
REQUIRE_SAM_CHECKS = os.environ.get("REQUIRE_SAM_CHECKS", "") not in ("", "0")


def skip_or_fail(reason: str) -> None:
    if REQUIRE_SAM_CHECKS:
        pytest.fail(f"{reason} (REQUIRE_SAM_CHECKS is set)")
    pytest.skip(reason)


# design §4 (fixed names).
SPEC_ENV = {
    "B24_SSM_PREFIX",
    "B24_QUEUE_URL",
    "B24_OAUTH_URL",
    "B24_DRY_RUN",
    "B24_REVOKED_GRACE_DAYS",
    "B24_ORPHAN_GRACE_DAYS",
    "B24_ACCEPT_INSTALL",
    "B24_SSM_WRITE_RATE",
    "B24_WORKER_CONCURRENCY",
    "B24_SWEEP_EVERY_NIGHTS",
    "B24_STORE",
    "B24_TABLE",
    "POWERTOOLS_SERVICE_NAME",
    "POWERTOOLS_METRICS_NAMESPACE",
    # Not in design §4 (which allows additions): the customer-managed key for new portal records.
    "B24_SSM_KMS_KEY_ID",
}
# design §6 (fixed names and dimension values).
SPEC_METRICS = {
    "UninstallAccepted", "UninstallRejected", "PortalsEnqueued", "PortalsProcessed", "PortalsCleaned",
    "PortalsRevoked", "PortalsFailed", "PortalsSkipped", "PortalsIncomplete", "HandlersFound",
    "HandlersUnbound", "HandlersKept", "HandlersMissing", "UnbindFailed", "TokensRefreshed", "RestCalls",
    "RateLimited", "DeclaredSetInvalid", "InstallsRegistered", "InstallsRejected", "HandlersHeld",
}  # fmt: skip
SPEC_ACTIONS = {"uninstall", "sweep", "endpoint", "scheduler"}

FUNCTIONS = {
    "EndpointFunction": "b24_cleanup.handlers.endpoint.lambda_handler",
    "SchedulerFunction": "b24_cleanup.handlers.scheduler.lambda_handler",
    "WorkerFunction": "b24_cleanup.handlers.worker.lambda_handler",
}
ROLES = {"EndpointFunction": "EndpointRole", "SchedulerFunction": "SchedulerRole", "WorkerFunction": "WorkerRole"}
LOG_GROUPS = {
    "EndpointFunction": "EndpointLogGroup",
    "SchedulerFunction": "SchedulerLogGroup",
    "WorkerFunction": "WorkerLogGroup",
}
# Every resource type the template may declare. A new type (an API, a bucket, a raw permission...)
# changes the attack surface: review it, then add it here.
ALLOWED_TYPES = {
    "AWS::Serverless::Function",
    "AWS::SQS::Queue",
    "AWS::IAM::Role",
    "AWS::Logs::LogGroup",
    "AWS::SNS::Topic",
    "AWS::CloudWatch::Alarm",
    "AWS::CloudWatch::Dashboard",
    "AWS::DynamoDB::Table",
}

PARAM_ARN = "arn:${AWS::Partition}:ssm:${AWS::Region}:${AWS::AccountId}:parameter${SsmPrefix}"
PORTALS = f"{PARAM_ARN}/portals/*"
CREDENTIALS = f"{PARAM_ARN}/app/credentials"
HANDLERS = f"{PARAM_ARN}/app/handlers"
ORPHANS = f"{PARAM_ARN}/app/orphans"
WORK_QUEUE = "GetAtt:WorkQueue.Arn"
KMS_KEY = "Ref:SsmKmsKeyArn"
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"

# Parameter scenarios whose effective template is checked (beyond the defaults).
SCENARIOS = {
    "defaults": {},
    "accept_install": {"AcceptInstall": "true"},
    "kms": {"SsmKmsKeyArn": KEY_ARN},
    "accept_install_kms": {"AcceptInstall": "true", "SsmKmsKeyArn": KEY_ARN},
    "alarm_email": {"AlarmEmail": "ops@example.com"},
    "alarm_topic": {"AlarmTopicArn": "arn:aws:sns:us-east-1:123456789012:ops"},
    "oauth_url": {"OAuthUrl": "https://oauth.bitrix.info/oauth/token/"},
    "dynamodb": {"TokenStore": "dynamodb"},
    "dynamodb_accept_install": {"TokenStore": "dynamodb", "AcceptInstall": "true"},
    "dynamodb_accept_install_kms": {"TokenStore": "dynamodb", "AcceptInstall": "true", "SsmKmsKeyArn": KEY_ARN},
}
PORTAL_TABLE = "GetAtt:PortalTable.Arn"


# ---------------------------------------------------------------------------------------------
# Reading the template (tests/fixtures/template.py: the loader and the `template` fixture)
# ---------------------------------------------------------------------------------------------


_NO_VALUE = object()


def _condition_values(tpl: dict[str, Any], params: dict[str, str]) -> dict[str, bool]:
    values = {name: str(spec.get("Default", "")) for name, spec in tpl["Parameters"].items()}
    unknown = set(params) - set(values)
    assert not unknown, f"scenario names unknown parameters {unknown}"
    values.update(params)
    results: dict[str, bool] = {}

    def value_of(expr: Any) -> Any:
        if isinstance(expr, dict) and set(expr) == {"Ref"}:
            return values[expr["Ref"]]
        return expr

    def evaluate(expr: Any) -> bool:
        (fn, args), *_ = expr.items()
        if fn == "Fn::Equals":
            return str(value_of(args[0])) == str(value_of(args[1]))
        if fn == "Fn::Not":
            return not evaluate(args[0])
        if fn == "Fn::And":
            return all(evaluate(a) for a in args)
        if fn == "Fn::Or":
            return any(evaluate(a) for a in args)
        if fn == "Condition":
            return condition(args)
        raise AssertionError(f"unsupported condition function {fn}")

    def condition(name: str) -> bool:
        if name not in results:
            results[name] = evaluate(tpl["Conditions"][name])
        return results[name]

    for name in tpl.get("Conditions", {}):
        condition(name)
    return results


def _resolve_ifs(node: Any, conditions: dict[str, bool]) -> Any:
    """Pick the Fn::If branch the conditions select; drop AWS::NoValue from lists and maps."""
    if isinstance(node, dict):
        if set(node) == {"Fn::If"}:
            name, when_true, when_false = node["Fn::If"]
            return _resolve_ifs(when_true if conditions[name] else when_false, conditions)
        if node == {"Ref": "AWS::NoValue"}:
            return _NO_VALUE
        resolved = {key: _resolve_ifs(value, conditions) for key, value in node.items()}
        return {key: value for key, value in resolved.items() if value is not _NO_VALUE}
    if isinstance(node, list):
        items = [_resolve_ifs(item, conditions) for item in node]
        return [item for item in items if item is not _NO_VALUE]
    return node


def effective(tpl: dict[str, Any], scenario: str) -> dict[str, Any]:
    """The template as deployed with a scenario's parameters: conditional resources and branches resolved."""
    conditions = _condition_values(tpl, SCENARIOS[scenario])
    out = copy.deepcopy(tpl)
    out["Resources"] = {
        name: res for name, res in out["Resources"].items() if "Condition" not in res or conditions[res["Condition"]]
    }
    out["Globals"] = _resolve_ifs(out.get("Globals", {}), conditions)
    out["Resources"] = _resolve_ifs(out["Resources"], conditions)
    return out


def _resource_key(resource: Any) -> str:
    if isinstance(resource, str):
        return resource
    if isinstance(resource, dict) and set(resource) == {"Fn::Sub"} and isinstance(resource["Fn::Sub"], str):
        return resource["Fn::Sub"]
    if isinstance(resource, dict) and set(resource) == {"Fn::GetAtt"}:
        return "GetAtt:" + ".".join(resource["Fn::GetAtt"])
    if isinstance(resource, dict) and set(resource) == {"Ref"}:
        return "Ref:" + resource["Ref"]
    raise AssertionError(f"unexpected IAM resource form {resource!r}")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def role_statements(resources: dict[str, Any], role: str) -> list[dict[str, Any]]:
    props = resources[role]["Properties"]
    return [stmt for policy in props.get("Policies", []) for stmt in policy["PolicyDocument"]["Statement"]]


def grants(statements: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {
        (action, _resource_key(resource))
        for stmt in statements
        for action in _as_list(stmt["Action"])
        for resource in _as_list(stmt["Resource"])
    }


def function_env(tpl: dict[str, Any], function: str) -> dict[str, Any]:
    env = dict(tpl.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {}))
    props = tpl["Resources"][function]["Properties"]
    env.update(props.get("Environment", {}).get("Variables", {}))
    return env


def function_prop(tpl: dict[str, Any], function: str, name: str) -> Any:
    props = tpl["Resources"][function]["Properties"]
    return props.get(name, tpl.get("Globals", {}).get("Function", {}).get(name))


def _sub_variables(text: str) -> list[str]:
    return re.findall(r"\$\{(?!!)([^}]+)\}", text)


def _render_sub(text: str, values: dict[str, str]) -> str:
    text = re.sub(r"\$\{(?!!)([^}]+)\}", lambda m: values.get(m.group(1), f"<{m.group(1)}>"), text)
    return text.replace("${!", "${")


# ---------------------------------------------------------------------------------------------
# Shape: resources, functions, handlers, one artifact
# ---------------------------------------------------------------------------------------------


def test_template_declares_only_reviewed_resource_types(template: dict[str, Any]) -> None:
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    types = {res["Type"] for res in template["Resources"].values()}
    assert types <= ALLOWED_TYPES, f"new resource types to review: {types - ALLOWED_TYPES}"
    functions = {n for n, r in template["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}
    assert functions == set(FUNCTIONS)


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_functions_share_one_artifact_and_point_at_the_handlers(template: dict[str, Any], function: str) -> None:
    assert function_prop(template, function, "CodeUri") == "functions/"
    assert function_prop(template, function, "Handler") == FUNCTIONS[function]
    assert function_prop(template, function, "Runtime") == "python3.13"
    assert function_prop(template, function, "Architectures") == ["arm64"]
    module = FUNCTIONS[function].rsplit(".", 1)[0]
    assert (ROOT / "functions" / (module.replace(".", "/") + ".py")).is_file(), f"{module} is missing"
    assert (ROOT / "functions" / "requirements.txt").is_file()


def test_functions_log_json_to_their_own_group_with_retention(template: dict[str, Any]) -> None:
    assert template["Globals"]["Function"]["LoggingConfig"]["LogFormat"] == "JSON"
    for function, group in LOG_GROUPS.items():
        props = template["Resources"][function]["Properties"]
        assert props["LoggingConfig"]["LogGroup"] == {"Ref": group}
        log_group = template["Resources"][group]
        assert log_group["Type"] == "AWS::Logs::LogGroup"
        assert log_group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}


# ---------------------------------------------------------------------------------------------
# The only public entry
# ---------------------------------------------------------------------------------------------


def test_function_url_on_the_endpoint_is_the_only_public_entry(template: dict[str, Any]) -> None:
    url_configs = {
        name: res["Properties"]["FunctionUrlConfig"]
        for name, res in template["Resources"].items()
        if "FunctionUrlConfig" in res.get("Properties", {})
    }
    assert list(url_configs) == ["EndpointFunction"]
    assert url_configs["EndpointFunction"]["AuthType"] == "NONE"
    assert "FunctionUrlConfig" not in template["Globals"]["Function"]
    event_types = {
        (name, event["Type"])
        for name, res in template["Resources"].items()
        for event in res.get("Properties", {}).get("Events", {}).values()
    }
    assert event_types == {("SchedulerFunction", "ScheduleV2"), ("WorkerFunction", "SQS")}


def test_endpoint_has_small_reserved_concurrency_and_a_short_timeout(template: dict[str, Any]) -> None:
    props = template["Resources"]["EndpointFunction"]["Properties"]
    reserved = props["ReservedConcurrentExecutions"]
    if isinstance(reserved, dict):
        param = template["Parameters"][reserved["Ref"]]
        assert param["Type"] == "Number"
        assert param["MinValue"] >= 1, "0 would switch the endpoint off"
        reserved = param["Default"]
    assert 1 <= int(reserved) <= 20
    assert props["Timeout"] <= 30


# ---------------------------------------------------------------------------------------------
# IAM: least privilege
# ---------------------------------------------------------------------------------------------


def _logs(group: str) -> set[tuple[str, str]]:
    return {("logs:CreateLogStream", f"GetAtt:{group}.Arn"), ("logs:PutLogEvents", f"GetAtt:{group}.Arn")}


def _expected_grants(scenario: str) -> dict[str, set[tuple[str, str]]]:
    params = SCENARIOS[scenario]
    accept = params.get("AcceptInstall") == "true"
    kms = bool(params.get("SsmKmsKeyArn"))
    if params.get("TokenStore") == "dynamodb":
        return _expected_dynamodb_grants(accept, kms)
    endpoint = _logs("EndpointLogGroup") | {("ssm:GetParameter", PORTALS), ("sqs:SendMessage", WORK_QUEUE)}
    if accept:
        endpoint |= {
            ("ssm:PutParameter", PORTALS),
            ("ssm:GetParameter", CREDENTIALS),
            ("ssm:DescribeParameters", "*"),
        }
    if kms:
        endpoint |= {("kms:Decrypt", KMS_KEY)}
    if kms and accept:
        endpoint |= {("kms:Encrypt", KMS_KEY), ("kms:GenerateDataKey", KMS_KEY)}
    scheduler = _logs("SchedulerLogGroup") | {
        ("ssm:GetParameter", HANDLERS),
        ("ssm:DescribeParameters", "*"),
        ("sqs:SendMessage", WORK_QUEUE),
    }
    worker = _logs("WorkerLogGroup") | {
        ("sqs:ReceiveMessage", WORK_QUEUE),
        ("sqs:DeleteMessage", WORK_QUEUE),
        ("sqs:GetQueueAttributes", WORK_QUEUE),
        ("ssm:GetParameter", PORTALS),
        ("ssm:PutParameter", PORTALS),
        ("ssm:DeleteParameter", PORTALS),
        ("ssm:GetParameter", CREDENTIALS),
        ("ssm:GetParameter", HANDLERS),
        ("ssm:GetParameterHistory", HANDLERS),
        ("ssm:GetParameter", ORPHANS),
        ("ssm:PutParameter", ORPHANS),
        ("ssm:DescribeParameters", "*"),
    }
    if kms:
        worker |= {("kms:Decrypt", KMS_KEY), ("kms:Encrypt", KMS_KEY), ("kms:GenerateDataKey", KMS_KEY)}
    return {"EndpointRole": endpoint, "SchedulerRole": scheduler, "WorkerRole": worker}


def _expected_dynamodb_grants(accept: bool, kms: bool) -> dict[str, set[tuple[str, str]]]:
    """TokenStore=dynamodb: the table for records, SSM only for the app's parameters (design §3a)."""
    endpoint = _logs("EndpointLogGroup") | {("dynamodb:GetItem", PORTAL_TABLE), ("sqs:SendMessage", WORK_QUEUE)}
    if accept:
        endpoint |= {("dynamodb:PutItem", PORTAL_TABLE), ("ssm:GetParameter", CREDENTIALS)}
    scheduler = _logs("SchedulerLogGroup") | {
        ("ssm:GetParameter", HANDLERS),
        ("dynamodb:Scan", PORTAL_TABLE),
        ("sqs:SendMessage", WORK_QUEUE),
    }
    worker = _logs("WorkerLogGroup") | {
        ("sqs:ReceiveMessage", WORK_QUEUE),
        ("sqs:DeleteMessage", WORK_QUEUE),
        ("sqs:GetQueueAttributes", WORK_QUEUE),
        ("dynamodb:GetItem", PORTAL_TABLE),
        ("dynamodb:PutItem", PORTAL_TABLE),
        ("dynamodb:DeleteItem", PORTAL_TABLE),
        ("ssm:GetParameter", CREDENTIALS),
        ("ssm:GetParameter", HANDLERS),
        # Held orphans: the declared set's history and the orphan ledger stay in SSM (design §3).
        ("ssm:GetParameterHistory", HANDLERS),
        ("ssm:GetParameter", ORPHANS),
        ("ssm:PutParameter", ORPHANS),
    }
    if kms:
        # The app's SecureStrings through SSM, the table through DynamoDB.
        endpoint |= {("kms:Decrypt", KMS_KEY), ("kms:DescribeKey", KMS_KEY)}
        scheduler |= {("kms:Decrypt", KMS_KEY), ("kms:DescribeKey", KMS_KEY)}
        worker |= {
            ("kms:Decrypt", KMS_KEY),
            ("kms:Encrypt", KMS_KEY),
            ("kms:GenerateDataKey", KMS_KEY),
            ("kms:DescribeKey", KMS_KEY),
        }
        if accept:
            endpoint |= {("kms:Encrypt", KMS_KEY), ("kms:GenerateDataKey", KMS_KEY)}
    return {"EndpointRole": endpoint, "SchedulerRole": scheduler, "WorkerRole": worker}


def test_every_function_uses_its_own_explicit_role(template: dict[str, Any]) -> None:
    # SAM's generated roles would attach AWSLambdaBasicExecutionRole / AWSLambdaSQSQueueExecutionRole,
    # whose statements use Resource "*".
    for function, role in ROLES.items():
        props = template["Resources"][function]["Properties"]
        assert props["Role"] == {"Fn::GetAtt": [role, "Arn"]}
        assert "Policies" not in props
    assert "Role" not in template["Globals"]["Function"]
    for name, res in template["Resources"].items():
        if res["Type"] == "AWS::IAM::Role":
            props = res["Properties"]
            assert "ManagedPolicyArns" not in props, name
            (trust,) = props["AssumeRolePolicyDocument"]["Statement"]
            assert trust["Principal"] == {"Service": "lambda.amazonaws.com"}, name


@pytest.mark.parametrize(
    "scenario",
    ["defaults", "accept_install", "kms", "accept_install_kms", "dynamodb", "dynamodb_accept_install_kms"],
)
def test_roles_grant_exactly_what_each_function_needs(template: dict[str, Any], scenario: str) -> None:
    resources = effective(template, scenario)["Resources"]
    expected = _expected_grants(scenario)
    for role, wanted in expected.items():
        got = grants(role_statements(resources, role))
        assert got == wanted, f"{role} in {scenario}: extra {got - wanted}, missing {wanted - got}"
    roles = {name for name, res in resources.items() if res["Type"] == "AWS::IAM::Role"}
    assert roles == set(expected)


def _check_statement(stmt: dict[str, Any], where: str) -> None:
    """No wildcard action, no wildcard resource except the DescribeParameters '*' AWS forces."""
    assert stmt["Effect"] == "Allow", where
    assert not {"NotAction", "NotResource", "NotPrincipal"} & set(stmt), where
    actions = _as_list(stmt["Action"])
    for action in actions:
        assert isinstance(action, str), where
        assert "*" not in action, f"{where}: wildcard action {action}"
        assert re.fullmatch(r"[a-z0-9-]+:[A-Za-z0-9]+", action), f"{where}: odd action {action}"
    for resource in _as_list(stmt["Resource"]):
        key = _resource_key(resource)
        if key == "*":
            assert actions == ["ssm:DescribeParameters"], f"{where}: Resource '*' for {actions}"
            continue
        if key.startswith("arn:"):
            service, region, account = key.split(":")[2:5]
            assert "*" not in service + region + account, f"{where}: wildcard in {key}"
    for action in actions:
        service = action.split(":")[0]
        keys = [_resource_key(r) for r in _as_list(stmt["Resource"])]
        if service == "ssm" and action != "ssm:DescribeParameters":
            for key in keys:
                assert key.startswith(PARAM_ARN + "/"), f"{where}: SSM resource outside the prefix: {key}"
                assert key in {PORTALS, CREDENTIALS, HANDLERS, ORPHANS}, f"{where}: unexpected SSM resource {key}"
        if service == "sqs":
            assert keys == [WORK_QUEUE], f"{where}: SQS beyond the work queue: {keys}"
        if service == "dynamodb":
            assert keys == [PORTAL_TABLE], f"{where}: DynamoDB beyond the portal table: {keys}"
        if service == "kms":
            assert keys == [KMS_KEY], where
            condition = stmt["Condition"]
            via = condition["StringEquals"]["kms:ViaService"]
            if via == {"Fn::Sub": "dynamodb.${AWS::Region}.amazonaws.com"}:
                continue  # the table's key: DynamoDB encrypts whole tables, no per-item context
            assert via == {"Fn::Sub": "ssm.${AWS::Region}.amazonaws.com"}, where
            scope = _resource_key(condition["StringLike"]["kms:EncryptionContext:PARAMETER_ARN"])
            assert scope.startswith(PARAM_ARN + "/"), where
        if service == "logs":
            assert len(keys) == 1, where
            assert re.fullmatch(r"GetAtt:\w+LogGroup\.Arn", keys[0]), where


@pytest.mark.parametrize("scenario", ["defaults", "accept_install_kms", "dynamodb_accept_install_kms"])
def test_no_wildcards_in_iam(template: dict[str, Any], scenario: str) -> None:
    resources = effective(template, scenario)["Resources"]
    for name, res in resources.items():
        if res["Type"] == "AWS::IAM::Role":
            for i, stmt in enumerate(role_statements(resources, name)):
                _check_statement(stmt, f"{name}[{i}]")


def test_kms_is_granted_only_with_a_customer_managed_key(template: dict[str, Any]) -> None:
    for scenario in ("defaults", "accept_install", "dynamodb", "dynamodb_accept_install"):
        resources = effective(template, scenario)["Resources"]
        for role in ROLES.values():
            actions = {action for action, _ in grants(role_statements(resources, role))}
            assert not {a for a in actions if a.startswith("kms:")}, f"{role} in {scenario}"


# ---------------------------------------------------------------------------------------------
# Queues and the worker's event source
# ---------------------------------------------------------------------------------------------


def test_queues_are_fifo_encrypted_with_a_dead_letter_queue(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    queue, dlq = resources["WorkQueue"]["Properties"], resources["DeadLetterQueue"]["Properties"]
    for props in (queue, dlq):
        assert props["FifoQueue"] is True
        assert props.get("SqsManagedSseEnabled") is True or "KmsMasterKeyId" in props
    assert queue["ContentBasedDeduplication"] is False
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]},
        "maxReceiveCount": 5,
    }
    assert dlq["MessageRetentionPeriod"] == 1209600
    assert "RedrivePolicy" not in dlq
    worker_timeout = function_prop(template, "WorkerFunction", "Timeout")
    assert queue["VisibilityTimeout"] >= 6 * worker_timeout


def test_worker_consumes_the_queue_with_partial_batch_failures(template: dict[str, Any]) -> None:
    (event,) = template["Resources"]["WorkerFunction"]["Properties"]["Events"].values()
    assert event["Type"] == "SQS"
    props = event["Properties"]
    assert props["Queue"] == {"Fn::GetAtt": ["WorkQueue", "Arn"]}
    assert props["BatchSize"] == 10
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert props["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "WorkerMaxConcurrency"}}
    assert "MaximumBatchingWindowInSeconds" not in props, "FIFO event sources take no batching window"
    param = template["Parameters"]["WorkerMaxConcurrency"]
    assert (param["MinValue"], param["MaxValue"]) == (2, 1000)
    assert 2 <= param["Default"] <= 1000


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------


def test_schedule_passes_its_scheduled_time(template: dict[str, Any]) -> None:
    props = template["Resources"]["SchedulerFunction"]["Properties"]
    (event,) = props["Events"].values()
    assert event["Type"] == "ScheduleV2"
    schedule = event["Properties"]
    assert schedule["OmitName"] is True
    assert schedule["ScheduleExpression"] == {"Ref": "SweepSchedule"}
    assert schedule["ScheduleExpressionTimezone"] == {"Ref": "SweepTimezone"}
    assert json.loads(schedule["Input"]) == {"scheduled_time": "<aws.scheduler.scheduled-time>"}
    assert schedule.get("State", "ENABLED") == "ENABLED"
    assert 0 <= props["EventInvokeConfig"]["MaximumRetryAttempts"] <= 2
    assert template["Parameters"]["SweepSchedule"]["Default"].startswith("cron(")
    assert template["Parameters"]["SweepTimezone"]["Default"] == "UTC"


# ---------------------------------------------------------------------------------------------
# Environment (design §4)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["defaults", "oauth_url", "dynamodb"])
def test_every_function_gets_the_spec_environment(template: dict[str, Any], scenario: str) -> None:
    tpl = effective(template, scenario)
    for function in FUNCTIONS:
        env = function_env(tpl, function)
        assert set(env) <= SPEC_ENV, f"{function}: names outside design §4: {set(env) - SPEC_ENV}"
        assert env["B24_SSM_PREFIX"] == {"Ref": "SsmPrefix"}
        assert env["B24_DRY_RUN"] == {"Ref": "DryRun"}
        assert env["B24_REVOKED_GRACE_DAYS"] == {"Ref": "RevokedGraceDays"}
        assert env["POWERTOOLS_SERVICE_NAME"] == "b24-cleanup"
        assert env["POWERTOOLS_METRICS_NAMESPACE"] == {"Ref": "MetricsNamespace"}
        if scenario == "oauth_url":
            assert env["B24_OAUTH_URL"] == {"Ref": "OAuthUrl"}
        else:
            assert "B24_OAUTH_URL" not in env, "an empty OAuthUrl must leave the variable unset"
        if function in ("EndpointFunction", "SchedulerFunction"):
            assert env["B24_QUEUE_URL"] == {"Ref": "WorkQueue"}
        if function == "EndpointFunction":
            assert env["B24_ACCEPT_INSTALL"] == {"Ref": "AcceptInstall"}
        else:
            assert "B24_ACCEPT_INSTALL" not in env
        assert env["B24_STORE"] == {"Ref": "TokenStore"}
        if scenario == "dynamodb":
            assert env["B24_TABLE"] == {"Ref": "PortalTable"}
        else:
            assert "B24_TABLE" not in env
        if function == "WorkerFunction":
            assert env["B24_SSM_WRITE_RATE"] == {"Ref": "SsmWriteRate"}
            assert env["B24_WORKER_CONCURRENCY"] == {"Ref": "WorkerMaxConcurrency"}
        if function == "SchedulerFunction":
            assert env["B24_SWEEP_EVERY_NIGHTS"] == {"Ref": "SweepEveryNights"}
        if function == "WorkerFunction":
            assert env["B24_ORPHAN_GRACE_DAYS"] == {"Ref": "OrphanGraceDays"}
        else:
            assert "B24_ORPHAN_GRACE_DAYS" not in env, "only the worker holds orphans"
    params = template["Parameters"]
    assert params["MetricsNamespace"]["Default"] == "B24Cleanup"
    assert params["DryRun"]["Default"] == "false"
    assert params["AcceptInstall"]["Default"] == "false"
    assert params["RevokedGraceDays"]["Default"] == 7
    assert params["OrphanGraceDays"]["Default"] == 2
    assert (params["OrphanGraceDays"]["MinValue"], params["OrphanGraceDays"]["MaxValue"]) == (0, 365)
    assert params["SsmPrefix"]["Default"] == "/b24-cleanup/prod"


def _matches(template: dict[str, Any], param: str, value: str) -> bool:
    return re.fullmatch(template["Parameters"][param]["AllowedPattern"], value) is not None


def test_parameter_patterns(template: dict[str, Any]) -> None:
    for good in ("/b24-cleanup/prod", "/a", "/team.x/b24_cleanup/stage-1"):
        assert _matches(template, "SsmPrefix", good), good
    for bad in ("/b24-cleanup/prod/", "b24-cleanup/prod", "/", "/aws/x", "/ssm/x", "/a b", "/a//b", ""):
        assert not _matches(template, "SsmPrefix", bad), bad
    assert not _matches(template, "SsmPrefix", "/a" * 14), "portal names would exceed 15 levels"
    for good in ("", "https://oauth.bitrix.info/oauth/token/", "https://oauth.example:8443/token"):
        assert _matches(template, "OAuthUrl", good), good
    for bad in ("http://oauth.bitrix.info/oauth/token/", "oauth.bitrix.info", "https://"):
        assert not _matches(template, "OAuthUrl", bad), bad
    assert _matches(template, "SsmKmsKeyArn", "")
    assert _matches(template, "SsmKmsKeyArn", KEY_ARN)
    assert not _matches(template, "SsmKmsKeyArn", "alias/aws/ssm")
    assert not _matches(template, "SsmKmsKeyArn", "arn:aws:kms:us-east-1:123456789012:alias/mine")
    for param, value in (
        ("AlarmEmail", "ops@example.com"),
        ("AlarmTopicArn", SCENARIOS["alarm_topic"]["AlarmTopicArn"]),
    ):
        assert _matches(template, param, value)
        assert _matches(template, param, "")
    assert _matches(template, "SweepSchedule", template["Parameters"]["SweepSchedule"]["Default"])


# ---------------------------------------------------------------------------------------------
# Alarms and dashboard (design §6)
# ---------------------------------------------------------------------------------------------


def _alarm_metrics(props: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if "MetricName" in props:
        yield {k: props.get(k) for k in ("Namespace", "MetricName", "Dimensions")}
    for query in props.get("Metrics", []):
        if "MetricStat" in query:
            yield query["MetricStat"]["Metric"]


def test_alarms_use_spec_metric_names_and_the_action_dimension(template: dict[str, Any]) -> None:
    custom: set[tuple[str, str]] = set()
    for name, res in template["Resources"].items():
        if res["Type"] != "AWS::CloudWatch::Alarm":
            continue
        props = res["Properties"]
        assert props["TreatMissingData"] == "notBreaching", name
        for metric in _alarm_metrics(props):
            if metric["Namespace"] == {"Ref": "MetricsNamespace"}:
                assert metric["MetricName"] in SPEC_METRICS, f"{name}: {metric['MetricName']}"
                (dimension,) = metric["Dimensions"]
                assert dimension["Name"] == "action", name
                assert dimension["Value"] in SPEC_ACTIONS, name
                custom.add((metric["MetricName"], dimension["Value"]))
            else:
                assert metric["Namespace"] in ("AWS/SQS", "AWS/Lambda"), name
    assert {
        ("PortalsFailed", "sweep"),
        ("PortalsFailed", "uninstall"),
        ("UninstallRejected", "endpoint"),
        ("DeclaredSetInvalid", "scheduler"),
    } <= custom


def test_operational_alarms_exist(template: dict[str, Any]) -> None:
    alarms = [r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::CloudWatch::Alarm"]
    dlq = [a for a in alarms if a.get("MetricName") == "ApproximateNumberOfMessagesVisible"]
    assert len(dlq) == 1
    assert dlq[0]["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]}}]
    assert (dlq[0]["Threshold"], dlq[0]["ComparisonOperator"]) == (0, "GreaterThanThreshold")
    errors = {
        a["Dimensions"][0]["Value"]["Ref"]
        for a in alarms
        if (a.get("Namespace"), a.get("MetricName")) == ("AWS/Lambda", "Errors")
    }
    assert errors == set(FUNCTIONS)
    rejected = [a for a in alarms if a.get("MetricName") == "UninstallRejected"]
    assert len(rejected) == 1
    assert rejected[0]["Threshold"] >= 10
    assert rejected[0]["Period"] <= 300


def test_held_alarm_compares_each_night_with_the_night_before(template: dict[str, Any]) -> None:
    props = template["Resources"]["HandlersHeldJumpAlarm"]["Properties"]
    (held,) = [q for q in props["Metrics"] if "MetricStat" in q]
    (jump,) = [q for q in props["Metrics"] if "Expression" in q]
    assert held["MetricStat"]["Metric"]["MetricName"] == "HandlersHeld"
    assert held["MetricStat"]["Metric"]["Dimensions"] == [{"Name": "action", "Value": "sweep"}]
    assert (held["MetricStat"]["Period"], held["MetricStat"]["Stat"]) == (86400, "Sum")
    assert held["ReturnData"] is False and jump["ReturnData"] is True
    assert jump["Expression"] == f"DIFF(FILL({held['Id']}, 0))"
    # Two daily periods: DIFF needs the night before; CloudWatch allows up to 7 days for periods >= 1 h.
    assert (props["EvaluationPeriods"], props["DatapointsToAlarm"]) == (2, 1)
    assert props["EvaluationPeriods"] * held["MetricStat"]["Period"] <= 7 * 86400
    assert props["ComparisonOperator"] == "GreaterThanThreshold"
    assert props["Threshold"] == {"Ref": "HeldJumpThreshold"}
    assert template["Parameters"]["HeldJumpThreshold"]["Default"] == 0
    alarms = next(w for w in _dashboard(template)["widgets"] if w["type"] == "alarm")["properties"]["alarms"]
    assert "<HandlersHeldJumpAlarm.Arn>" in alarms


@pytest.mark.parametrize(
    ("scenario", "targets"),
    [
        ("defaults", []),
        ("alarm_email", [{"Ref": "AlarmTopic"}]),
        ("alarm_topic", [{"Ref": "AlarmTopicArn"}]),
    ],
)
def test_alarm_actions_follow_the_parameters(template: dict[str, Any], scenario: str, targets: list) -> None:
    resources = effective(template, scenario)["Resources"]
    assert ("AlarmTopic" in resources) == (scenario == "alarm_email")
    for name, res in resources.items():
        if res["Type"] == "AWS::CloudWatch::Alarm":
            assert res["Properties"].get("AlarmActions", []) == targets, name


def _dashboard(template: dict[str, Any]) -> dict[str, Any]:
    body = template["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    assert isinstance(body, str)
    known = set(template["Parameters"]) | {"AWS::Region", "AWS::StackName", "AWS::AccountId", "AWS::Partition"}
    for variable in _sub_variables(body):
        name, _, attribute = variable.partition(".")
        assert name in known or name in template["Resources"], f"unknown ${{{variable}}}"
        if attribute:
            assert name in template["Resources"], variable
    return json.loads(_render_sub(body, {"MetricsNamespace": "@NS"}))


def test_dashboard_graphs_every_spec_metric_by_action(template: dict[str, Any]) -> None:
    dashboard = _dashboard(template)
    seen: set[str] = set()
    aws: set[tuple[str, str, str]] = set()
    for widget in dashboard["widgets"]:
        if widget["type"] != "metric":
            continue
        for row in widget["properties"]["metrics"]:
            if len(row) == 1 and "expression" in row[0]:
                continue  # a metric-math row: its inputs are rows of their own
            fields = [f for f in row if not isinstance(f, dict)]
            assert "." not in fields, f"write metric rows out in full: {row}"
            namespace, metric, *dimensions = fields
            if namespace == "@NS":
                assert metric in SPEC_METRICS, metric
                assert len(dimensions) == 2, row
                assert dimensions[0] == "action", row
                assert dimensions[1] in SPEC_ACTIONS, row
                seen.add(metric)
            else:
                assert namespace in ("AWS/SQS", "AWS/Lambda"), row
                aws.add((namespace, metric, dimensions[1]))
    assert seen == SPEC_METRICS, f"not graphed: {SPEC_METRICS - seen}"
    assert ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "<DeadLetterQueue.QueueName>") in aws
    for function in FUNCTIONS:
        assert ("AWS/Lambda", "Errors", f"<{function}>") in aws


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def test_outputs(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    assert outputs["UninstallUrl"]["Value"] == {"Fn::GetAtt": ["EndpointFunctionUrl", "FunctionUrl"]}
    assert "ONAPPUNINSTALL" in outputs["UninstallUrl"]["Description"]
    assert outputs["WorkQueueUrl"]["Value"] == {"Ref": "WorkQueue"}
    assert outputs["DeadLetterQueueUrl"]["Value"] == {"Ref": "DeadLetterQueue"}
    assert "${Dashboard}" in outputs["DashboardUrl"]["Value"]["Fn::Sub"]
    for function in FUNCTIONS:
        assert outputs[f"{function}Name"]["Value"] == {"Ref": function}


# ---------------------------------------------------------------------------------------------
# The SAM translation (needs the SAM CLI's translator from .ci/install-sam)
# ---------------------------------------------------------------------------------------------

_TRANSLATE = r"""
import json, sys
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

class NoManagedPolicies:
    def load(self):
        return {}

with open(sys.argv[1], encoding="utf-8") as f:
    tpl = yaml_parse(f.read())
for res in tpl["Resources"].values():
    if res.get("Type") == "AWS::Serverless::Function":
        res["Properties"]["CodeUri"] = "s3://bucket/key"  # what `sam deploy` substitutes
json.dump(transform(tpl, {}, NoManagedPolicies()), sys.stdout)
"""


@pytest.fixture(scope="module")
def translated() -> dict[str, Any]:
    if not SAM_PYTHON.exists():
        skip_or_fail("SAM CLI not installed in .tools/sam (run .ci/install-sam) - SAM translation not checked")
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1", "SAM_CLI_TELEMETRY": "0"}
    proc = subprocess.run(
        [str(SAM_PYTHON), "-c", _TRANSLATE, str(TEMPLATE)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("scenario", ["defaults", "accept_install_kms"])
def test_translated_template_has_no_wildcard_iam_and_one_public_url(translated: dict[str, Any], scenario: str) -> None:
    conditions = _condition_values(translated, SCENARIOS[scenario])
    resources = {
        name: res for name, res in translated["Resources"].items()
        if "Condition" not in res or conditions[res["Condition"]]
    }  # fmt: skip
    resources = _resolve_ifs(resources, conditions)
    by_type: dict[str, list[str]] = {}
    for name, res in resources.items():
        by_type.setdefault(res["Type"], []).append(name)

    # Exactly one URL, unauthenticated, on the endpoint; its permissions are the only public ones.
    (url,) = by_type["AWS::Lambda::Url"]
    assert resources[url]["Properties"]["AuthType"] == "NONE"
    assert resources[url]["Properties"]["TargetFunctionArn"] == {"Ref": "EndpointFunction"}
    for name in by_type.get("AWS::Lambda::Permission", []):
        props = resources[name]["Properties"]
        assert props["FunctionName"] == {"Ref": "EndpointFunction"}, name
        assert props["Principal"] == "*", name
        assert props.get("FunctionUrlAuthType") == "NONE" or props.get("InvokedViaFunctionUrl") is True, name
    for api_type in ("AWS::ApiGateway::RestApi", "AWS::ApiGatewayV2::Api", "AWS::ElasticLoadBalancingV2::LoadBalancer"):
        assert api_type not in by_type

    # Every role, including the ones SAM generates (the schedule's invoke role).
    assert len(by_type["AWS::IAM::Role"]) == 4
    for name in by_type["AWS::IAM::Role"]:
        props = resources[name]["Properties"]
        assert not props.get("ManagedPolicyArns"), f"{name} attaches managed policies"
        for i, stmt in enumerate(role_statements(resources, name)):
            _check_statement(stmt, f"{name}[{i}]")
    (schedule,) = by_type["AWS::Scheduler::Schedule"]
    schedule_role = resources[schedule]["Properties"]["Target"]["RoleArn"]["Fn::GetAtt"][0]
    assert grants(role_statements(resources, schedule_role)) == {
        ("lambda:InvokeFunction", "GetAtt:SchedulerFunction.Arn")
    }

    (mapping,) = by_type["AWS::Lambda::EventSourceMapping"]
    props = resources[mapping]["Properties"]
    assert props["FunctionName"] == {"Ref": "WorkerFunction"}
    assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert props["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "WorkerMaxConcurrency"}}

    for function in FUNCTIONS:
        fn = resources[function]["Properties"]
        assert fn["LoggingConfig"] == {"LogFormat": "JSON", "LogGroup": {"Ref": LOG_GROUPS[function]}}
        assert fn["Role"] == {"Fn::GetAtt": [ROLES[function], "Arn"]}


# ---------------------------------------------------------------------------------------------
# The built artifact (needs `sam build` output from .ci/check-template)
# ---------------------------------------------------------------------------------------------

# What the Lambda python runtime itself provides: the AWS SDK and its dependencies. Anything else
# a handler imports must come from the artifact.
RUNTIME_PROVIDED = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "six", "urllib3")
MUST_BE_BUNDLED = ("b24_cleanup", "requests", "aws_lambda_powertools")
NOT_IN_ARTIFACT = ("boto3", "botocore", "moto", "pytest", "_pytest", "cfnlint", "b24_cleanup.egg-info")

_IMPORT = r"""
import importlib, json, sys, sysconfig
fn_dir, runtime_dir, handler_path = sys.argv[1:4]
sys.path[:0] = [fn_dir, runtime_dir]
module_name, attr = handler_path.rsplit(".", 1)
handler = getattr(importlib.import_module(module_name), attr)
# Handlers may import these lazily; import them here so their origin is checked either way.
for name in ("b24_cleanup", "requests", "aws_lambda_powertools"):
    importlib.import_module(name)
out = {
    "callable": callable(handler),
    "version": "%d.%d" % sys.version_info[:2],
    "stdlib": sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}),
    "files": {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())},
}
if module_name.endswith(".endpoint"):
    class Context:
        function_name = "endpoint"
        function_version = "$LATEST"
        memory_limit_in_mb = 256
        invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:endpoint"
        aws_request_id = "00000000-0000-0000-0000-000000000000"
        def get_remaining_time_in_millis(self):
            return 10000
    def request(method, body):
        return {"version": "2.0", "rawPath": "/", "rawQueryString": "", "isBase64Encoded": False,
                "headers": {"content-type": "application/x-www-form-urlencoded"}, "body": body,
                "requestContext": {"requestId": "r-1", "http": {"method": method, "path": "/"}}}
    # design §5: non-POST -> 405; missing auth fields -> 400. Neither may touch AWS.
    out["get_status"] = handler(request("GET", ""), Context())["statusCode"]
    out["bad_post_status"] = handler(request("POST", "event=ONAPPUNINSTALL"), Context())["statusCode"]
print("RESULT " + json.dumps(out))
"""


def _runtime_python(version: str) -> str | None:
    """An interpreter of the Lambda runtime's version: pyenv's newest 3.13.x, else python3.13 on PATH."""
    candidates: list[str] = []
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False).stdout.strip()
        listed = subprocess.run(
            [pyenv, "versions", "--bare", "--skip-aliases"], capture_output=True, text=True, check=False
        ).stdout.split()
        ours = [v for v in listed if re.fullmatch(rf"{re.escape(version)}\.\d+", v)]
        ours.sort(key=lambda v: tuple(int(p) for p in v.split(".")), reverse=True)
        candidates += [f"{root}/versions/{v}/bin/python{version}" for v in ours]
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    for candidate in candidates:
        try:
            proc = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
        except OSError:
            continue
        if proc.returncode == 0 and proc.stdout.strip() == version:
            return candidate
    return None


def _source_files(base: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(base)): p.read_bytes()
        for p in base.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


# What functions/Makefile leaves out of the Lambda artifact (never imported there).
OPERATOR_ONLY = ("ops/",)


@pytest.fixture(scope="module")
def build() -> dict[str, Any]:
    built_template = BUILD_DIR / "template.yaml"
    if not built_template.exists():
        skip_or_fail("no `sam build` output in .aws-sam/build (run .ci/check-template) - artifact not checked")
    built = load_template(built_template)
    for function in FUNCTIONS:
        fn_dir = BUILD_DIR / built["Resources"][function]["Properties"]["CodeUri"]
        lambda_sources = {
            name: data
            for name, data in _source_files(ROOT / "functions" / "b24_cleanup").items()
            if not name.startswith(OPERATOR_ONLY)
        }
        if _source_files(fn_dir / "b24_cleanup") != lambda_sources:
            skip_or_fail(f".aws-sam/build is older than functions/ ({function}); re-run .ci/check-template")
    return built


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for the runtime's own site-packages: links to the SDK packages only."""
    target = tmp_path_factory.mktemp("lambda-runtime")
    for name in RUNTIME_PROVIDED:
        spec = find_spec(name)
        assert spec is not None, f"{name} is not installed in the test environment"
        assert spec.origin, name
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (target / source.name).symlink_to(source, target_is_directory=source.is_dir())
    return target


def _import_env(template: dict[str, Any], function: str, fn_dir: Path, home: Path) -> dict[str, str]:
    """The function's environment as the template sets it (default parameters), plus Lambda's own."""
    defaults = {name: str(spec.get("Default", "")) for name, spec in template["Parameters"].items()}
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        # Any AWS call made by mistake fails at once on a closed local port instead of going out.
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
        "AWS_LAMBDA_FUNCTION_NAME": function,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
        "LAMBDA_TASK_ROOT": str(fn_dir),
        "_HANDLER": FUNCTIONS[function],
    }
    for name, value in function_env(effective(template, "defaults"), function).items():
        if isinstance(value, str):
            env[name] = value
        elif set(value) == {"Ref"} and value["Ref"] in defaults:
            env[name] = defaults[value["Ref"]]
        elif value == {"Ref": "WorkQueue"}:
            env[name] = "https://sqs.us-east-1.amazonaws.com/123456789012/b24-cleanup-WorkQueue.fifo"
        else:
            raise AssertionError(f"{function}: cannot stand in for {name}={value!r}")
    return env


def test_build_output_is_one_arm64_artifact_without_the_sdk(build: dict[str, Any]) -> None:
    for function, handler in FUNCTIONS.items():
        props = build["Resources"][function]["Properties"]
        assert props["Handler"] == handler
        fn_dir = BUILD_DIR / props["CodeUri"]
        for name in MUST_BE_BUNDLED:
            assert (fn_dir / name / "__init__.py").is_file(), f"{function}: {name} is not in the artifact"
        for name in NOT_IN_ARTIFACT:
            assert not (fn_dir / name).exists(), f"{function}: {name} must not be in the artifact"
        for lib in fn_dir.rglob("*.so"):
            assert "aarch64" in lib.name, f"{function}: {lib.name} is not built for arm64"


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_built_handler_imports_in_a_fresh_interpreter(
    build: dict[str, Any], runtime_dir: Path, template: dict[str, Any], function: str, tmp_path: Path
) -> None:
    version = build["Globals"]["Function"]["Runtime"].removeprefix("python")
    python = _runtime_python(version)
    if python is None:
        skip_or_fail(f"no python{version} (the Lambda runtime's version) found to import the artifact with")
    fn_dir = (BUILD_DIR / build["Resources"][function]["Properties"]["CodeUri"]).resolve()
    # -I: no PYTHON* variables, no user site, no cwd on sys.path; -S: no site-packages at all
    # (so not the project's venv nor its editable install). sys.path = artifact, runtime SDK, stdlib.
    # -B: write no __pycache__ into the artifact (it would be deployed) or the linked SDK.
    proc = subprocess.run(
        [python, "-I", "-S", "-B", "-c", _IMPORT, str(fn_dir), str(runtime_dir), FUNCTIONS[function]],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
        env=_import_env(template, function, fn_dir, tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, f"import of {FUNCTIONS[function]} failed:\n{proc.stderr[-4000:]}"
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["callable"]
    assert result["version"] == version

    files = {name: path for name, path in result["files"].items() if path}
    for name in MUST_BE_BUNDLED:
        assert name in files, f"{name} was not imported"
        assert files[name].startswith(str(fn_dir) + os.sep), f"{name} came from {files[name]}, not the artifact"
    allowed = [str(fn_dir) + os.sep, str(runtime_dir) + os.sep] + [p + os.sep for p in result["stdlib"]]
    strays = {name: path for name, path in files.items() if not any(path.startswith(a) for a in allowed)}
    assert not strays, f"modules loaded from outside the artifact and the runtime: {strays}"

    if function == "EndpointFunction":
        assert result["get_status"] == 405
        assert result["bad_post_status"] == 400


def test_runtime_stand_in_does_not_offer_what_the_artifact_must_carry(runtime_dir: Path) -> None:
    # The import test proves the artifact carries requests and Powertools only if the stand-in
    # for the runtime cannot supply them.
    offered = {p.name.removesuffix(".py") for p in runtime_dir.iterdir()}
    assert offered == set(RUNTIME_PROVIDED)
    assert not offered & set(MUST_BE_BUNDLED)


def test_samconfig_makes_build_and_guided_deploy_enough() -> None:
    config = tomllib.loads((ROOT / "samconfig.toml").read_text(encoding="utf-8"))["default"]
    assert config["global"]["parameters"]["stack_name"] == "b24-cleanup"
    deploy = config["deploy"]["parameters"]
    assert deploy["resolve_s3"] is True
    assert deploy["capabilities"] == "CAPABILITY_IAM"
    assert deploy["confirm_changeset"] is True


def test_artifact_is_precompiled_for_the_runtime_and_lambda_only(build: dict[str, Any]) -> None:
    """functions/Makefile ships unchecked-hash .pyc for 3.13 (no compile on a cold start) and no operator code."""
    for function in FUNCTIONS:
        fn_dir = BUILD_DIR / build["Resources"][function]["Properties"]["CodeUri"]
        for module in ("b24_cleanup/handlers/worker.py", "aws_lambda_powertools/logging/logger.py", "requests/api.py"):
            source = fn_dir / module
            pyc = source.parent / "__pycache__" / f"{source.stem}.cpython-313.pyc"
            assert pyc.is_file(), f"{function}: {module} is not precompiled for python3.13"
            flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
            assert flags == 0b01, f"{function}: {module}'s .pyc is not unchecked-hash (flags {flags:#b})"
        for name in OPERATOR_ONLY:
            assert not (fn_dir / "b24_cleanup" / name.rstrip("/")).exists(), f"{function} ships {name}"


# ---------------------------------------------------------------------------------------------
# Past SSM: the DynamoDB store and the sweep's budget (design §3a, §4)
# ---------------------------------------------------------------------------------------------


def test_the_table_exists_only_with_token_store_dynamodb(template: dict[str, Any]) -> None:
    param = template["Parameters"]["TokenStore"]
    assert param["Default"] == "ssm" and param["AllowedValues"] == ["ssm", "dynamodb"]
    assert "PortalTable" not in effective(template, "defaults")["Resources"]
    assert "PortalTable" in effective(template, "dynamodb")["Resources"]


@pytest.mark.parametrize("scenario", ["dynamodb", "dynamodb_accept_install_kms"])
def test_the_table_is_on_demand_recoverable_protected_and_keyed_by_member_id(
    template: dict[str, Any], scenario: str
) -> None:
    table = effective(template, scenario)["Resources"]["PortalTable"]
    # The only copy of every portal's refresh token: never dropped with the stack.
    assert table["DeletionPolicy"] == "Retain" and table["UpdateReplacePolicy"] == "Retain"
    props = table["Properties"]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert props["KeySchema"] == [{"AttributeName": "member_id", "KeyType": "HASH"}]
    assert props["AttributeDefinitions"] == [{"AttributeName": "member_id", "AttributeType": "S"}]
    assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert props["DeletionProtectionEnabled"] is True
    assert "TableName" not in props  # two stacks in one account must not collide
    sse = props["SSESpecification"]
    if SCENARIOS[scenario].get("SsmKmsKeyArn"):
        assert sse == {"SSEEnabled": True, "SSEType": "KMS", "KMSMasterKeyId": {"Ref": "SsmKmsKeyArn"}}
    else:
        assert sse == {"SSEEnabled": False}  # DynamoDB's default encryption at rest (AWS-owned key)


def test_no_ssm_permission_on_portal_records_with_the_table(template: dict[str, Any]) -> None:
    resources = effective(template, "dynamodb_accept_install_kms")["Resources"]
    for role in ROLES.values():
        for action, resource in grants(role_statements(resources, role)):
            assert resource != PORTALS, f"{role}: {action} on SSM portal records"
            # The one SSM write left is the orphan ledger's, which stays in SSM with either store.
            if (action, resource) != ("ssm:PutParameter", ORPHANS):
                assert action not in {"ssm:PutParameter", "ssm:DeleteParameter", "ssm:DescribeParameters"}, role


def test_write_budget_and_sharding_parameters(template: dict[str, Any]) -> None:
    params = template["Parameters"]
    assert params["SsmWriteRate"]["Default"] == 3
    every = params["SweepEveryNights"]
    assert (every["Default"], every["MinValue"], every["MaxValue"]) == (1, 1, 30)
    worker = template["Resources"]["WorkerFunction"]["Properties"]
    assert worker["Events"]["Jobs"]["Properties"]["ScalingConfig"]["MaximumConcurrency"] == {
        "Ref": "WorkerMaxConcurrency"
    }
