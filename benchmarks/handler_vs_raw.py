"""Issue 2 figure: RouterFunction's warm latency vs a raw onnxruntime InferenceSession.run.

Both run the same compiled variant on the same input, in one process, interleaved (raw, handler,
raw, handler, ...) so machine noise hits both alike. The handler path includes the HTTP API event
parsing, protocol JSON decode/validate/encode, routing, Powertools decorators and metrics.

    python benchmarks/handler_vs_raw.py [--models build/models] [--model digits] [--rows 1] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="build/models")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    store = Path(args.models)
    if not (store / "manifest.json").is_file():
        print(f"no manifest in {store}: run `make compile-demo` first", file=sys.stderr)
        return 2
    os.environ.update({"MODEL_STORE_URI": str(store), "CPU_BACKEND": "inprocess", "TRITON_URL": "",
                       "POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "WARNING",
                       "POWERTOOLS_METRICS_NAMESPACE": "bench", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1769"})
    import contextlib
    import io

    import onnxruntime as ort

    from tierserve.handlers import router
    from tierserve.local.emulation import LocalContext
    from tierserve.manifest import Manifest
    from tierserve.sessions import session_options

    manifest = Manifest.loads((store / "manifest.json").read_text())
    mv = manifest.resolve(args.model)
    variant = mv.cpu_artifact
    spec = mv.inputs[0]
    rng = np.random.default_rng(0)
    shape = [args.rows if d == -1 else d for d in spec.shape]
    x = rng.standard_normal(shape).astype(np.float32)
    if args.model == "digits":
        from sklearn.datasets import load_digits

        x = load_digits().data[-args.rows:].astype(np.float32)
    raw = ort.InferenceSession(str(store / variant.path), sess_options=session_options(1),
                               providers=["CPUExecutionProvider"])
    body = json.dumps({"inputs": [{"name": spec.name, "shape": list(x.shape), "datatype": spec.datatype,
                                   "data": x.ravel().tolist()}]})
    event = json.loads(Path("events/http_infer.json").read_text())
    event["rawPath"] = event["requestContext"]["http"]["path"] = f"/v2/models/{args.model}/infer"
    event["body"] = body
    ctx = LocalContext("RouterFunction", 1769, 30)
    sink = io.StringIO()

    def call_handler() -> dict:
        with contextlib.redirect_stdout(sink):  # EMF metrics go to stdout, as in Lambda
            return router.lambda_handler(event, ctx)

    for _ in range(50):  # warm both
        raw.run(None, {spec.name: x})
        assert call_handler()["statusCode"] == 200
        sink.seek(0)
        sink.truncate()
    t_raw, t_handler = [], []
    for _ in range(args.n):
        t0 = time.perf_counter()
        raw.run(None, {spec.name: x})
        t1 = time.perf_counter()
        resp = call_handler()
        t2 = time.perf_counter()
        sink.seek(0)
        sink.truncate()
        assert resp["statusCode"] == 200
        t_raw.append((t1 - t0) * 1e3)
        t_handler.append((t2 - t1) * 1e3)
    print(f"model={args.model} v{mv.version} variant={mv.cpu_variant or mv.selected_variant} rows={args.rows} "
          f"n={args.n} threads=1 python={sys.version.split()[0]} ort={ort.__version__}")
    print(f"{'path':<28}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, xs in (("raw InferenceSession.run", t_raw), ("RouterFunction handler", t_handler)):
        print(f"{name:<28}{pct(xs, 50):>10.4f}{pct(xs, 95):>10.4f}{pct(xs, 99):>10.4f}{statistics.mean(xs):>10.4f}")
    print(f"handler/raw p50 ratio: {pct(t_handler, 50) / pct(t_raw, 50):.2f}x; "
          f"overhead p50 {pct(t_handler, 50) - pct(t_raw, 50):.4f} ms")
    report = store / mv.name / mv.version / "report.json"
    if report.is_file():
        rep = json.loads(report.read_text())
        print(f"variants from {report}:")
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("size_bytes", "latency", "accuracy")}
                          for k, v in (rep.get("variants") or {}).items()}, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
