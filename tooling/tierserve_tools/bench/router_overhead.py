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

The model is the compiled digits classifier (FP32 [-1, 64], from `make demo`); 1M elements = 15,625
rows x 64 pixel values (integers 0-16, so the JSON form fits the 4 MiB payload limit).
onnxruntime runs with 1 intra-op thread everywhere.

    python -m tierserve_tools.bench.router_overhead [--models build/models] [--quick]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from typing import Any

import numpy as np

from tierserve_tools.bench.harness import Context, Figure, Series, Skip, suite_main

SUITE = "routing"


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
    from tierserve_tools.apigw import http_api_event

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


def run(ctx: Context) -> None:
    os.environ.update({"POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_METRICS_NAMESPACE": "bench"})
    import onnxruntime as ort

    from tierserve.api import handle_http
    from tierserve.app import build_runtime
    from tierserve.backends.lambda_invoke import LambdaInvokeBackend
    from tierserve.direct import handle_direct
    from tierserve.manifest import Manifest
    from tierserve.observability import logger
    from tierserve.protocol.calls import Body, InferenceCall
    from tierserve.sessions import session_options
    from tierserve.settings import Settings

    if not (ctx.models / "manifest.json").is_file():
        raise Skip(f"no manifest in {ctx.models}: run `make demo` first")
    mv = Manifest.loads((ctx.models / "manifest.json").read_text()).resolve("digits")
    logger.setLevel("ERROR")
    settings = Settings(model_store_uri=str(ctx.models.resolve()), model_cache_dir=str(ctx.workdir / "cache-routing"),
                        ort_threads=1)
    cpu_runtime = build_runtime(settings)
    lam = InProcessLambda(lambda event: handle_direct(event, None, cpu_runtime))
    router_runtime = build_runtime(settings, cpu=LambdaInvokeBackend("CpuInferenceFunction", client=lam))
    raw = ort.InferenceSession(str(ctx.models / mv.cpu_artifact.path), session_options(1),
                               providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    n_small, n_large = ctx.n(400, 60), ctx.n(15, 3)
    cases = [("1 row, JSON", rng.integers(0, 17, (1, 64)).astype(np.float32), False, n_small),
             ("1M elements, binary", rng.integers(0, 17, (15_625, 64)).astype(np.float32), True, n_large),
             ("1M elements, JSON", rng.integers(0, 17, (15_625, 64)).astype(np.float32), False, n_large)]
    sink = io.StringIO()
    cond = (f"digits ({mv.cpu_variant or mv.selected_variant}), 1 ORT thread, in-process Invoke with Lambda's JSON "
            "round trips, no network, no Powertools decorators; interleaved")
    for label, x, binary, n in cases:
        ctx.progress(f"{label}: {n} interleaved rounds")
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
        base = Series("raw session.run", t_raw)
        body = f"{cond}; body {len(text) / 1e6:.2f} MB in the event"
        ctx.add(Figure(SUITE, f"{label}: router + CPU function vs raw", Series("router + CPU function", t_tot), base,
                       conditions=body))
        ctx.add(Figure(SUITE, f"{label}: router alone (total - CPU function's own time) vs raw",
                       Series("router alone", router_only), base, conditions=body))
        if label.startswith("1 row"):
            ctx.add(Figure(SUITE, "the tier decision alone vs raw (1 row)", Series("TierDispatcher.decide", t_dec),
                           base, conditions=body))


def main() -> int:
    return suite_main(SUITE, run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
