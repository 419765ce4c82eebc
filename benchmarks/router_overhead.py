"""Router decision overhead, in-process, measured in ONE run against a REAL onnxruntime backend.

Timed, interleaved in one loop so that machine noise hits every path alike:

* ``raw``: ``InferenceSession.run`` on the same request (the floor);
* ``decide``: ``Router.decide`` alone (size-aware policy, breaker state, cached GPU health probe);
* ``handle_http``: RouterFunction's entry point for an HTTP API v2 event (parse, JSON decode,
  validate, version pick, decide, in-process onnxruntime backend, encode, metrics/log calls);
  the backend's own time is measured inside the same call and subtracted, giving the
  router's overhead per request.

The model is y = x @ W + b (FP32, 4 -> 3), on both tiers, with a fake GPU whose ready() is True
(cached by the HealthCache) so decide() takes the full size-aware path. Logs and EMF output are
discarded so stdout I/O is not counted.

    python benchmarks/router_overhead.py [--n 5000] [--rows 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


class TimedBackend:
    """Wraps the in-process onnxruntime backend and records the time each infer() takes."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.tier = inner.tier
        self.last_ms = 0.0

    def infer(self, model, request, timeout_s=None):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return self.inner.infer(model, request, timeout_s)
        finally:
            self.last_ms = (time.perf_counter() - t0) * 1e3

    def ready(self, model=None) -> bool:  # type: ignore[no-untyped-def]
        return True


class ReadyGpu:
    tier = "gpu"

    def infer(self, model, request, timeout_s=None):  # type: ignore[no-untyped-def]
        raise AssertionError("not reached: small batches go to the CPU")

    def ready(self, model=None) -> bool:  # type: ignore[no-untyped-def]
        return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--rows", type=int, default=1)
    args = ap.parse_args()

    from tests.support.models import linear_onnx, write_model
    from tierserve.local.apigw import http_api_event
    from tierserve.manifest import TensorSpec

    work = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    data, _, _ = linear_onnx(seed=0)
    mv = write_model(work, "lin", "1", data, (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),),
                     targets=("gpu", "cpu"), routing={"gpu_min_rows": 64})
    os.environ.update({"MODEL_STORE_URI": str(work), "MODEL_CACHE_DIR": str(work / "cache"), "CPU_BACKEND": "inprocess",
                       "TRITON_URL": "", "POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "ERROR",
                       "POWERTOOLS_METRICS_NAMESPACE": "bench", "ORT_THREADS": "1"})
    from tierserve import api
    from tierserve.codec import decode_request
    from tierserve.settings import reset_settings

    reset_settings()
    api.reset_app()
    app = api.get_app()
    timed = TimedBackend(app.router.cpu)
    app.router.cpu = timed
    app.router.gpu = ReadyGpu()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, 4)).astype(np.float32)
    body = json.dumps({"id": "b", "inputs": [{"name": "x", "shape": [args.rows, 4], "datatype": "FP32",
                                              "data": x.ravel().tolist()}]}).encode()
    event = http_api_event("POST", "/v2/models/lin/infer", [("content-type", "application/json")], body)
    request = decode_request(body)

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    raw = ort.InferenceSession(str(work / "lin/1/model.onnx"), opts, providers=["CPUExecutionProvider"])

    handler = api.handle_http
    sink = io.StringIO()
    t_raw, t_decide, t_handler, t_overhead = [], [], [], []
    with contextlib.redirect_stdout(sink):
        for _ in range(200):  # warm: session load, caches, health probe
            assert handler(event, None)["statusCode"] == 200
            app.router.decide(mv, request, len(body), None, None)
            raw.run(None, {"x": x})
        for i in range(args.n):
            t0 = time.perf_counter()
            raw.run(None, {"x": x})
            t1 = time.perf_counter()
            decision = app.router.decide(mv, request, len(body), None, None)
            t2 = time.perf_counter()
            resp = handler(event, None)
            t3 = time.perf_counter()
            t_raw.append((t1 - t0) * 1e3)
            t_decide.append((t2 - t1) * 1e3)
            t_handler.append((t3 - t2) * 1e3)
            t_overhead.append((t3 - t2) * 1e3 - timed.last_ms)
            if i % 1000 == 0:
                sink.seek(0)
                sink.truncate()
    assert decision.target == "cpu" and resp["statusCode"] == 200 and resp["headers"]["x-served-by"] == "cpu"

    print(f"router overhead, in-process | n={args.n} rows={args.rows} | Python {platform.python_version()}, "
          f"{os.cpu_count()} cores, onnxruntime {ort.__version__} 1 thread | model y = x@W+b FP32 4->3")
    print(f"{'path':<52}{'p50 ms':>10}{'p99 ms':>10}")
    rows = [
        ("raw InferenceSession.run", t_raw),
        ("Router.decide (size-aware, cached GPU health)", t_decide),
        ("handle_http, whole request (in-process CPU tier)", t_handler),
        ("handle_http minus backend time = router overhead", t_overhead),
    ]
    for name, xs in rows:
        print(f"{name:<52}{pct(xs, 50):>10.4f}{pct(xs, 99):>10.4f}")
    print(f"handle_http / raw p50 ratio: {pct(t_handler, 50) / pct(t_raw, 50):.1f}x; "
          f"decide is {100 * pct(t_decide, 50) / pct(t_handler, 50):.1f}% of handle_http p50")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
