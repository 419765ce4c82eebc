"""RolloutFunction driven by events/rollout_schedule.json (the scheduler's event), against in-process moto:
the model store in S3, the rollout in DynamoDB, the canary's figures in CloudWatch."""

from __future__ import annotations

import datetime as dt

import boto3
import pytest
from moto import mock_aws

from tests.conftest import load_event
from tests.support.lifecycle import version
from tierserve.lifecycle.objects import S3Objects
from tierserve.lifecycle.registry import Registry
from tierserve.lifecycle.rollout import DynamoRollouts, Thresholds, new_rollout
from tierserve_tools.moto_ext import patch as moto_percentiles
from tierserve_tools.stack_ops import create_rollout_table

BUCKET = "tierserve-models-123456789012-us-east-1"


@pytest.fixture
def aws(runtime_env):
    moto_percentiles()
    with mock_aws():
        for k, v in {"MODEL_STORE_URI": f"s3://{BUCKET}/models", "ROLLOUT_TABLE": "rollouts",
                     "ROUTER_FUNCTION_NAME": "router-fn", "POWERTOOLS_METRICS_NAMESPACE": "tierserve"}.items():
            runtime_env.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        create_rollout_table(boto3.client("dynamodb"), "rollouts")
        registry = Registry(S3Objects(f"s3://{BUCKET}/models"), actor="deployer")
        registry.publish(version("m", "1"))
        registry.publish(version("m", "2"))
        yield registry


def put_figures(version: str, requests: int, errors: int) -> None:
    dims = [{"Name": "service", "Value": "tierserve"}, {"Name": "function", "Value": "router-fn"},
            {"Name": "model", "Value": "m"}, {"Name": "version", "Value": version}]
    now = dt.datetime.now(dt.UTC)
    boto3.client("cloudwatch").put_metric_data(Namespace="tierserve", MetricData=[
        {"MetricName": "Requests", "Dimensions": dims, "Value": requests, "Timestamp": now},
        {"MetricName": "Errors", "Dimensions": dims, "Value": errors, "Timestamp": now},
        {"MetricName": "Latency", "Dimensions": dims, "Values": [5.0] * (requests - errors), "Timestamp": now}])


def test_each_scheduled_tick_advances_the_rollout_and_a_failing_canary_is_rolled_back(aws, lambda_context):
    from tierserve.handlers import rollout

    # Given an unattended rollout of m v2 recorded by `tierserve models rollout --unattended`
    store = DynamoRollouts("rollouts")
    store.put(new_rollout(aws, "m", "2", [10, 100], 300, Thresholds(max_error_rate=0.01, min_requests=20), 0.0))
    event = load_event("rollout_schedule.json")
    # When the schedule fires: Then the first tick applies the first step
    assert rollout.lambda_handler(event, lambda_context)["rollouts"]["m"]["status"] == "running"
    assert aws.entry("m").canary == {"version": "2", "percent": 10}
    # When the canary's figures show 10% errors (the default's none), the next tick rolls it back at once
    put_figures("2", requests=30, errors=3)
    put_figures("1", requests=270, errors=0)
    result = rollout.lambda_handler(event, lambda_context)["rollouts"]["m"]
    assert result["status"] == "rolled_back" and "error rate 10.00% > 1.00%" in result["reason"]
    assert aws.entry("m").canary is None and aws.entry("m").default_version == "1"
    last = aws.history("m")[-1]
    assert last["action"] == "rollback" and last["details"]["figures"]["canary"]["requests"] == 30
    # And a later tick has nothing left to do
    assert rollout.lambda_handler(event, lambda_context) == {"rollouts": {}}
