"""Issue 12 figure: a batch job that fans out, 2 batch workers against 1, through `tierserve serve`.

    python -m tierserve_tools.bench.batch_fanout [--models build/models] [--rows 4096] [--shards 16] [--rounds 2]

The same job, MiniLM int8 (the compiler's CPU variant, ``make compile-minilm``) over ``--rows`` rows of 16
token ids (JSONL), asked to fan out into ``--shards`` shards, runs through a LocalStack (moto_server for S3,
SQS and DynamoDB; BatchInferenceFunction in worker processes, one jobs-queue poller per worker taking one
message per invocation, as template.yaml's ``JobMessages`` does) with ``batch_workers`` 1 and then 2, the
order alternating round by round. ``ORT_THREADS=1``: one core per execution environment, as Lambda's
concurrency scales environments, not threads. The workers are warmed first (a small fanned-out job), so
the figure is the fan-out's, not the model's cold start. Timed: from sending the job message to
``_SUCCESS``. Every round checks that the two runs' parts are byte-identical. Each run also reports the
CPU seconds its processes used (workers, moto_server, the serve process) over its wall time: the cores
the job actually got, which on a shared machine says whether 2 workers had 2 cores to use.

The job's outputs are MiniLM's ``sentence_embedding`` (384 floats a row): the scratch store's manifest
lists only that output, which is what an embedding job asks for (``last_hidden_state`` would add 16 x 384
floats of JSON a row, and moto_server's S3 shares the same 2 cores). Reports the speed-up (median of the
rounds), each run's wall time and the load average before and after: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TOKENS = 16
MODEL = "minilm"


def scratch_store(models: Path, dst: Path) -> None:
    """A store holding MiniLM's CPU variant alone, its manifest listing the sentence embedding only."""
    manifest = json.loads((models / "manifest.json").read_text())
    if MODEL not in manifest.get("models", {}):
        raise SystemExit(f"no {MODEL} in {models}/manifest.json: run `make compile-minilm` (or `make demo`) first")
    entry = manifest["models"][MODEL]
    version = entry["versions"][entry["default_version"]]
    cpu = version.get("cpu_variant") or version["selected_variant"]
    variant = version["variants"][cpu]
    version["variants"] = {cpu: variant}
    version["selected_variant"], version["cpu_variant"], version["targets"] = cpu, cpu, ["cpu"]
    version["outputs"] = [o for o in version["outputs"] if o["name"] == "sentence_embedding"]
    entry["versions"] = {entry["default_version"]: version}
    manifest["models"] = {MODEL: entry}
    (dst / Path(variant["path"]).parent).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(models / variant["path"], dst / variant["path"])
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))


def jsonl(rows: int, seed: int = 5) -> bytes:
    ids = np.random.default_rng(seed).integers(1000, 20000, size=(rows, TOKENS))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = [1] * TOKENS
    return b"".join(json.dumps({"id": f"m{i}", "inputs": {"input_ids": r, "attention_mask": mask}},
                               separators=(",", ":")).encode() + b"\n" for i, r in enumerate(ids.tolist()))


def run_job(stack: Any, name: str, body: bytes, shards: int, timeout_s: float = 1800) -> tuple[float, dict[str, bytes]]:
    """Put the input, send the job message, wait for _SUCCESS; (seconds, {part name: bytes})."""
    from tierserve_tools.serve import BUCKET

    s3, sqs = stack.client("s3"), stack.client("sqs")
    s3.put_object(Bucket=BUCKET, Key=f"bench/{name}.jsonl", Body=body)
    out = f"batch/out/{MODEL}/{name}"
    t0 = time.perf_counter()
    sqs.send_message(QueueUrl=stack.queues["jobs_queue_url"], MessageBody=json.dumps(
        {"model": MODEL, "input": f"s3://{BUCKET}/bench/{name}.jsonl", "output": f"s3://{BUCKET}/{out}",
         "shards": shards}))
    while True:
        try:
            s3.head_object(Bucket=BUCKET, Key=f"{out}/_SUCCESS")
            break
        except Exception:
            if time.perf_counter() - t0 > timeout_s:
                raise SystemExit(f"{name}: no _SUCCESS after {timeout_s:.0f} s; see {stack.workdir}") from None
            time.sleep(0.2)
    seconds = time.perf_counter() - t0
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=out + "/").get("Contents", [])
    parts = {o["Key"].rsplit("/", 1)[1]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
             for o in listed if "/part-" in o["Key"]}
    return seconds, parts


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and every process it started (workers, moto_server), from
    /proc (Linux): how many cores the job actually got is this over the wall time."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        pid = int(stat.parent.name)
        parents[pid], used[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    mine, todo = {os.getpid()}, [os.getpid()]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parents.items() if pp == pid and p not in mine]
        mine.update(kids)
        todo.extend(kids)
    return sum(used.get(p, 0.0) for p in mine)


def one_run(store: Path, work: Path, workers: int, body: bytes, shards: int, chunk_rows: int,
            ) -> tuple[float, dict[str, bytes], dict[str, Any]]:
    from tierserve_tools.serve import LocalStack

    env = {"CHUNK_ROWS": str(chunk_rows), "ORT_THREADS": "1", "TIERSERVE_METRICS": "false"}
    with LocalStack(store, port=0, triton=False, workdir=work, batch_workers=workers, env=env) as stack:
        run_job(stack, "warm", body[:body.index(b"\n", len(body) // 32) + 1], 2 * workers)  # start the workers
        load0, cpu0 = os.getloadavg(), cpu_seconds()
        seconds, parts = run_job(stack, "job", body, shards)
        load1, cpu = os.getloadavg(), cpu_seconds() - cpu0
    return seconds, parts, {"load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in load1],
                            "cpu_s": round(cpu, 2), "cores_used": round(cpu / seconds, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("build/models"))
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk-rows", type=int, default=64, help="CHUNK_ROWS: rows a part (one inference each)")
    args = ap.parse_args()
    body = jsonl(args.rows)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        store = Path(tmp) / "models"
        scratch_store(args.models, store)
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            got: dict[int, tuple[float, dict[str, bytes]]] = {}
            for workers in order:
                seconds, parts, load = one_run(store, Path(tmp) / f"r{r}-w{workers}", workers, body, args.shards,
                                               args.chunk_rows)
                got[workers] = (seconds, parts)
                runs.append({"round": r, "workers": workers, "seconds": round(seconds, 2), **load})
                print(json.dumps(runs[-1]), flush=True)
            if got[1][1] != got[2][1] or not got[1][1]:
                raise SystemExit(f"round {r}: the parts of 1 and 2 workers differ")
    speedups = [next(x["seconds"] for x in runs if x["round"] == r and x["workers"] == 1)
                / next(x["seconds"] for x in runs if x["round"] == r and x["workers"] == 2) for r in range(args.rounds)]
    one = statistics.median(x["seconds"] for x in runs if x["workers"] == 1)
    two = statistics.median(x["seconds"] for x in runs if x["workers"] == 2)
    print(f"MiniLM int8 (sentence_embedding), {args.rows} rows x {TOKENS} tokens, {args.shards} shards, "
          f"CHUNK_ROWS={args.chunk_rows}, ORT_THREADS=1, warm workers, {os.cpu_count()} cores (shared)")
    print(f"  1 worker: {one:.2f} s ({args.rows / one:.0f} rows/s); "
          f"2 workers: {two:.2f} s ({args.rows / two:.0f} rows/s)")
    print(f"  speed-up: {statistics.median(speedups):.2f}x (median of {args.rounds} rounds: "
          f"{', '.join(f'{s:.2f}x' for s in speedups)}); parts byte-identical in every round")
    cores = {w: statistics.median(x["cores_used"] for x in runs if x["workers"] == w) for w in (1, 2)}
    print(f"  cores the job's processes got (CPU s / wall s, median): 1 worker {cores[1]:.2f}, 2 workers "
          f"{cores[2]:.2f}; load average {min(x['load_before'][0] for x in runs):.1f}-"
          f"{max(x['load_after'][0] for x in runs):.1f} (the machine is shared)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
