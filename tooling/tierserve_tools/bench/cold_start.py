"""Cold start, each in a fresh interpreter, timed from outside as the child's CPU time (user + sys,
interpreter start included; the wall clock of a shared 2-core machine mostly measures the other tenants),
interleaved with its baseline round by round:

* import alone: RouterFunction's handler with tracing off (outside Lambda, or ``Tracing: Disabled``) and
  on (``LAMBDA_TASK_ROOT`` set: Powertools' Tracer and the X-Ray SDK), CpuInferenceFunction's handler;
  baseline ``python -c pass``. The goal is on the difference: <= 150 ms above ``pass``;
* first invocation: CpuInferenceFunction cold (import, the store's sha256-verified copy into an empty
  cache, loading MiniLM int8, 23 MB, and one 1-row inference) against ``import onnxruntime`` alone (the
  issue's baseline) and against ``import onnxruntime`` + ``InferenceSession`` of the same file + one run
  (the floor for the same work);
* first invocation of RouterFunction (in-process CPU tier) on a 1-row digits request vs ``pass``.

    python -m tierserve_tools.bench.cold_start [--models build/models] [--quick]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tierserve_tools.bench.harness import Context, Figure, Series, Skip, suite_main

SUITE = "cold-start"
_CLEAN = ("LAMBDA_TASK_ROOT", "POWERTOOLS_TRACE_DISABLED", "AWS_SAM_LOCAL", "AWS_CHALICE_CLI_MODE")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN}
    env.update(extra)
    return env


def _time(code: str, env: dict[str, str], setup: Path | None = None) -> float:
    """The child's CPU time (user + sys, ms): on a shared, overloaded machine the wall clock mostly
    measures the other tenants; an import or a model load is CPU-bound work (files are in the page cache)."""
    if setup is not None:  # a cold /tmp cache each time, as a new execution environment has
        shutil.rmtree(setup, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start probe failed: {code[:120]}...\n{proc.stderr[-2000:]}")
    return ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1e3


def _rounds(cases: dict[str, tuple[str, dict[str, str], Path | None]], n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(n):
        for name, (code, env, setup) in cases.items():
            out[name].append(_time(code, env, setup))
    return out


def _minilm_event() -> dict[str, object]:
    body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 8],
                        "data": [101, 7592, 2088, 2003, 1037, 3231, 1012, 102]},
                       {"name": "attention_mask", "datatype": "INT64", "shape": [1, 8], "data": [1] * 8}],
            "outputs": [{"name": "sentence_embedding"}]}
    return {"model_name": "minilm", "headers": {"content-type": "application/json"}, "body": json.dumps(body),
            "isBase64Encoded": False}


def run(ctx: Context) -> None:
    n = ctx.n(12, 3)
    cond = (f"fresh interpreter per sample, its CPU time (user + sys, interpreter start included), "
            f"{n} interleaved rounds")
    ctx.progress(f"imports ({n} rounds)")
    imports = _rounds({
        "pass": ("pass", _env(), None),
        "router": ("import tierserve.handlers.router", _env(), None),
        "router+xray": ("import tierserve.handlers.router", _env(LAMBDA_TASK_ROOT="/var/task"), None),
        "cpu": ("import tierserve.handlers.cpu_inference", _env(), None),
    }, n)
    base = Series("python -c pass", imports["pass"])
    for key, label in (("router", "RouterFunction handler import, tracing off"),
                       ("router+xray", "RouterFunction handler import, tracing on (X-Ray SDK)"),
                       ("cpu", "CpuInferenceFunction handler import, tracing off")):
        goal = 150.0 if key == "router" else None
        ctx.add(Figure(SUITE, label, Series(label, imports[key]), base, goal=goal, goal_op="<=", goal_on="difference",
                       conditions=cond))

    variant = ctx.models / "minilm" / "1" / "int8_dynamic.onnx"
    if not variant.is_file():
        raise Skip(f"no {variant}: run `make compile-minilm` (or `make demo`) first")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cold-", dir=ctx.workdir))
    event = tmp / "event.json"
    event.write_text(json.dumps(_minilm_event()))
    cache = tmp / "cache"
    cpu_env = _env(MODEL_STORE_URI=str(ctx.models.resolve()), MODEL_CACHE_DIR=str(cache), CPU_BACKEND="inprocess",
                   AWS_LAMBDA_FUNCTION_MEMORY_SIZE="1769", POWERTOOLS_METRICS_NAMESPACE="bench",
                   POWERTOOLS_LOG_LEVEL="ERROR")
    first_cpu = ("import json, sys\nfrom tierserve.handlers.cpu_inference import lambda_handler\n"
                 "from tierserve_tools.emulation import LocalContext\n"
                 f"r = lambda_handler(json.load(open({str(event)!r})),\n"
                 "                   LocalContext('CpuInferenceFunction', 1769, 30))\n"
                 "assert r['statusCode'] == 200, r\n")
    raw_session = ("import numpy as np, onnxruntime as ort\n"
                   "o = ort.SessionOptions(); o.intra_op_num_threads = 1\n"
                   f"s = ort.InferenceSession({str(variant)!r}, o, providers=['CPUExecutionProvider'])\n"
                   "x = np.ones((1, 8), np.int64)\ns.run(None, {'input_ids': x, 'attention_mask': x})\n")
    ctx.progress(f"first invocations ({n} rounds)")
    first = _rounds({
        "import onnxruntime": ("import onnxruntime", _env(), None),
        "raw": (raw_session, _env(), None),
        "cpu": (first_cpu, cpu_env, cache),
    }, n)
    cond2 = f"{cond}; MiniLM int8_dynamic {variant.stat().st_size / 1e6:.1f} MB, 1 ORT thread, empty model cache"
    label = "CpuInferenceFunction cold start: import + verified copy + load MiniLM int8 + 1 inference"
    ctx.notes["cold_start_ms"] = Series(label, first["cpu"]).value  # the cost simulation's Lambda cold start
    ctx.add(Figure(SUITE, f"{label} vs import onnxruntime", Series(label, first["cpu"]),
                   Series("import onnxruntime", first["import onnxruntime"]), conditions=cond2))
    ctx.add(Figure(SUITE, f"{label} vs raw onnxruntime (import + session + run)", Series(label, first["cpu"]),
                   Series("import onnxruntime + InferenceSession + run", first["raw"]), conditions=cond2))
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    return suite_main(SUITE, run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
