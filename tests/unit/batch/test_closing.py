"""tierserve.batch.closing: a job's end resumes after a crash at any step, and closes once (in-process moto)."""

from __future__ import annotations

import json

import pytest

from tests.support.batch_jobs import drain, jsonl_body, outputs, sqs_batch
from tests.unit.batch.conftest import BUCKET
from tierserve.batch import closing as batch_closing
from tierserve.batch.closing import Closing
from tierserve.handlers import batch_inference


@pytest.mark.parametrize("where", ["before counting the shard", "before _SUCCESS", "after _SUCCESS"])
def test_a_crash_while_the_last_shard_closes_the_job_is_retried_by_its_redelivery(aws, lambda_context, where):
    # Given a job of 3 shards whose first two are done
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/close.jsonl", Body=jsonl_body(30, bad=frozenset({20})))
    batch_inference.lambda_handler(sqs_batch({"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/close.jsonl",
                                           "shards": 3}), lambda_context)
    msgs = sorted(drain(aws), key=lambda m: m["shard"]["index"])
    for msg in msgs[:2]:
        batch_inference.lambda_handler(sqs_batch(msg), lambda_context)
    # When the last shard's invocation dies at one step of the completion
    owner, name = {"before counting the shard": (batch_closing, "shard_done"),
                   "before _SUCCESS": (Closing, "merge_errors"),
                   "after _SUCCESS": (Closing, "delete_work")}[where]
    real = getattr(owner, name)

    def die(*args, **kwargs):
        raise RuntimeError(f"the function died {where}")

    setattr(owner, name, die)
    try:
        assert batch_inference.lambda_handler(sqs_batch(msgs[2]), lambda_context)["batchItemFailures"]
    finally:
        setattr(owner, name, real)
    assert ("_SUCCESS" in outputs(aws, "batch/out/digits/close")) == (where == "after _SUCCESS")
    # And its message is redelivered (twice, for good measure)
    for _ in range(2):
        assert batch_inference.lambda_handler(sqs_batch(msgs[2]), lambda_context) == {"batchItemFailures": []}
    # Then the job is closed once: _SUCCESS with every line counted once, the errors merged, no work left
    out = outputs(aws, "batch/out/digits/close")
    success = json.loads(out["_SUCCESS"])
    assert success["counts"]["lines"] == 30 and success["counts"]["errors"] == 1 and success["shards"] == 3
    assert [json.loads(x)["line"] for x in out["errors.jsonl"].splitlines()] == [21]
    assert not aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix="batch/work/").get("Contents")
