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

A text-generation model (issue 17) is measured as the router reaches it: ``{"generate": GenerationRequest}`` (a
greedy completion of ``--prompt``, its ids from the variant's ``tokenizer.json`` as the router prepares them,
``--max-tokens`` tokens) with ``TIERSERVE_STREAMING_RUNTIME=1`` (what the streaming runtime loop sets), the
handler's streamed answer read in the same isolated interpreter: ``init`` as above, ``first token`` from the
handler call to its first NDJSON event (manifest + S3 fetch of every file of the variant + sha256 + the
onnxruntime-genai model and tokenizer + prefill + one token), ``all tokens`` to the stream's end; baseline
``import onnxruntime_genai`` alone.

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

from tierserve_tools.artifact import BOOT_PRELUDE

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


#: The isolated interpreter for a generation: as ``tierserve_tools.artifact.BOOT`` (the same prelude), but the
#: handler's StreamingResponse is read here (the first chunk timed) and a summary is the last stdout line.
GENERATE_BOOT = r"""
import json, os, sys, time, uuid
""" + BOOT_PRELUDE + r"""sys.stdout = sys.stderr
t0 = time.perf_counter()
module, _, name = handler.rpartition(".")
fn = getattr(__import__(module, fromlist=[name]), name)
t1 = time.perf_counter()
answer = fn(event, Context())
if isinstance(answer, dict):
    raise SystemExit("not streamed: " + json.dumps(answer)[:2000])
chunks = iter(answer.chunks)
first = next(chunks)
t2 = time.perf_counter()
lines = [first] + list(chunks)
t3 = time.perf_counter()
answer.release()
events = [json.loads(x) for x in b"".join(lines).splitlines() if x.strip()]
real_stdout.write(json.dumps({"init_s": t1 - t0, "first_token_s": t2 - t1, "all_s": t3 - t1, "events": events[-1:],
                              "status": answer.status}) + "\n")
real_stdout.flush()
"""


def _generate_event(models: Path, name: str, prompt: str, max_tokens: int) -> dict:
    """The router's InvokeWithResponseStream payload for a greedy completion of ``prompt`` (ids prepared)."""
    from tokenizers import Tokenizer

    from tierserve.generation.requests import KIND_COMPLETION, GenerationRequest, SamplingParams
    from tierserve.manifest import Manifest

    mv = Manifest.loads((models / "manifest.json").read_text()).resolve(name)
    variant = mv.cpu_artifact
    tok = next(f for f in variant.external_data if f.path.endswith("tokenizer.json"))
    ids = Tokenizer.from_file(str(models / tok.path)).encode(prompt).ids
    request = GenerationRequest(model=name, version=mv.version, kind=KIND_COMPLETION, prompt=prompt,
                                prompt_ids=tuple(ids), params=SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return {"generate": request.to_json()}


def _generate_cold(task: Path, runtime: Path, handler: str, event: dict, env: dict[str, str],
                   timeout_s: float) -> dict:
    clean = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    clean.setdefault("PATH", "/usr/bin:/bin")
    clean["TIERSERVE_STREAMING_RUNTIME"] = "1"
    done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", GENERATE_BOOT, str(task), str(runtime), handler],
                          input=json.dumps(event), capture_output=True, text=True, env=clean, cwd=task,
                          timeout=timeout_s, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"generation cold start failed ({done.returncode}):\n{done.stderr[-3000:]}")
    out: dict = json.loads(lines[-1])
    last = out["events"][-1] if out["events"] else {}
    if out["status"] != 200 or "error" in last:
        raise SystemExit(f"generation failed: {out}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=Path, default=Path("build/models"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--artifact", type=Path, default=None, help="a built CpuInferenceFunction (default: build one)")
    ap.add_argument("--prompt", default="The with statement", help="a text-generation model's prompt")
    ap.add_argument("--max-tokens", type=int, default=16, help="a text-generation model's completion tokens")
    args = ap.parse_args()
    import boto3

    from tierserve.manifest import Manifest
    from tierserve_tools.artifact import build, invoke, runtime_dir, sam_environment
    from tierserve_tools.batch import create_local_stack
    from tierserve_tools.moto import MotoServer

    manifest = Manifest.loads((args.models / "manifest.json").read_text())
    names = [n for n, e in manifest.models.items() if e.versions[e.default_version].serves_cpu]
    generative = {n for n in names if manifest.resolve(n).generative}
    gen_rows = []
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
            genai = [bare("import onnxruntime_genai") for _ in range(args.runs)] if generative else []
            rows = []
            for name in sorted(generative):
                event = _generate_event(args.models, name, args.prompt, args.max_tokens)
                for preload in ("", "class"):
                    runs = []
                    for run in range(args.runs):
                        e = {**env, "MODEL_CACHE_DIR": str(work / f"cache-{name}-{preload}-{run}"),
                             "PRELOAD_MODELS": preload}
                        t0 = time.perf_counter()
                        gen = _generate_cold(task, runtime, handler, event, e, timeout + 30)
                        runs.append((gen["init_s"] * 1000, gen["first_token_s"] * 1000, gen["all_s"] * 1000,
                                     (time.perf_counter() - t0) * 1000, gen["events"][-1]["usage"]))
                    gen_rows.append((name, preload or "on demand", runs))
            for name in names:
                if name in generative:
                    continue
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
    if gen_rows:
        print(f"  text generation: + import onnxruntime_genai: {med(genai):.0f} ms; greedy completion of "
              f"{args.prompt!r}, {args.max_tokens} tokens at most")
        print(f"  {'model':<10}{'loading':<12}{'init':>8}{'first token':>13}{'init + first':>14}{'all tokens':>12}"
              f"{'process total':>15}  usage")
        for name, mode, runs in gen_rows:
            init, first, every, total = (med(r[i] for r in runs) for i in range(4))
            print(f"  {name:<10}{mode:<12}{init:>8.0f}{first:>13.0f}{med(r[0] + r[1] for r in runs):>14.0f}"
                  f"{every:>12.0f}{total:>15.0f}  {runs[-1][4]}")
        each = [[(round(r[0]), round(r[1])) for r in runs] for *_, runs in gen_rows]
        print(f"  each run (init, first token) ms: {each}")
    print(f"  load average: {[round(x, 2) for x in os.getloadavg()]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
