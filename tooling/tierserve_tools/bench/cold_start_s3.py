"""Issue 12 figure: CpuInferenceFunction's cold start with the model fetched from S3, from its built artifact.

Each run is a fresh isolated interpreter over the function's `sam build` artifact (tierserve_tools.artifact:
`python -I -S -B`, the artifact, boto3 as Lambda's runtime provides it), with the models in a moto_server
bucket as in AWS (`MODEL_STORE_URI=s3://...`, an empty `/tmp` cache each run). Reported per model:

* ``init``: importing the handler module (Lambda's init phase; with ``PRELOAD_MODELS=class`` it also
  fetches, verifies and loads the class's models, as provisioned concurrency and SnapStart do before any
  request);
* ``first invoke``: the first request (on demand: manifest + S3 fetch + sha256 + session + inference);
* ``warm invoke``: a second request in the same interpreter;
* baselines in the same artifact: the interpreter alone, and ``import onnxruntime`` alone.

    python -m tierserve_tools.bench.cold_start_s3 [--models build/models] [--runs 5] [--artifact DIR]

Lambda adds its own sandbox start and code download before ``init``; this measures what the function's
code costs on this machine's CPU (2 shared cores), not Lambda's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUCKET = "tierserve-models-123456789012-us-east-1"


def _payload(models: Path, name: str) -> dict:
    """The router's Invoke payload for one row of ``name`` (zeros; token ids for int inputs)."""
    from tierserve.manifest import Manifest

    mv = Manifest.loads((models / "manifest.json").read_text()).resolve(name)
    inputs = []
    for spec in mv.inputs:
        shape = [1 if i == 0 else (8 if d == -1 else d) for i, d in enumerate(spec.shape)]
        n = 1
        for d in shape:
            n *= d
        fill = 1 if spec.datatype.startswith("INT") else 0.5
        inputs.append({"name": spec.name, "datatype": spec.datatype, "shape": shape, "data": [fill] * n})
    body = json.dumps({"inputs": inputs})
    return {"model_name": name, "model_version": mv.version, "headers": {"content-type": "application/json"},
            "body": body, "isBase64Encoded": False}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=Path, default=Path("build/models"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--artifact", type=Path, default=None, help="a built CpuInferenceFunction (default: build one)")
    args = ap.parse_args()
    import boto3

    from tierserve.manifest import Manifest
    from tierserve_tools.artifact import build, invoke, runtime_dir, sam_environment
    from tierserve_tools.batch import create_local_stack
    from tierserve_tools.moto import MotoServer

    names = [n for n, e in Manifest.loads((args.models / "manifest.json").read_text()).models.items()
             if e.versions[e.default_version].serves_cpu]
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        work = Path(tmp)
        task = args.artifact or build("CpuInferenceFunction", work / "CpuInferenceFunction", Path("functions"))
        runtime = runtime_dir(Path.home() / ".cache" / "tierserve" / "lambda-runtime")
        moto = MotoServer(work / "moto.log").start()
        try:
            creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
            s3 = boto3.client("s3", endpoint_url=moto.url, **creds)
            create_local_stack(s3, boto3.client("dynamodb", endpoint_url=moto.url, **creds),
                               boto3.client("sqs", endpoint_url=moto.url, **creds), BUCKET, "tierserve-jobs")
            for path in sorted(args.models.rglob("*")):
                rel = path.relative_to(args.models).as_posix()
                if path.is_file() and not rel.startswith(("triton/", "sagemaker/", ".")):
                    s3.upload_file(str(path), BUCKET, f"models/{rel}")
            os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                               "AWS_REGION": "us-east-1"})
            handler, env, timeout = sam_environment(Path("template.yaml"), "CpuInferenceFunction",
                                                    Path("events/sam-env.json"),
                                                    {"http://host.docker.internal:5000": moto.url})

            def bare(code: str) -> float:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-I", "-S", "-B", "-c", f"import sys; sys.path[:0]=[{str(task)!r}]; "
                                f"{code}"], check=True, capture_output=True)
                return (time.perf_counter() - t0) * 1000

            base = [bare("pass") for _ in range(args.runs)]
            ort = [bare("import onnxruntime") for _ in range(args.runs)]
            rows = []
            for name in names:
                event = _payload(args.models, name)
                for preload in ("", "class"):
                    inits, firsts, totals = [], [], []
                    for run in range(args.runs):
                        cache = work / f"cache-{name}-{preload}-{run}"
                        e = {**env, "MODEL_CACHE_DIR": str(cache), "PRELOAD_MODELS": preload}
                        t0 = time.perf_counter()
                        out = invoke(task, runtime, handler, event, e, timeout + 30)
                        totals.append((time.perf_counter() - t0) * 1000)
                        if out.error is not None or out.result.get("statusCode") != 200:
                            raise SystemExit(f"{name}: {out.error or out.result}\n{out.logs[-2000:]}")
                        assert out.timings
                        inits.append(out.timings["init_s"] * 1000)
                        firsts.append(out.timings["invoke_s"] * 1000)
                    rows.append((name, preload or "on demand", inits, firsts, totals))
        finally:
            moto.stop()
    med = statistics.median
    print(f"CpuInferenceFunction artifact ({task.name}), models from S3 (moto), {args.runs} cold runs each, median ms; "
          f"this machine (2 shared cores), not Lambda")
    print(f"  interpreter alone: {med(base):.0f} ms; + import onnxruntime: {med(ort):.0f} ms")
    print(f"  {'model':<10}{'loading':<12}{'init':>8}{'first invoke':>14}{'process total':>15}")
    for name, mode, inits, firsts, totals in rows:
        print(f"  {name:<10}{mode:<12}{med(inits):>8.0f}{med(firsts):>14.0f}{med(totals):>15.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
