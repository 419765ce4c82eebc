"""In-process AWS (moto.mock_aws) holding the batch resources template.yaml defines."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tierserve.app import reset_runtime

BUCKET = "tierserve-models-123456789012-us-east-1"
TABLE = "tierserve-jobs"


@contextmanager
def mocked_batch_aws(env: pytest.MonkeyPatch, store: Path, **extra_env: str) -> Iterator[dict[str, Any]]:
    """Bucket, job table and queues (with DLQs) in mock_aws; the batch settings point at them."""
    import boto3
    from moto import mock_aws

    from tierserve_tools.batch import create_local_stack

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        env.setenv(k, v)
    env.delenv("AWS_ENDPOINT_URL", raising=False)
    env.setenv("MODEL_STORE_URI", str(store))
    env.setenv("JOB_TABLE", TABLE)
    env.setenv("CHECKPOINT_MARGIN_MS", "1000")
    for k, v in extra_env.items():
        env.setenv(k, v)
    reset_runtime()
    try:
        with mock_aws():
            s3, sqs, ddb = boto3.client("s3"), boto3.client("sqs"), boto3.client("dynamodb")
            urls = create_local_stack(s3, ddb, sqs, BUCKET, TABLE)
            env.setenv("CONTINUATION_QUEUE_URL", urls["jobs_queue_url"])
            yield {"s3": s3, "sqs": sqs, "ddb": ddb, **urls}
    finally:
        reset_runtime()
