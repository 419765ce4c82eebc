"""The router's overhead on the CPU leg, as a ratio to a raw ``InferenceSession.run``, in ONE run.

For each request kind (1 row as JSON; 1M elements as binary tensors; 1M elements as JSON), timed
interleaved in one loop so that machine noise hits every path alike:

* ``raw``: ``InferenceSession.run`` on the same input (the floor);
* ``decide``: the tier dispatcher's decision alone (size-aware policy, from the header);
* ``router + cpu function``: RouterFunction's ``handle_http`` for an HTTP API v2 event with
  ``CPU_BACKEND=lambda``; its Lambda client invokes CpuInferenceFunction's ``handle_direct`` in
  this process, through the same JSON serialisation of payload and reply that Lambda applies
  (no network, no Powertools decorators). The CPU function's own time is measured inside the
  call, so ``router alone`` = total - CPU function.

The model is the digits classifier (StandardScaler + LogisticRegression, FP32 [-1, 64]), built
here with scikit-learn; 1M elements = 15,625 rows x 64 pixel values (integers 0-16, so the JSON
form fits the 4 MiB payload limit). onnxruntime runs with 1 intra-op thread everywhere.

    python -m benchmarks.router_overhead [--n-small 400] [--n-large 15]
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
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


class InProcessLambda:
    """A boto3 Lambda client whose Invoke runs CpuInferenceFunction's handler in this process, with the
    JSON round trips of a real Invoke; it records the function's own time."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.last_ms = 0.0

    def invoke(self, FunctionName: str, InvocationType: str, Payload: bytes) -> dict[str, Any]:
        t0 = time.perf_counter()
        reply = json.dumps(self.handler(json.loads(Payload))).encode()
        self.last_ms = (time.perf_counter() - t0) * 1e3
        return {"StatusCode": 200, "Payload": io.BytesIO(reply)}


def http_event(x: np.ndarray, binary: bool) -> dict[str, Any]:
    from tierserve.local.apigw import http_api_event

    if binary:
        header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}).encode()
        return http_api_event("POST", "/v2/models/digits/infer",
                              [("content-type", "application/octet-stream"),
                               ("inference-header-content-length", str(len(header)))], header + x.tobytes())
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.astype(np.int64).ravel().tolist()}],
                       "outputs": [{"name": "label"}]}).encode()
    return http_api_event("POST", "/v2/models/digits/infer", [("content-type", "application/json")], body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-small", type=int, default=400, help="iterations for the 1-row request")
    ap.add_argument("--n-large", type=int, default=15, help="iterations for the 1M-element requests")
    args = ap.parse_args()
    os.environ.update({"POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "ERROR",
                       "POWERTOOLS_METRICS_NAMESPACE": "bench"})

    import onnxruntime as ort

    from tests.support.models import write_digits
    from tierserve.api import handle_http
    from tierserve.app import build_runtime
    from tierserve.backends.lambda_invoke import LambdaInvokeBackend
    from tierserve.calls import Body, InferenceCall
    from tierserve.direct import handle_direct
    from tierserve.sessions import session_options
    from tierserve.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="router-overhead-"))
    mv = write_digits(work)
    settings = Settings(model_store_uri=str(work), model_cache_dir=str(work / "cache"), ort_threads=1)
    cpu_runtime = build_runtime(settings)
    lam = InProcessLambda(lambda event: handle_direct(event, None, cpu_runtime))
    router_runtime = build_runtime(settings, cpu=LambdaInvokeBackend("CpuInferenceFunction", client=lam))
    raw = ort.InferenceSession(str(work / mv.cpu_artifact.path), session_options(1),
                               providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    cases = [("1 row, JSON", rng.integers(0, 17, (1, 64)).astype(np.float32), False, args.n_small),
             ("1M elements, binary", rng.integers(0, 17, (15_625, 64)).astype(np.float32), True, args.n_large),
             ("1M elements, JSON", rng.integers(0, 17, (15_625, 64)).astype(np.float32), False, args.n_large)]
    print(f"router overhead on the CPU leg | Python {platform.python_version()}, {os.cpu_count()} cores, "
          f"onnxruntime {ort.__version__} 1 thread | digits LR, FP32 [-1, 64] | p50 ms (p99 for the 1-row case)")
    print(f"{'request':<22}{'body MB':>8}{'raw':>9}{'decide':>9}{'router+cpu':>12}{'cpu fn':>9}{'router':>9}"
          f"{'ratio':>8}")
    sink = io.StringIO()
    for label, x, binary, n in cases:
        event = http_event(x, binary)
        text = event["body"]
        header_length = int(event["headers"]["inference-header-content-length"]) if binary else None
        call = InferenceCall.from_body(Body.from_event_text(text, event["isBase64Encoded"], header_length))
        t_raw, t_dec, t_tot, t_cpu = [], [], [], []
        with contextlib.redirect_stdout(sink):
            for i in range(n + 3):
                t0 = time.perf_counter()
                raw.run(["label"], {"input": x})
                t1 = time.perf_counter()
                router_runtime.dispatcher.decide(mv, call)
                t2 = time.perf_counter()
                resp = handle_http(event, None, router_runtime)
                t3 = time.perf_counter()
                assert resp["statusCode"] == 200, resp["body"][:300]
                if i >= 3:  # warm-up: session load, first parse
                    t_raw.append((t1 - t0) * 1e3)
                    t_dec.append((t2 - t1) * 1e3)
                    t_tot.append((t3 - t2) * 1e3)
                    t_cpu.append(lam.last_ms)
                sink.seek(0)
                sink.truncate()
        router_only = [a - b for a, b in zip(t_tot, t_cpu, strict=True)]
        print(f"{label:<22}{len(text) / 1e6:>8.2f}{pct(t_raw, 50):>9.3f}{pct(t_dec, 50):>9.4f}{pct(t_tot, 50):>12.3f}"
              f"{pct(t_cpu, 50):>9.3f}{pct(router_only, 50):>9.3f}{pct(t_tot, 50) / pct(t_raw, 50):>7.1f}x"
              f"   (n={n})")
    print("ratio = (router + CPU function) p50 / raw p50; 'router' = router + cpu - CPU function's own time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
