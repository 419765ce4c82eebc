"""tierserve.batch.spec: S3 records and job messages become validated jobs, with their idempotency keys."""

from __future__ import annotations

import pytest

from tests.support.make_batch_events import s3_put_event
from tests.unit.batch.conftest import BUCKET
from tierserve.batch.locations import BatchInputError
from tierserve.batch.spec import job_from_message, job_from_s3_record
from tierserve.errors import InvalidNameError


def test_s3_records_and_job_messages_become_validated_jobs():
    # Given an S3 record (URL-encoded key) and a job message
    rec = s3_put_event(key="batch/in/digits/night%2D1.jsonl", etag="abc", size=1)["Records"][0]
    # When they are parsed
    s3_job = job_from_s3_record(rec)
    msg_job = job_from_message({"model": "digits", "version": "1", "input": f"s3://{BUCKET}/any/where/x.npz"})
    # Then both name their model, input and default output; redeliveries share an idempotency key
    assert s3_job.input.key == "batch/in/digits/night-1.jsonl" and s3_job.output.key == "batch/out/digits/night-1"
    assert s3_job.input_version == {"etag": "abc"}
    assert job_from_s3_record(rec).idempotency_key == s3_job.idempotency_key
    assert msg_job.output.key == "batch/out/digits/x" and msg_job.version == "1"
    assert job_from_message({"model": "digits", "input": f"s3://{BUCKET}/a.jsonl", "continuation": 3}
                            ).idempotency_key != job_from_message({"model": "digits", "input": f"s3://{BUCKET}/a.jsonl"}
                                                                  ).idempotency_key
    # And bad names, keys and shapes are refused with a reason
    with pytest.raises(InvalidNameError):
        job_from_message({"model": "../etc", "input": f"s3://{BUCKET}/a.jsonl"})
    with pytest.raises(BatchInputError, match="not batch/in"):
        job_from_s3_record(s3_put_event(key="batch/in/x.jsonl", etag="e", size=1)["Records"][0])
    with pytest.raises(BatchInputError, match="job message"):
        job_from_message({"input": "s3://b/a.jsonl"})
