"""tierserve.batch.locations: S3 keys, URIs and job names checked against the allowlists."""

from __future__ import annotations

import pytest

from tierserve.batch.locations import BatchInputError, get_body, parse_s3_uri, split_input_key
from tierserve.errors import InvalidNameError


def test_keys_and_uris_are_checked_against_the_allowlists():
    # Then well-formed inputs split into model and job, and anything else is refused clearly
    assert split_input_key("batch/in/digits/night-1.jsonl") == ("digits", "night-1")
    assert split_input_key("elsewhere/x.npz") == (None, "x")
    for bad in ("batch/in/digits/../x.jsonl", "batch/in/di gits/x.jsonl", "/abs.jsonl", "batch/in/digits/x\n.jsonl"):
        with pytest.raises(InvalidNameError):
            split_input_key(bad)
    with pytest.raises(InvalidNameError):
        parse_s3_uri("s3://bucket\n/key.jsonl", "input")  # '$' would match before a final newline
    with pytest.raises(BatchInputError, match=r"\.jsonl, \.npz or \.parquet"):
        split_input_key("batch/in/digits/x.csv")
    with pytest.raises(BatchInputError, match="s3://"):
        parse_s3_uri("https://bucket/key", "input")
    with pytest.raises(InvalidNameError):
        parse_s3_uri("s3://Bad_Bucket/key.jsonl", "input")


class _RecordingS3:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[dict] = []
        self.fail = fail

    def get_object(self, **kwargs):
        self.calls.append(kwargs)
        if self.fail:
            raise self.fail
        return {"Body": b"body"}


def test_every_read_is_pinned_to_the_jobs_version_and_ranged_as_asked():
    # Given the one read of an input object (the readers' streams and the shard planner's ranged GETs)
    loc, s3 = parse_s3_uri("s3://bucket/batch/in/digits/j.jsonl", "input"), _RecordingS3()
    # Then the version id pins it, or the ETag (quoted, as HTTP spells it) where the bucket is unversioned ("null")
    assert get_body(s3, loc, {"version_id": "v1", "etag": "e"}) == b"body"
    get_body(s3, loc, {"version_id": "null", "etag": "e"}, 10)
    get_body(s3, loc, {}, 0, 5)
    get_body(s3, loc, {"etag": "e"}, 7, 9)
    assert s3.calls == [
        {"Bucket": "bucket", "Key": "batch/in/digits/j.jsonl", "VersionId": "v1"},
        {"Bucket": "bucket", "Key": "batch/in/digits/j.jsonl", "IfMatch": '"e"', "Range": "bytes=10-"},
        {"Bucket": "bucket", "Key": "batch/in/digits/j.jsonl", "Range": "bytes=0-4"},
        {"Bucket": "bucket", "Key": "batch/in/digits/j.jsonl", "IfMatch": '"e"', "Range": "bytes=7-8"},
    ]
    # And a failed read is the job's poison, saying what to check
    with pytest.raises(BatchInputError, match=r"cannot read s3://bucket/batch/in/digits/j.jsonl \(OSError: gone\); "
                                              "check that the object exists"):
        get_body(_RecordingS3(OSError("gone")), loc, {})
