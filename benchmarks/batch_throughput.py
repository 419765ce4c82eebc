"""Batch inference throughput: the real pipeline against a raw onnxruntime loop, and peak RSS.

    python -m benchmarks.batch_throughput [--rows 100000] [--big-rows 1000000] [--chunk-rows 4096]

One run, one moto_server (S3, SQS, DynamoDB over HTTP), the digits classifier:
1. pipeline: BatchInferenceFunction's handler on a ``--rows`` JSONL job, in this process, warm
   (a small job runs first): S3 streaming read, JSON parsing, validation, batched onnxruntime,
   JSON encoding, part uploads, DynamoDB checkpoints, errors.jsonl and _SUCCESS;
2. raw: ``session.run`` over the same rows, already in a numpy array, in the same chunk size;
3. peak RSS: the pipeline in a fresh process (``python -m benchmarks.batch_measure``) on
   ``--rows`` and on ``--big-rows`` rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "tierserve-models-123456789012-us-east-1"
TABLE = "tierserve-jobs"


def _rows(path: Path) -> np.ndarray:
    """The rows of a write_digits_jsonl file, as the raw loop gets them (parsed outside the timing)."""
    with open(path) as f:
        n = sum(1 for _ in f)
    out = np.empty((n, 64), dtype=np.float32)
    with open(path) as f:
        for i, line in enumerate(f):
            out[i] = json.loads(line)["inputs"]["input"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--big-rows", type=int, default=1_000_000)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    args = ap.parse_args()
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")  # before the Logger is built

    import boto3
    import onnxruntime as ort

    from benchmarks.batch_measure import write_digits_jsonl
    from tests.support.models import write_digits
    from tests.support.moto_server import aws_test_env, running_moto_server
    from tierserve.app import reset_runtime
    from tierserve.batch.service import handle_event
    from tierserve.local.batch import create_local_stack
    from tierserve.local.emulation import LocalContext

    with tempfile.TemporaryDirectory() as tmp_s, running_moto_server(Path(tmp_s) / "moto.log") as url:
        tmp = Path(tmp_s)
        os.environ.update(aws_test_env(url))
        os.environ.update({"MODEL_STORE_URI": f"s3://{BUCKET}/models", "MODEL_CACHE_DIR": str(tmp / "cache"),
                           "JOB_TABLE": TABLE, "CHUNK_ROWS": str(args.chunk_rows), "ORT_THREADS": "1",
                           "CHECKPOINT_MARGIN_MS": "1000", "POWERTOOLS_TRACE_DISABLED": "true",
                           "POWERTOOLS_METRICS_NAMESPACE": "tierserve-bench"})
        reset_runtime()
        s3 = boto3.client("s3")
        create_local_stack(s3, boto3.client("dynamodb"), boto3.client("sqs"), BUCKET, TABLE)
        store = tmp / "store"
        store.mkdir()
        write_digits(store)
        for f in sorted(store.rglob("*")):
            if f.is_file():
                s3.upload_file(str(f), BUCKET, f"models/{f.relative_to(store).as_posix()}")

        def put(name: str, rows: int) -> str:
            path = write_digits_jsonl(tmp / f"{name}.jsonl", rows, seed=11)
            s3.upload_file(str(path), BUCKET, f"batch/in/digits/{name}.jsonl")
            path.unlink() if rows > args.rows else None
            return f"batch/in/digits/{name}.jsonl"

        def event(key: str) -> dict:
            etag = s3.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
            return {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                                 "s3": {"bucket": {"name": BUCKET}, "object": {"key": key, "eTag": etag}}}]}

        ctx = LocalContext("BatchInferenceFunction", 3538, 900)
        handle_event(event(put("warmup", 2000)), ctx)  # model download, session, clients
        key = put("bench", args.rows)
        t0 = time.perf_counter()
        summary = handle_event(event(key), ctx)["jobs"][0]
        pipeline_s = time.perf_counter() - t0
        assert summary["counts"]["output_lines"] == args.rows, summary

        x = _rows(tmp / "bench.jsonl")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(store / "digits/1/model.onnx"), opts, providers=["CPUExecutionProvider"])
        sess.run(None, {"input": x[:64]})
        t0 = time.perf_counter()
        for lo in range(0, len(x), args.chunk_rows):
            sess.run(["label", "probabilities"], {"input": x[lo:lo + args.chunk_rows]})
        raw_s = time.perf_counter() - t0

        rss = {}
        for name, rows in (("rss-small", args.rows), ("rss-big", args.big_rows)):
            k = put(name, rows)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.batch_measure", f"s3://{BUCKET}/{k}"],
                                  capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), check=True)
            rss[rows] = json.loads(proc.stdout.strip().splitlines()[-1])

    pipe_rps, raw_rps = args.rows / pipeline_s, args.rows / raw_s
    print(f"\nbatch throughput, digits classifier, {args.rows:,} rows, chunk {args.chunk_rows}, 1 ORT thread")
    print(f"{'path':<44}{'seconds':>10}{'rows/s':>12}")
    print(f"{'pipeline (S3 -> parse -> ORT -> S3, moto)':<44}{pipeline_s:>10.2f}{pipe_rps:>12,.0f}")
    print(f"{'raw onnxruntime loop (same rows, chunks)':<44}{raw_s:>10.3f}{raw_rps:>12,.0f}")
    print(f"pipeline / raw = {pipe_rps / raw_rps:.3f}  (pipeline timings: {summary['timings_s']})")
    print(f"\n{'peak RSS (fresh process)':<44}{'rows':>12}{'MiB':>10}{'rows/s':>12}")
    for rows, m in rss.items():
        print(f"{'pipeline':<44}{rows:>12,}{m['peak_rss_mb']:>10.1f}{m['rows_per_s']:>12,.0f}")
    small, big = rss[args.rows]["peak_rss_mb"], rss[args.big_rows]["peak_rss_mb"]
    print(f"RSS ratio {args.big_rows:,} / {args.rows:,} rows = {big / small:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
