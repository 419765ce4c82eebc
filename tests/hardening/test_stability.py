"""Stability (Triton's L0_memory_growth idea): thousands of warm invocations of each function with flat memory,
and GPU-routed requests through `tierserve serve` without keep-alive with flat descriptors (issue 8, defect 10).

Each function runs in a worker of its own (the same entry point as `tierserve serve` and Lambda), with the
stack's environment; its resident memory is read from /proc after a warm-up (a tenth of the invocations)
and at the end. Quick: 80 invocations (batch: 30) and 100 requests; full: 10,000 and 2,000.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.hardening.conftest import FIGURES, infer, lin_body, scale
from tierserve_tools.apigw import http_api_event

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _events(stack: Any) -> dict[str, Any]:
    from tierserve_tools.serve import BUCKET

    s3 = stack.client("s3")
    s3.put_object(Bucket=BUCKET, Key="batch/in/digits/stability.jsonl",
                  Body=b"".join(json.dumps({"id": f"r{i}", "inputs": {"input": [[float(i % 16)] * 64]}}).encode()
                                + b"\n" for i in range(4)))

    def cpu(i: int) -> dict:
        body = json.dumps(lin_body(1 + i % 4, seed=i))
        return {"model_name": "lin", "model_version": "1", "headers": {"content-type": "application/json"},
                "body": body, "isBase64Encoded": False}

    def router(i: int) -> dict:
        rows = 16 if i % 2 else 2  # alternately the GPU (Triton) and the CPU function (Invoke)
        return http_api_event("POST", "/v2/models/lin/infer", [("content-type", "application/json")],
                              json.dumps(lin_body(rows, seed=i)).encode())

    def batch(i: int) -> dict:
        # every 10th a whole job (S3 in and out, DynamoDB idempotency and state through moto_server: ~0.4 s
        # here); the others S3's test event, which the function parses and acknowledges
        job = {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/stability.jsonl",
               "output": f"s3://{BUCKET}/batch/out/digits/stability-{i}"}
        if i % 10:
            job = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET, "RequestId": f"t{i}"}
        return {"Records": [{"messageId": f"m{i}", "receiptHandle": f"h{i}", "body": json.dumps(job),
                             "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
                             "eventSource": "aws:sqs", "awsRegion": "us-east-1",
                             "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:tierserve-BatchJobsQueue"}]}

    return {"CpuInferenceFunction": cpu, "RouterFunction": router, "BatchInferenceFunction": batch}


def _ok(logical_id: str, result: Any) -> bool:
    if logical_id == "BatchInferenceFunction":
        return result == {"batchItemFailures": []}
    return isinstance(result, dict) and result.get("statusCode") == 200


@pytest.mark.parametrize("logical_id", ["CpuInferenceFunction", "RouterFunction", "BatchInferenceFunction"])
def test_warm_invocations_keep_the_functions_memory_flat(stack, logical_id: str) -> None:
    n = scale(40 if logical_id == "BatchInferenceFunction" else 80, 10_000)
    warm = max(10, n // 10)
    make = _events(stack)[logical_id]
    fn = stack.spawn(logical_id, max_workers=1)
    try:
        base = 0
        failures = 0
        for i in range(n):
            failures += not _ok(logical_id, fn.invoke(make(i)))
            if i == warm:
                base = _rss_kb(fn.worker_pids[0])
        [pid] = fn.worker_pids
        end = _rss_kb(pid)
    finally:
        fn.close()
    growth = (end - base) / base
    FIGURES[f"RSS {logical_id}: invocations, MB after warm-up -> end, growth"] = (
        n, round(base / 1024, 1), round(end / 1024, 1), f"{growth:+.2%}")
    assert failures == 0
    assert growth < 0.05, (base, end)


def test_gpu_routed_requests_without_keep_alive_keep_descriptors_flat(stack) -> None:
    # The router and the API emulator run in this process: its descriptors are the stack's
    n = scale(100, 2_000)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    for i in range(20):  # warm: the Triton call pool's threads and their clients
        infer(stack, "lin", lin_body(16, seed=i))
    before, threads_before = fds(), threading.active_count()
    served = {"gpu": 0, "cpu": 0}
    for i in range(n):
        answer = infer(stack, "lin", lin_body(16, seed=i))  # Connection: close, a new connection each time
        assert answer.status == 200, answer.body[:200]
        served[answer.headers["x-served-by"]] += 1
    after = fds()
    FIGURES["descriptors over GPU-routed requests without keep-alive: requests, before -> after"] = (
        n, before, after)
    assert served["gpu"] >= n * 0.9, served
    assert after - before < 20, (before, after)
    assert threading.active_count() - threads_before < 20
