"""tierserve.batch.locations: S3 keys, URIs and job names checked against the allowlists."""

from __future__ import annotations

import pytest

from tierserve.batch.locations import BatchInputError, parse_s3_uri, split_input_key
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
