"""In-process AWS (moto.mock_aws) with the batch resources, and the digits model in a local store."""

from __future__ import annotations

import pytest

from tierserve.batch import jobs as batch_jobs

BUCKET = "tierserve-models-123456789012-us-east-1"
TABLE = "tierserve-jobs"


@pytest.fixture
def aws(runtime_env, digits_store):
    import boto3
    from moto import mock_aws

    from tierserve.batch.local import create_local_stack

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        runtime_env.setenv(k, v)
    runtime_env.delenv("AWS_ENDPOINT_URL", raising=False)
    runtime_env.setenv("MODEL_STORE_URI", str(digits_store))
    runtime_env.setenv("JOB_TABLE", TABLE)
    runtime_env.setenv("CHUNK_ROWS", "4")
    runtime_env.setenv("CHECKPOINT_MARGIN_MS", "1000")
    batch_jobs.reset_clients()
    with mock_aws():
        s3, sqs, ddb = boto3.client("s3"), boto3.client("sqs"), boto3.client("dynamodb")
        urls = create_local_stack(s3, ddb, sqs, BUCKET, TABLE)
        runtime_env.setenv("CONTINUATION_QUEUE_URL", urls["jobs_queue_url"])
        yield {"s3": s3, "sqs": sqs, "ddb": ddb, **urls}
    batch_jobs.after_part_hook = None
    batch_jobs.reset_clients()
