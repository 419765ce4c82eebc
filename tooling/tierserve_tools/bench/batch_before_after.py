"""The batch pipeline of two code trees on the same job, alternating, each job in a fresh process:
the before/after figure of a change (issue 10: digits from JSONL, ">= 5x today's rows/s").

    git archive <before-commit> functions | tar -x -C /tmp/before
    python -m tierserve_tools.bench.batch_before_after --before /tmp/before/functions [--rows 40000] [--rounds 3] \
        [--format jsonl|parquet]

(A Parquet input needs pyarrow, and a "before" tree that reads Parquet: issue 10's 1488022 or later.)

``tierserve_tools.bench.batch_measure`` runs the job (BatchInferenceFunction's handler, moto_server over HTTP) with
``PYTHONPATH`` pointing at the tree under test; this checkout's ``functions`` is "after".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tierserve_tools.bench.batch_throughput import BUCKET, ROOT, Stack, digits_jsonl, digits_rows, parquet_bytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="the 'functions' folder of the code before")
    ap.add_argument("--models", type=Path, default=Path("build/models"))
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    args = ap.parse_args()
    trees = {"before": args.before.resolve(), "after": (ROOT / "functions").resolve()}
    rates: dict[str, list[float]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp, Stack(args.models, Path(tmp), 4096) as stack:
        rows = digits_rows(args.rows)
        body = digits_jsonl(rows) if args.format == "jsonl" else parquet_bytes(
            {"input": rows.astype(np.float32)}, [f"r{i}" for i in range(args.rows)])
        for i in range(args.rounds):
            for name, tree in trees.items():
                key = stack.put("digits", f"ba-{name}-{i}", body, args.format)  # a new job each time
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT)]),
                       "MODEL_CACHE_DIR": str(Path(tmp) / f"cache-{name}")}
                out = subprocess.run([sys.executable, "-m", "tierserve_tools.bench.batch_measure", f"s3://{BUCKET}/{key}"],
                                     capture_output=True, text=True, cwd=ROOT, env=env, check=True)
                rates[name].append(json.loads(out.stdout.strip().splitlines()[-1])["rows_per_s"])
    for name, xs in rates.items():
        print(f"{name:<8}{statistics.median(xs):>12,.0f} rows/s  (rounds: {', '.join(f'{x:,.0f}' for x in xs)})")
    print(f"after / before = {statistics.median(rates['after']) / statistics.median(rates['before']):.2f}x "
          f"({args.rows:,} digits rows from {args.format}, fresh process per job, {args.rounds} alternating rounds, "
          f"load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
