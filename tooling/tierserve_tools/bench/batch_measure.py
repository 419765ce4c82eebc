"""Measure one batch job in a fresh process: rows/s and peak RSS (tests and benchmarks use it).

    python -m tierserve_tools.bench.batch_measure s3://BUCKET/batch/in/MODEL/JOB.jsonl

The environment names the stack (AWS_ENDPOINT_URL, JOB_TABLE, MODEL_STORE_URI, CHUNK_ROWS...).
Prints one JSON object: {"summary", "seconds", "peak_rss_mb", "rows_per_s"}.
Also: ``write_digits_jsonl`` writes a synthetic input of N rows, streaming, for any N.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def write_digits_jsonl(path: Path, rows: int, seed: int = 0, malformed_lines: tuple[int, ...] = ()) -> Path:
    """``rows`` lines of 64 integer pixels (0-16) in the shorthand form; ``malformed_lines`` (1-based)
    are replaced by broken JSON. Written in blocks: memory does not grow with ``rows``."""
    rng = np.random.default_rng(seed)
    bad = set(malformed_lines)
    with open(path, "w") as f:
        for lo in range(0, rows, 10_000):
            block = rng.integers(0, 17, size=(min(10_000, rows - lo), 64))
            out = []
            for i, row in enumerate(block.tolist()):
                n = lo + i + 1
                if n in bad:
                    out.append('{"id": "broken", "inputs": [1, 2')
                else:
                    out.append(f'{{"id":"r{n}","inputs":{{"input":{json.dumps(row, separators=(",", ":"))}}}}}')
            f.write("\n".join(out) + "\n")
    return path


def main(argv: list[str]) -> int:
    from tierserve.app import get_runtime
    from tierserve.batch.locations import parse_s3_uri
    from tierserve.batch.service import handle_event
    from tierserve_tools.emulation import LocalContext

    loc = parse_s3_uri(argv[0], "input")
    head = get_runtime().aws("s3").head_object(Bucket=loc.bucket, Key=loc.key)
    event = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                          "s3": {"bucket": {"name": loc.bucket},
                                 "object": {"key": loc.key, "eTag": head["ETag"].strip('"'),
                                            "size": head["ContentLength"]}}}]}
    start = time.perf_counter()
    result = handle_event(event, LocalContext("BatchInferenceFunction", 3538, 900))
    seconds = time.perf_counter() - start
    summary = result["jobs"][0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"summary": summary, "seconds": seconds, "peak_rss_mb": round(peak, 1),
                      "rows_per_s": summary["counts"]["rows"] / seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
