"""tierserve.batch.service: the SQS entry point on in-process moto: partial failures, duplicates, S3 events."""

from __future__ import annotations

import json

import pytest

from tests.support.batch_jobs import outputs, put_jsonl, sqs_batch
from tests.support.make_batch_events import s3_put_event
from tests.unit.batch.conftest import BUCKET
from tierserve.batch import runner as batch_runner
from tierserve.batch.locations import BatchInputError
from tierserve.batch.service import specs_from_body
from tierserve.handlers import batch_inference


def test_s3_test_event_is_acknowledged_without_a_job():
    assert specs_from_body(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET})) == []


def test_poison_records_are_reported_alone(aws, lambda_context):
    # Given a batch: a good job, an unknown model, a missing object, non-JSON, and S3's test event
    key = put_jsonl(aws, "good")
    event = sqs_batch({"model": "digits", "input": f"s3://{BUCKET}/{key}"},
                   {"model": "nope", "input": f"s3://{BUCKET}/{key}", "output": f"s3://{BUCKET}/batch/out/n"},
                   {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/missing.jsonl"},
                   {"Event": "s3:TestEvent"})
    event["Records"].insert(3, {**event["Records"][0], "messageId": "m-raw", "body": "not json"})
    # When the handler processes it
    result = batch_inference.lambda_handler(event, lambda_context)
    # Then exactly the three poison messages are failed items, and the good job completed
    assert sorted(f["itemIdentifier"] for f in result["batchItemFailures"]) == ["m-raw", "m1", "m2"]
    assert json.loads(outputs(aws, "batch/out/digits/good")["_SUCCESS"])["counts"]["output_lines"] == 10


def test_duplicate_delivery_while_the_first_runs_is_a_failed_item(aws, lambda_context):
    # Given a job whose first delivery is still running when a second one arrives
    key = put_jsonl(aws, "dup")
    event = sqs_batch({"model": "digits", "input": f"s3://{BUCKET}/{key}"})
    inner = []

    def redeliver(stage: str, part: int) -> None:
        if stage == "checkpointed" and part == 0 and not inner:
            inner.append(batch_inference.lambda_handler(event, lambda_context))

    batch_runner.after_part_hook = redeliver
    # When both are handled
    outer = batch_inference.lambda_handler(event, lambda_context)
    # Then the duplicate is reported as failed (SQS retries it later) and the first one completes
    assert inner == [{"batchItemFailures": [{"itemIdentifier": "m0"}]}]
    assert outer == {"batchItemFailures": []}
    assert len(outputs(aws, "batch/out/digits/dup")) == 5  # 3 parts, errors.jsonl, _SUCCESS


def test_direct_s3_event_runs_the_job_and_a_replaced_object_is_refused(aws, lambda_context):
    # Given an object, and an S3 event for it with its real eTag
    key = put_jsonl(aws, "direct")
    etag = aws["s3"].head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
    # When the event is invoked directly (tierserve invoke -e events/s3_put.json)
    result = batch_inference.lambda_handler(s3_put_event(key=key, etag=etag, size=1), lambda_context)
    # Then the job's summary comes back
    assert result["jobs"][0]["status"] == "completed" and result["jobs"][0]["counts"]["rows"] == 10
    # And an event for an older version of a replaced object is refused, not run on the new content
    with pytest.raises(BatchInputError, match="replaced"):
        batch_inference.lambda_handler(s3_put_event(key=key, etag="0" * 32, size=1), lambda_context)


def test_poll_queue_forever_plays_the_sqs_trigger_until_stopped(aws):
    # Given a job message and a poison message in the events queue
    import threading
    import time

    from tierserve_tools.batch import poll_queue_forever

    key = put_jsonl(aws, "polled")
    aws["sqs"].send_message(QueueUrl=aws["queue_url"], MessageBody=json.dumps({"model": "digits",
                                                                               "input": f"s3://{BUCKET}/{key}"}))
    aws["sqs"].send_message(QueueUrl=aws["queue_url"], MessageBody="not json")
    stop = threading.Event()
    # When the poller runs in a thread until the job's _SUCCESS appears
    t = threading.Thread(target=poll_queue_forever, args=(aws["queue_url"], batch_inference.lambda_handler, stop),
                         kwargs={"sqs_client": aws["sqs"], "wait_s": 0}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while "_SUCCESS" not in outputs(aws, "batch/out/digits/polled") and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join(timeout=10)
    # Then it stopped, the good message was deleted, and the poison one is still in flight (not deleted)
    assert not t.is_alive()
    attrs = aws["sqs"].get_queue_attributes(QueueUrl=aws["queue_url"], AttributeNames=["All"])["Attributes"]
    assert int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"]) == 1


def test_a_tensor_job_is_run_here_never_handed_to_batch_generate_function(aws, lambda_context, runtime_env):
    # Given BatchInferenceFunction with GENERATION_JOBS_QUEUE_URL (issue 19) and a tensor job for digits
    from tierserve.app import reset_runtime

    runtime_env.setenv("GENERATION_JOBS_QUEUE_URL", aws["generate_queue_url"])
    reset_runtime()
    key = put_jsonl(aws, "tensors")
    # When it is delivered
    assert batch_inference.lambda_handler(sqs_batch({"model": "digits", "input": f"s3://{BUCKET}/{key}"}),
                                          lambda_context) == {"batchItemFailures": []}
    # Then it ran here, and nothing went to the generation queue
    assert json.loads(outputs(aws, "batch/out/digits/tensors")["_SUCCESS"])["counts"]["output_lines"] == 10
    attrs = aws["sqs"].get_queue_attributes(QueueUrl=aws["generate_queue_url"],
                                            AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0"


def test_a_parquet_job_in_a_package_without_pyarrow_is_refused_with_a_clear_error(aws, lambda_context, runtime_env,
                                                                               monkeypatch):
    # Given BatchGenerateFunction's package (no pyarrow) and a Parquet job sent to it
    import sys

    from tests.support.batch_inputs import parquet_bytes
    from tests.support.batch_jobs import JOB_ROWS
    from tierserve.handlers import batch_generate

    key = "batch/in/digits/cols.parquet"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=parquet_bytes(JOB_ROWS))
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` raises ImportError
    etag = aws["s3"].head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
    # Then it is the job's poison with an error that says where such a job runs, not an ImportError
    with pytest.raises(BatchInputError, match=r"needs pyarrow.*BatchJobsQueue"):
        batch_generate.lambda_handler(s3_put_event(key=key, etag=etag, size=1), lambda_context)
    assert outputs(aws, "batch/out/digits/cols") == {}
