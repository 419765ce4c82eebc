"""Batch inference throughput: the real pipeline against a raw onnxruntime loop over the same rows.

    python -m tierserve_tools.bench.batch_throughput [--models build/models] [--quick] [--rss]

One moto_server (S3, SQS, DynamoDB over HTTP) holding the compiled store; BatchInferenceFunction's
handler runs in this process, warm (a small job first), each job timed end to end: S3 streaming read,
parsing, chunk assembly, onnxruntime, encoding, part uploads, DynamoDB checkpoints, ``_SUCCESS``.
The raw loop is ``session.run`` over the same rows, already in numpy, in the same chunk size, one thread,
on the variant the CPU tier serves. Pipeline and raw alternate round by round (``rounds``).

* digits (scikit-learn pipeline, FP32 [-1, 64]) from JSONL (the shorthand, one row a line) and from
  Parquet (a list column); goals: JSONL >= 5x the rows/s before issue 10 (about 35,000 rows/s on an
  idle machine: compare ``before_rows_per_s`` in the notes) and Parquet >= 0.3x raw;
* MiniLM int8 (16 tokens a row) from JSONL; goal >= 0.85x raw.
* ``--rss``: peak RSS of the pipeline in a fresh process on 100k vs 1M digits rows (memory is bounded
  by CHUNK_ROWS, not by the file).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tierserve_tools.bench.harness import Context, Figure, Series, Skip, suite_main

SUITE = "batch"
ROOT = Path(__file__).resolve().parents[3]  # the checkout
BUCKET = "tierserve-models-123456789012-us-east-1"
TABLE = "tierserve-jobs"
TOKENS = 16


def digits_rows(n: int, seed: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, size=(n, 64))


def digits_jsonl(rows: np.ndarray) -> bytes:
    return b"".join(b'{"id":"r%d","inputs":{"input":%s}}\n' % (i, json.dumps(r, separators=(",", ":")).encode())
                    for i, r in enumerate(rows.tolist()))


def parquet_bytes(columns: dict[str, np.ndarray], ids: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, Any] = {}
    for name, arr in columns.items():
        width = int(np.prod(arr.shape[1:]))
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), width)
    cols["id"] = pa.array(ids)
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, row_group_size=65_536)
    return buf.getvalue()


def minilm_rows(n: int, seed: int = 5) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(1000, 20000, size=(n, TOKENS))
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones((n, TOKENS), dtype=np.int64)}


def minilm_jsonl(cols: dict[str, np.ndarray]) -> bytes:
    ids, mask = cols["input_ids"].tolist(), cols["attention_mask"].tolist()
    pairs = enumerate(zip(ids, mask, strict=True))
    return b"".join(json.dumps({"id": f"m{i}", "inputs": {"input_ids": a, "attention_mask": m}},
                               separators=(",", ":")).encode() + b"\n" for i, (a, m) in pairs)


class Stack:
    """moto_server with the store uploaded and the batch resources created; jobs run in this process."""

    def __init__(self, models: Path, workdir: Path, chunk_rows: int) -> None:
        self.models, self.workdir, self.chunk_rows = models, workdir, chunk_rows

    def __enter__(self) -> Stack:
        import boto3

        from tierserve.app import reset_runtime
        from tierserve_tools.batch import create_local_stack
        from tierserve_tools.moto import running_moto_server

        self._moto = running_moto_server(self.workdir / "moto.log")
        url = self._moto.__enter__()
        self._saved = dict(os.environ)
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url})
        os.environ.update({"MODEL_STORE_URI": f"s3://{BUCKET}/models", "MODEL_CACHE_DIR": str(self.workdir / "cache"),
                           "JOB_TABLE": TABLE, "CHUNK_ROWS": str(self.chunk_rows), "ORT_THREADS": "1",
                           "CHECKPOINT_MARGIN_MS": "1000", "POWERTOOLS_TRACE_DISABLED": "true",
                           "POWERTOOLS_LOG_LEVEL": "ERROR", "POWERTOOLS_METRICS_NAMESPACE": "tierserve-bench",
                           "TRITON_URL": ""})
        reset_runtime()
        from tierserve.observability import logger

        logger.setLevel("ERROR")  # built before this environment was set
        self.s3 = boto3.client("s3")
        create_local_stack(self.s3, boto3.client("dynamodb"), boto3.client("sqs"), BUCKET, TABLE)
        for f in sorted(self.models.rglob("*")):
            rel = f.relative_to(self.models).as_posix()
            if f.is_file() and not rel.startswith(("triton/", ".")) and f.suffix in (".json", ".onnx", ".data"):
                self.s3.upload_file(str(f), BUCKET, f"models/{rel}")
        self.n = 0
        return self

    def __exit__(self, *exc: Any) -> None:
        from tierserve.app import reset_runtime

        os.environ.clear()
        os.environ.update(self._saved)
        reset_runtime()
        self._moto.__exit__(*exc)

    def put(self, model: str, name: str, body: bytes, ext: str) -> str:
        key = f"batch/in/{model}/{name}.{ext}"
        self.s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        return key

    def run(self, key: str) -> tuple[float, dict[str, Any]]:
        """Seconds for one job on ``key`` (a fresh output each time: no idempotent shortcut)."""
        from tierserve.batch.service import handle_event
        from tierserve_tools.emulation import LocalContext

        self.n += 1
        msg = {"model": key.split("/")[2], "input": f"s3://{BUCKET}/{key}",
               "output": f"s3://{BUCKET}/batch/out/bench/{self.n}"}
        event = {"Records": [{"messageId": f"m{self.n}", "receiptHandle": "r", "body": json.dumps(msg),
                              "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
                              "attributes": {"ApproximateReceiveCount": "1"}, "awsRegion": "us-east-1"}]}
        t0 = time.perf_counter()
        result = handle_event(event, LocalContext("BatchInferenceFunction", 3538, 900))
        seconds = time.perf_counter() - t0
        assert result.get("batchItemFailures") in (None, []), result
        return seconds, result


def _raw_loop(session: Any, feeds: dict[str, np.ndarray], chunk: int) -> float:
    n = len(next(iter(feeds.values())))
    t0 = time.perf_counter()
    for lo in range(0, n, chunk):
        session.run(None, {k: v[lo:lo + chunk] for k, v in feeds.items()})
    return time.perf_counter() - t0


def _session(path: Path) -> Any:
    import onnxruntime as ort

    from tierserve.sessions import session_options

    return ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])


def _compare(ctx: Context, stack: Stack, label: str, key: str, session: Any, feeds: dict[str, np.ndarray],
             rows: int, rounds: int, goal: float | None, cond: str) -> Figure:
    stack.run(key)  # warm: model download, session, clients, this object's first read
    pipe, raw = [], []
    for _ in range(rounds):
        seconds, _ = stack.run(key)
        pipe.append(seconds)
        raw.append(_raw_loop(session, feeds, stack.chunk_rows))
    rate = [rows / s for s in pipe]
    raw_rate = [rows / s for s in raw]
    return ctx.add(Figure(
        SUITE, label,
        Series("pipeline rows/s", unit="rows/s", rate=float(np.median(rate)), count=rows * rounds),
        Series("raw onnxruntime loop rows/s", unit="rows/s", rate=float(np.median(raw_rate)), count=rows * rounds),
        better="higher", goal=goal, conditions=cond,
        extra={"pipeline_s": pipe, "raw_s": raw, "rows": rows}))


def run(ctx: Context) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise Skip(f"pyarrow is not installed ({exc}): pip install -e '.[batch]'") from exc
    from tierserve.manifest import Manifest

    if not (ctx.models / "manifest.json").is_file():
        raise Skip(f"no manifest in {ctx.models}: run `make demo` (or make compile-demo compile-minilm) first")
    manifest = Manifest.loads((ctx.models / "manifest.json").read_text())
    chunk = 4096
    rounds = ctx.n(3, 1)
    cond = (f"in-process BatchInferenceFunction handler, moto_server over HTTP for S3/SQS/DynamoDB, CHUNK_ROWS "
            f"{chunk}, 1 ORT thread, median of {rounds} rounds alternating with the raw loop")
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp, Stack(ctx.models, Path(tmp), chunk) as stack:
        if "digits" in manifest.models:
            mv = manifest.resolve("digits")
            n = ctx.n(200_000, 20_000)
            rows = digits_rows(n)
            ctx.progress(f"digits: {n:,} rows from JSONL and Parquet")
            session = _session(ctx.models / mv.cpu_artifact.path)
            feeds = {"input": rows.astype(np.float32)}
            jsonl = stack.put("digits", "bench", digits_jsonl(rows), "jsonl")
            ids = [f"r{i}" for i in range(n)]
            parquet = stack.put("digits", "bench", parquet_bytes({"input": rows.astype(np.float32)}, ids), "parquet")
            _compare(ctx, stack, "digits from JSONL vs raw onnxruntime", jsonl, session, feeds, n, rounds, None,
                     f"{cond}; {n:,} rows, the shorthand form, one row a line")
            _compare(ctx, stack, "digits from Parquet vs raw onnxruntime", parquet, session, feeds, n, rounds, 0.3,
                     f"{cond}; {n:,} rows, a fixed-size-list column, Parquet parts out")
        if "minilm" in manifest.models:
            mv = manifest.resolve("minilm")
            n = ctx.n(2048, 256)
            cols = minilm_rows(n)
            ctx.progress(f"minilm ({mv.cpu_variant or mv.selected_variant}): {n:,} rows of {TOKENS} tokens")
            session = _session(ctx.models / mv.cpu_artifact.path)
            key = stack.put("minilm", "bench", minilm_jsonl(cols), "jsonl")
            pkey = stack.put("minilm", "bench", parquet_bytes(cols, [f"m{i}" for i in range(n)]), "parquet")
            _compare(ctx, stack, "MiniLM int8 from Parquet vs raw onnxruntime", pkey, session, cols, n, rounds, 0.85,
                     f"{cond}; {n:,} rows of {TOKENS} tokens, both outputs written as Parquet")
            _compare(ctx, stack, "MiniLM int8 from JSONL vs raw onnxruntime", key, session, cols, n, rounds, 0.85,
                     f"{cond}; {n:,} rows of {TOKENS} tokens, both outputs written as JSON "
                     f"({TOKENS * 384 + 384:,} floats a row)")
    if ctx.notes.get("rss"):
        _rss(ctx)


def _rss(ctx: Context) -> None:
    """Peak RSS of the pipeline in a fresh process: 100k vs 1M digits rows (bounded by CHUNK_ROWS)."""
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp, Stack(ctx.models, Path(tmp), 4096) as stack:
        out = {}
        for rows in (100_000, 1_000_000):
            ctx.progress(f"peak RSS on {rows:,} rows (fresh process)")
            key = stack.put("digits", f"rss{rows}", digits_jsonl(digits_rows(rows)), "jsonl")
            proc = subprocess.run([sys.executable, "-m", "tierserve_tools.bench.batch_measure", f"s3://{BUCKET}/{key}"],
                                  capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), check=True)
            out[rows] = json.loads(proc.stdout.strip().splitlines()[-1])
        ctx.add(Figure(SUITE, "peak RSS, 1M rows vs 100k rows",
                       Series("peak RSS 1M rows", [out[1_000_000]["peak_rss_mb"]], unit="MiB"),
                       Series("peak RSS 100k rows", [out[100_000]["peak_rss_mb"]], unit="MiB"),
                       goal=1.2, goal_op="<=", conditions="fresh process each, CHUNK_ROWS 4096"))


def main() -> int:
    return suite_main(SUITE, run, __doc__, extra=lambda args: {"rss": args.rss},
                      options=lambda ap: ap.add_argument("--rss", action="store_true",
                                                         help="also peak RSS on 100k vs 1M rows (minutes)"))


if __name__ == "__main__":
    raise SystemExit(main())
