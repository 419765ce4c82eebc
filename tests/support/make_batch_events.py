"""Regenerate events/s3_put.json, events/sqs_batch.json and events/sqs_job.json.

Built from the verbatim `sam local generate-event s3 put` and `sqs receive-message` outputs
beside this script. Run: python -m tests.support.make_batch_events
"""

from __future__ import annotations

import copy
import hashlib
import json

from tests.support.make_events import DEMO_MODEL, EVENTS, HERE, write

BUCKET = "tierserve-models-123456789012-us-east-1"
INPUT_KEY = f"batch/in/{DEMO_MODEL}/demo-job.jsonl"
QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:tierserve-BatchEventsQueue"
JOBS_QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:tierserve-BatchJobsQueue"


def demo_jsonl() -> bytes:
    """The demo job's input: 16 digits rows in both line forms (the events' eTag is its md5)."""
    from tests.support.make_events import digits_rows

    lines = []
    for i, row in enumerate(digits_rows(16)):
        if i % 2:
            lines.append({"id": f"demo-{i}", "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                         "data": row}]})
        else:
            lines.append({"id": f"demo-{i}", "inputs": {"input": row}})
    return ("\n".join(json.dumps(x, separators=(",", ":")) for x in lines) + "\n").encode()


def s3_put_event(bucket: str = BUCKET, key: str = INPUT_KEY, etag: str | None = None,
                 size: int | None = None) -> dict:
    if etag is None or size is None:
        body = demo_jsonl()
        etag, size = hashlib.md5(body).hexdigest(), len(body)
    ev = copy.deepcopy(json.loads((HERE / "s3_put_template.json").read_text()))
    rec = ev["Records"][0]
    rec["eventTime"] = "2026-11-24T12:00:00.000Z"
    rec["s3"]["configurationId"] = "tierserve-batch-in"
    rec["s3"]["bucket"]["name"] = bucket
    rec["s3"]["bucket"]["arn"] = f"arn:aws:s3:::{bucket}"
    rec["s3"]["object"].update({"key": key, "size": size, "eTag": etag})
    return ev


def sqs_batch_event(bodies: list[str], arn: str = QUEUE_ARN) -> dict:
    template = json.loads((HERE / "sqs_receive_template.json").read_text())["Records"][0]
    records = []
    for i, body in enumerate(bodies):
        rec = copy.deepcopy(template)
        rec["messageId"] = f"19dd0b57-b21e-4ac1-bd88-01bbb068cb{i:02d}"
        rec["receiptHandle"] = f"MessageReceiptHandle-{i}"
        rec["body"] = body
        rec["md5OfBody"] = hashlib.md5(body.encode()).hexdigest()
        rec["eventSourceARN"] = arn
        records.append(rec)
    return {"Records": records}


def main() -> None:
    EVENTS.mkdir(exist_ok=True)
    write("s3_put.json", s3_put_event())
    write("sqs_batch.json", sqs_batch_event([json.dumps(s3_put_event()), json.dumps({"Event": "s3:TestEvent",
                                             "Service": "Amazon S3", "Bucket": BUCKET})]))
    job = {"model": DEMO_MODEL, "version": "1", "input": f"s3://{BUCKET}/{INPUT_KEY}",
           "output": f"s3://{BUCKET}/batch/out/{DEMO_MODEL}/demo-job-from-message"}
    write("sqs_job.json", sqs_batch_event([json.dumps(job)], JOBS_QUEUE_ARN))


if __name__ == "__main__":
    main()
