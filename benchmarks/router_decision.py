"""Router decision overhead, in-process: what routing adds on top of the backend call.

Three things are timed, interleaved in one loop (decide, handler, backend, decide, ...) so machine
noise hits all alike:

* ``Router.decide``: the size-aware policy plus the GPU-usable check (breaker state + HealthCache,
  whose fake GPU ``ready()`` answers True and is cached for the TTL) for a model on both tiers;
* ``api.handle_http``: the whole router entry point (HTTP API v2 event parse, protocol JSON
  decode/validate, version pick, decide, backend call, encode, metrics/log calls) for a 1-row
  request served by a no-op CPU backend;
* the no-op backend's ``infer`` alone (the floor the handler path sits on).

No model is run and nothing leaves the process: the figures are pure routing/protocol overhead.

    python benchmarks/router_decision.py [--n 20000] [--rows 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


class _Sink:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="timed iterations of each path")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--rows", type=int, default=1)
    args = ap.parse_args()

    os.environ.update({"POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "WARNING",
                       "POWERTOOLS_METRICS_NAMESPACE": "bench", "POWERTOOLS_SERVICE_NAME": "tierserve"})
    import tierserve.api as api
    from tierserve.breaker import CircuitBreaker, HealthCache
    from tierserve.manifest import Manifest, ModelVersion, TensorSpec, Variant
    from tierserve.router import Router
    from tierserve.routing import get_policy
    from tierserve.settings import Settings
    from tierserve.store import ModelStore
    from tierserve.types import InferRequest, InferResponse, Tensor

    mv = ModelVersion(
        name="both", version="1", inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "FP32", (-1, 3)),),
        variants={"fp32": Variant("both/1/model.onnx", "0" * 64, 0)}, selected_variant="fp32",
        targets=("gpu", "cpu"), max_batch_size=64, routing={"gpu_min_rows": 64},
    )
    y = np.zeros((args.rows, 3), dtype=np.float32)
    canned = InferResponse("both", "1", [Tensor("y", "FP32", y.shape, y)])

    class NoopBackend:
        tier = "cpu"

        def infer(self, model, request, timeout_s=None):
            return canned

        def ready(self, model=None):
            return True

    class ReadyGpu(NoopBackend):
        tier = "gpu"

    x = np.full((args.rows, 4), 0.5, dtype=np.float32)
    request = InferRequest(inputs=[Tensor("x", "FP32", x.shape, x)], id="bench")
    body = json.dumps({"id": "bench", "inputs": [{"name": "x", "shape": [args.rows, 4], "datatype": "FP32",
                                                  "data": x.ravel().tolist()}]})
    event = {
        "version": "2.0", "routeKey": "POST /v2/models/{name}/infer", "rawPath": "/v2/models/both/infer",
        "rawQueryString": "", "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": "POST", "path": "/v2/models/both/infer"}, "requestId": "bench"},
        "body": body, "isBase64Encoded": False,
    }

    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        (Path(tmp) / "manifest.json").write_text(Manifest.empty().with_version(mv).dumps())
        settings = Settings(model_store_uri=tmp, model_cache_dir=str(Path(tmp) / "cache"))
        store = ModelStore(tmp, settings.model_cache_dir, manifest_ttl_s=3600)
        cpu = NoopBackend()
        router = Router(cpu, ReadyGpu(), get_policy("size-aware"), CircuitBreaker(), HealthCache(ttl_s=2.0))
        api._app = api.App(settings, store, router)
        payload_bytes = len(body)

        first = api.handle_http(event)
        if first["statusCode"] != 200 or first["headers"].get("x-served-by") != "cpu":
            print(f"handler check failed: {first}", file=sys.stderr)
            return 1
        decision = router.decide(mv, request, payload_bytes, None, None)

        t_decide: list[int] = []
        t_handler: list[int] = []
        t_backend: list[int] = []
        clock = time.perf_counter_ns
        with contextlib.redirect_stdout(_Sink()):  # Powertools flushes EMF metrics to stdout every 100
            for i in range(args.warmup + args.n):
                t0 = clock()
                router.decide(mv, request, payload_bytes, None, None)
                t1 = clock()
                api.handle_http(event)
                t2 = clock()
                cpu.infer(mv, request, 10.0)
                t3 = clock()
                if i >= args.warmup:
                    t_decide.append(t1 - t0)
                    t_handler.append(t2 - t1)
                    t_backend.append(t3 - t2)
        api._app = None

    print(f"conditions: python {platform.python_version()} ({platform.machine()}), {os.cpu_count()} CPU cores, "
          f"one thread; {args.n} timed iterations per path after {args.warmup} warm-up, interleaved; "
          f"{args.rows}-row FP32 [rows, 4] JSON request ({payload_bytes} B) to a model on both tiers "
          f"(size-aware, gpu_min_rows 64 -> decision: {decision.target}, '{decision.reason}'); GPU fake ready() "
          f"cached by HealthCache (TTL 2 s), breaker closed; no-op CPU backend returning a canned response")
    print()
    hdr = f"{'path':<44}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}"
    print(hdr)
    print("-" * len(hdr))
    for name, xs in (("Router.decide (policy + cached health)", t_decide),
                     ("api.handle_http, no-op backend", t_handler),
                     ("no-op backend.infer alone", t_backend)):
        a = np.asarray(xs, dtype=np.float64) / 1000.0
        print(f"{name:<44}{np.percentile(a, 50):>10.2f}{np.percentile(a, 99):>10.2f}{a.mean():>10.2f}")
    h50 = np.percentile(np.asarray(t_handler) / 1000.0, 50) - np.percentile(np.asarray(t_backend) / 1000.0, 50)
    print(f"\nhandler overhead over the backend call (p50 difference): {h50:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
