"""Batch jobs driven through the handler in the unit tests: SQS batches, inputs put in S3, outputs read back.

Why: the runner, service, shard and closing tests all deliver job messages as Lambda's SQS trigger would
and read a job's output folder; one definition of each helper keeps them alike.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np

from tests.support.batch_aws import BUCKET
from tierserve_tools.batch import sqs_event

#: the rows of ``put_jsonl``'s lines (digits: FP32 [-1, 64])
JOB_ROWS = np.random.default_rng(3).integers(0, 17, size=(10, 64)).astype(np.float32)


def sqs_batch(*bodies: dict) -> dict:
    """The SQS event Lambda would deliver for one message per body."""
    msgs = [{"MessageId": f"m{i}", "ReceiptHandle": f"r{i}", "Body": json.dumps(b)} for i, b in enumerate(bodies)]
    return sqs_event(msgs, "arn:aws:sqs:us-east-1:123456789012:q", "us-east-1")


def put_jsonl(aws: dict[str, Any], name: str, n: int = 10) -> str:
    """``batch/in/digits/{name}.jsonl`` with ``n`` lines of ``JOB_ROWS``; its key."""
    key = f"batch/in/digits/{name}.jsonl"
    body = "".join(json.dumps({"id": f"{name}-{i}", "inputs": {"input": JOB_ROWS[i].tolist()}}) + "\n"
                   for i in range(n))
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=body.encode())
    return key


def outputs(aws: dict[str, Any], prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix/``, by its name there."""
    listed = aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: aws["s3"].get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for o in listed}


def drain(aws: dict[str, Any], shuffle_seed: int | None = None) -> list[dict]:
    """Receive every message on the jobs queue (deleting them), in a seeded random order if asked."""
    bodies = []
    while True:
        msgs = aws["sqs"].receive_message(QueueUrl=aws["jobs_queue_url"], MaxNumberOfMessages=10).get("Messages", [])
        if not msgs:
            break
        for m in msgs:
            bodies.append(json.loads(m["Body"]))
            aws["sqs"].delete_message(QueueUrl=aws["jobs_queue_url"], ReceiptHandle=m["ReceiptHandle"])
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(bodies)
    return bodies


#: the rows of ``jsonl_body``'s lines
BODY_ROWS = np.random.default_rng(5).integers(0, 17, size=(40, 64)).astype(np.float32)


def jsonl_body(n: int = 40, bad: frozenset[int] = frozenset()) -> bytes:
    """``n`` lines: shorthand rows of ``BODY_ROWS``, a blank line where ``i % 13 == 7``, broken JSON at ``bad``."""
    lines = []
    for i in range(n):
        if i in bad:
            lines.append('{"id": "broken", "inputs": ')
        elif i % 13 == 7:
            lines.append("")  # a blank line
        else:
            lines.append(json.dumps({"id": f"r{i}", "inputs": {"input": BODY_ROWS[i % len(BODY_ROWS)].tolist()}}))
    return ("\n".join(lines) + "\n").encode()
