"""BatchInferenceFunction driven by the JSON in events/ (in-process moto for S3, SQS and DynamoDB)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_event
from tests.support.batch_aws import mocked_batch_aws
from tests.support.make_batch_events import BUCKET, INPUT_KEY, demo_jsonl
from tierserve.handlers import batch_inference


@pytest.fixture
def aws(runtime_env, digits_store):
    with mocked_batch_aws(runtime_env, digits_store) as clients:
        clients["s3"].put_object(Bucket=BUCKET, Key=INPUT_KEY, Body=demo_jsonl())  # the object events/ describe
        yield clients["s3"]


def _read(s3, key: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_sqs_batch_event_scores_the_demo_file_and_acknowledges_the_test_event(aws, lambda_context):
    # Given events/sqs_batch.json: an S3 ObjectCreated notification and S3's s3:TestEvent
    event = load_event("sqs_batch.json")
    # When the function handles it
    result = batch_inference.lambda_handler(event, lambda_context)
    # Then no item failed, and the job's output has one line per input line, in order, then _SUCCESS
    assert result == {"batchItemFailures": []}
    lines = [json.loads(x) for x in _read(aws, "batch/out/digits/demo-job/part-00000.jsonl").splitlines()]
    assert [x["id"] for x in lines] == [f"demo-{i}" for i in range(16)]
    first = {o["name"]: o for o in lines[0]["outputs"]}
    assert first["label"]["datatype"] == "INT64" and first["probabilities"]["shape"] == [1, 10]
    assert abs(sum(first["probabilities"]["data"]) - 1) < 1e-4
    success = json.loads(_read(aws, "batch/out/digits/demo-job/_SUCCESS"))
    assert success["counts"]["output_lines"] == 16 and success["model_version"] == "1"
    # And a redelivery of the same event is answered from the idempotency record
    assert batch_inference.lambda_handler(event, lambda_context) == {"batchItemFailures": []}


def test_sqs_job_event_writes_to_the_output_it_names(aws, lambda_context):
    # Given events/sqs_job.json: a job message naming an input and an output
    result = batch_inference.lambda_handler(load_event("sqs_job.json"), lambda_context)
    # Then the parts, errors.jsonl and _SUCCESS are written under that output
    assert result == {"batchItemFailures": []}
    keys = sorted(o["Key"] for o in aws.list_objects_v2(Bucket=BUCKET, Prefix="batch/out/digits/demo-job-from-message/")
                  ["Contents"])
    assert [k.rsplit("/", 1)[1] for k in keys] == ["_SUCCESS", "errors.jsonl", "part-00000.jsonl"]


def test_s3_put_event_invoked_directly_returns_the_job_summary(aws, lambda_context):
    # Given events/s3_put.json (what `tierserve invoke BatchInferenceFunction -e events/s3_put.json` sends)
    result = batch_inference.lambda_handler(load_event("s3_put.json"), lambda_context)
    # Then the job ran and its summary is the response
    assert result["jobs"][0]["status"] == "completed"
    assert result["jobs"][0]["counts"] == {"lines": 16, "output_lines": 16, "rows": 16, "errors": 0,
                                           "blank_lines": 0}
