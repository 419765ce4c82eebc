"""Batch inference against a real moto_server (S3, SQS, DynamoDB over HTTP).

One moto_server serves the whole module; every test uses its own job names, so jobs never meet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.support.moto_server import aws_test_env, running_moto_server
from tierserve.batch import runner as batch_runner
from tierserve.handlers import batch_inference
from tierserve_tools.batch import create_local_stack, poll_once, sqs_event, wire_local_notifications
from tierserve_tools.bench.batch_measure import write_digits_jsonl

pytestmark = pytest.mark.integration
BUCKET = "tierserve-models-123456789012-us-east-1"
TABLE = "tierserve-jobs"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict]:
    """moto_server with the template's batch resources, the digits model uploaded under models/."""
    from tests.support.models import write_digits

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with running_moto_server(log) as url, pytest.MonkeyPatch.context() as mp:
        for k, v in aws_test_env(url).items():
            mp.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=url)
        sqs = boto3.client("sqs", endpoint_url=url)
        ddb = boto3.client("dynamodb", endpoint_url=url)
        urls = create_local_stack(s3, ddb, sqs, BUCKET, TABLE, max_receive_count=2, visibility_timeout_s=0)
        store = tmp_path_factory.mktemp("store")
        write_digits(store)
        for f in sorted(store.rglob("*")):
            if f.is_file():
                s3.upload_file(str(f), BUCKET, f"models/{f.relative_to(store).as_posix()}")
        yield {"url": url, "s3": s3, "sqs": sqs, **urls}


@pytest.fixture
def env(stack, runtime_env, lambda_context):
    for k, v in aws_test_env(stack["url"]).items():
        runtime_env.setenv(k, v)
    runtime_env.setenv("MODEL_STORE_URI", f"s3://{BUCKET}/models")
    runtime_env.setenv("JOB_TABLE", TABLE)
    runtime_env.setenv("CONTINUATION_QUEUE_URL", stack["jobs_queue_url"])
    runtime_env.setenv("CHUNK_ROWS", "1000")
    runtime_env.setenv("CHECKPOINT_MARGIN_MS", "1000")  # the test context has 30 s; keep them in one go
    yield runtime_env
    batch_runner.after_part_hook = None


def upload(stack, tmp_path: Path, name: str, rows: int, **kw) -> str:
    path = write_digits_jsonl(tmp_path / f"{name}.jsonl", rows, seed=7, **kw)
    key = f"batch/in/digits/{name}.jsonl"
    stack["s3"].upload_file(str(path), BUCKET, key)
    return key


def job_event(stack, key: str, output: str | None = None, model: str = "digits") -> dict:
    body = {"model": model, "input": f"s3://{BUCKET}/{key}"}
    if output:
        body["output"] = f"s3://{BUCKET}/{output}"
    return sqs_event([{"MessageId": f"msg-{key}-{output}", "ReceiptHandle": "rh", "Body": json.dumps(body)}],
                     "arn:aws:sqs:us-east-1:123456789012:tierserve-batch-events-jobs", "us-east-1")


def outputs(stack, prefix: str) -> dict[str, bytes]:
    s3 = stack["s3"]
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
            for o in p.get("Contents", [])]
    return {k[len(prefix) + 1:]: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in sorted(keys)}


def part_lines(files: dict[str, bytes]) -> list[dict]:
    return [json.loads(line) for name in sorted(files) if name.startswith("part-")
            for line in files[name].splitlines()]


def test_dropped_file_of_100k_rows_completes_in_order_through_the_s3_notification(env, stack, tmp_path,
                                                                                   lambda_context):
    # Given the bucket notifying the events queue (as `tierserve serve` wires it) and 4096-row chunks
    env.setenv("CHUNK_ROWS", "4096")
    wire_local_notifications(stack["s3"], stack["sqs"], BUCKET, stack["queue_url"])
    # When a 100,000-row file is dropped under batch/in/ and the queue is polled like Lambda's trigger
    upload(stack, tmp_path, "big", 100_000)
    received = 0
    deadline = time.monotonic() + 120
    while "_SUCCESS" not in outputs(stack, "batch/out/digits/big") and time.monotonic() < deadline:
        got, failed = poll_once(stack["sqs"], stack["queue_url"], batch_inference.lambda_handler, lambda_context)
        assert failed == 0
        received += got
    # Then the test event was acknowledged, and exactly 100,000 output lines came out, in input order
    files = outputs(stack, "batch/out/digits/big")
    lines = part_lines(files)
    assert [x["id"] for x in lines] == [f"r{i}" for i in range(1, 100_001)]
    assert sorted(files) == ["_SUCCESS", "errors.jsonl"] + [f"part-{i:05d}.jsonl" for i in range(25)]
    success = json.loads(files["_SUCCESS"])
    assert success["counts"] == {"lines": 100_000, "output_lines": 100_000, "rows": 100_000, "errors": 0,
                                 "blank_lines": 0}
    assert success["model_version"] == "1" and len(success["variant_sha256"]) == 64
    assert files["errors.jsonl"] == b""
    assert received >= 2  # the s3:TestEvent and the ObjectCreated record
    stack["s3"].put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration={})


def test_redelivered_event_writes_nothing_new_and_returns_the_earlier_result(env, stack, tmp_path, lambda_context):
    # Given a job that completed
    key = upload(stack, tmp_path, "redeliver", 2500)
    event = job_event(stack, key)
    assert batch_inference.lambda_handler(event, lambda_context) == {"batchItemFailures": []}
    before = {o["Key"]: (o["ETag"], o["LastModified"]) for o in
              stack["s3"].list_objects_v2(Bucket=BUCKET, Prefix="batch/out/digits/redeliver/")["Contents"]}
    # When the same message is delivered again
    assert batch_inference.lambda_handler(event, lambda_context) == {"batchItemFailures": []}
    # Then no object is written or rewritten
    after = {o["Key"]: (o["ETag"], o["LastModified"]) for o in
             stack["s3"].list_objects_v2(Bucket=BUCKET, Prefix="batch/out/digits/redeliver/")["Contents"]}
    assert after == before and len(after) == 5  # 3 parts, errors.jsonl, _SUCCESS


def test_crash_after_part_k_resumes_to_the_same_bytes(env, stack, tmp_path, lambda_context):
    # Given a reference run of a 7,500-row job with malformed lines, and a second run of the same
    # input that crashes after writing part 3 but before checkpointing it
    key = upload(stack, tmp_path, "crashy", 7500, malformed_lines=(3, 4500))
    assert batch_inference.lambda_handler(job_event(stack, key, "batch/out/ref"), lambda_context)[
        "batchItemFailures"] == []

    def crash(stage: str, part: int) -> None:
        if stage == "written" and part == 3:
            raise RuntimeError("simulated crash")

    batch_runner.after_part_hook = crash
    crashed = batch_inference.lambda_handler(job_event(stack, key, "batch/out/crash"), lambda_context)
    assert len(crashed["batchItemFailures"]) == 1
    assert "_SUCCESS" not in outputs(stack, "batch/out/crash")
    # When SQS redelivers it
    batch_runner.after_part_hook = None
    resumed = batch_inference.lambda_handler(job_event(stack, key, "batch/out/crash"), lambda_context)
    # Then the final output equals the reference byte for byte, and the job took two invocations
    assert resumed["batchItemFailures"] == []
    ref, got = outputs(stack, "batch/out/ref"), outputs(stack, "batch/out/crash")
    assert sorted(ref) == sorted(got)
    assert {k: v for k, v in ref.items() if k != "_SUCCESS"} == {k: v for k, v in got.items() if k != "_SUCCESS"}
    assert json.loads(got["_SUCCESS"])["invocations"] == 2
    assert json.loads(got["_SUCCESS"])["counts"] == json.loads(ref["_SUCCESS"])["counts"]


def test_job_past_the_checkpoint_margin_continues_through_the_jobs_queue(env, stack, tmp_path, lambda_context):
    # Given a margin larger than any remaining time: every invocation does one part, then continues
    env.setenv("CHECKPOINT_MARGIN_MS", str(10**9))
    key = upload(stack, tmp_path, "continued", 3200)
    first = batch_inference.lambda_handler(job_event(stack, key), lambda_context)
    assert first["batchItemFailures"] == []
    # When the continuation messages are processed from the jobs queue
    for _ in range(10):
        if "_SUCCESS" in outputs(stack, "batch/out/digits/continued"):
            break
        poll_once(stack["sqs"], stack["jobs_queue_url"], batch_inference.lambda_handler, lambda_context)
    # Then the job finished in one invocation per part, with every row once
    files = outputs(stack, "batch/out/digits/continued")
    assert json.loads(files["_SUCCESS"])["invocations"] == 4
    assert [x["id"] for x in part_lines(files)] == [f"r{i}" for i in range(1, 3201)]


def test_poison_message_is_reported_alone_and_reaches_the_dlq(env, stack, tmp_path, lambda_context):
    # Given a good job and a job for an unknown model in the same queue (maxReceiveCount 2)
    key = upload(stack, tmp_path, "neighbour", 500)
    sqs = stack["sqs"]
    dlq_url = sqs.create_queue(QueueName="poison-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(QueueName="poison", Attributes={"VisibilityTimeout": "0", "RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"})})["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"model": "digits",
                                                                          "input": f"s3://{BUCKET}/{key}"}))
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(
        {"model": "no-such-model", "input": f"s3://{BUCKET}/{key}", "output": f"s3://{BUCKET}/batch/out/x"}))
    # When the queue is polled until it is empty
    reports = []
    for _ in range(20):
        got, failed = poll_once(sqs, queue_url, batch_inference.lambda_handler, lambda_context, wait_s=0)
        if got:
            reports.append((got, failed))
        dlq = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        if dlq.get("Messages"):
            break
    # Then each batch reported only the poison message, and it is in the DLQ
    assert reports[0] == (2, 1) and all(f == 1 for _, f in reports)
    assert json.loads(dlq["Messages"][0]["Body"])["model"] == "no-such-model"
    assert "_SUCCESS" in outputs(stack, "batch/out/digits/neighbour")


def test_malformed_lines_are_reported_with_their_line_numbers(env, stack, tmp_path, lambda_context):
    # Given a job whose lines 2, 1001 and 2999 are broken
    key = upload(stack, tmp_path, "malformed", 3000, malformed_lines=(2, 1001, 2999))
    # When it runs
    assert batch_inference.lambda_handler(job_event(stack, key), lambda_context)["batchItemFailures"] == []
    # Then errors.jsonl names exactly those lines, and every other line was scored
    files = outputs(stack, "batch/out/digits/malformed")
    errs = [json.loads(x) for x in files["errors.jsonl"].splitlines()]
    assert [e["line"] for e in errs] == [2, 1001, 2999]
    assert all(e["reason"].startswith("not valid JSON") for e in errs)
    assert len(part_lines(files)) == 2997
    assert json.loads(files["_SUCCESS"])["counts"]["errors"] == 3


def _measure(stack, env, key: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tierserve_tools.bench.batch_measure", f"s3://{BUCKET}/{key}"],
                          env={**os.environ}, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_memory_stays_flat_when_the_input_grows_10x(env, stack, tmp_path):
    # Given inputs of 15,000 and 150,000 rows (about 3 MB and 30 MB)
    small = upload(stack, tmp_path, "mem-small", 15_000)
    big = upload(stack, tmp_path, "mem-big", 150_000)
    # When each runs in a fresh process
    m_small, m_big = _measure(stack, env, small), _measure(stack, env, big)
    # Then the peak RSS barely moves: it is bounded by the chunk, not the file
    assert m_big["summary"]["counts"]["rows"] == 150_000
    assert m_big["peak_rss_mb"] / m_small["peak_rss_mb"] < 1.15, (m_small, m_big)


def test_gpu_model_chunks_run_on_a_real_tritonserver(env, stack, tmp_path, lambda_context, triton_server,
                                                      triton_tiny_model):
    # Given a GPU-only model (max_batch_size 16) in the store, served by a real local tritonserver
    import hashlib

    import numpy as np

    from tierserve.manifest import Manifest, ModelVersion, TensorSpec, Variant

    s3 = stack["s3"]
    onnx_bytes = triton_tiny_model.onnx_path.read_bytes()
    manifest = Manifest.loads(s3.get_object(Bucket=BUCKET, Key="models/manifest.json")["Body"].read())
    mv = ModelVersion(triton_tiny_model.name, "1", (TensorSpec("x", "FP32", (-1, 4)),),
                      (TensorSpec("y", "FP32", (-1, 3)),),
                      {"fp32": Variant("tiny_linear/1/model.onnx", hashlib.sha256(onnx_bytes).hexdigest(),
                                       len(onnx_bytes))}, "fp32", targets=("gpu",), max_batch_size=16)
    s3.put_object(Bucket=BUCKET, Key="models/tiny_linear/1/model.onnx", Body=onnx_bytes)
    s3.put_object(Bucket=BUCKET, Key="models/manifest.json", Body=manifest.with_version(mv).dumps().encode())
    env.setenv("TRITON_URL", triton_server.http_url)
    env.setenv("TRITON_PROTOCOL", "http")
    env.setenv("CHUNK_ROWS", "40")
    x = np.random.default_rng(5).standard_normal((100, 4)).astype(np.float32)
    body = "".join(json.dumps({"id": i, "inputs": {"x": row}}) + "\n" for i, row in enumerate(x.tolist()))
    s3.put_object(Bucket=BUCKET, Key="batch/in/tiny_linear/gpu-job.jsonl", Body=body.encode())
    # When the job runs (chunks of 40 rows, sent to Triton in batches of at most 16)
    event = job_event(stack, "batch/in/tiny_linear/gpu-job.jsonl", model="tiny_linear")
    assert batch_inference.lambda_handler(event, lambda_context) == {"batchItemFailures": []}
    # Then every row was scored by Triton, in order, matching onnxruntime on the same file
    files = outputs(stack, "batch/out/tiny_linear/gpu-job")
    assert files["errors.jsonl"] == b"", files["errors.jsonl"][:600]
    lines = part_lines(files)
    assert [x_["id"] for x_ in lines] == list(range(100))
    y = np.array([x_["outputs"][0]["data"] for x_ in lines], dtype=np.float32)
    np.testing.assert_allclose(y, triton_tiny_model.reference(x), rtol=1e-5, atol=1e-5)
