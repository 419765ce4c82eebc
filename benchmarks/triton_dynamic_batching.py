"""Triton dynamic batching on the REAL local tritonserver: throughput at concurrency 8, single-row requests.

One production-style repository holds the same small MLP ONNX model (256 -> 1024 -> 1024 -> 16, FP32,
ReLU, ``max_batch_size: 64``) under two names:

* ``mlp_dynbatch``: ``dynamic_batching { max_queue_delay_microseconds: 2000 }``
* ``mlp_nobatch``:  no ``dynamic_batching`` block (every request is its own execution)

``build_local_repository`` turns it into the local repository (Python-backend shim running the same
ONNX file with onnxruntime on CPU: the binary in the nvidia-pytriton wheel has no onnxruntime backend
and there is no GPU here) and ``TritonServer`` serves it. Each round sends ``--requests`` single-row
requests per thread from ``--threads`` threads through ONE shared ``TritonBackend`` (HTTP; it keeps
one client per thread); the two models alternate round by round so machine noise hits both alike.
Triton's own counters (``nv_inference_request_success``, ``nv_inference_exec_count``) come from the
metrics endpoint, as deltas over the measured rounds. The server is always stopped.

    python benchmarks/triton_dynamic_batching.py [--threads 8] [--requests 100] [--rounds 3]

These are CPU figures from a local shim, not GPU figures: they show what dynamic batching does to
request/execution counts and to throughput when per-execution overhead dominates, nothing more.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

MODELS = ("mlp_dynbatch", "mlp_nobatch")
IN_DIM, HIDDEN, OUT_DIM, MAX_BATCH = 256, 1024, 16, 64

CONFIG = """\
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {in_dim} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {out_dim} ] }} ]
{dynamic}instance_group [ {{ kind: KIND_GPU count: 1 }} ]
"""
DYNAMIC = "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"


def mlp_onnx(seed: int = 0) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [IN_DIM, HIDDEN, HIDDEN, OUT_DIM]
    inits, nodes, prev = [], [], "x"
    for i in range(3):
        w = (rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32)
        b = (0.01 * rng.standard_normal(dims[i + 1])).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        out = "y" if i == 2 else f"h{i}"
        gemm_out = out if i == 2 else f"g{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [gemm_out]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, IN_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, OUT_DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_production_repo(root: Path) -> Path:
    data = mlp_onnx()
    for name in MODELS:
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(data)
        (root / name / "config.pbtxt").write_text(CONFIG.format(
            name=name, max_batch=MAX_BATCH, in_dim=IN_DIM, out_dim=OUT_DIM,
            dynamic=DYNAMIC if name == "mlp_dynbatch" else "",
        ))
    return root


def model_version(name: str):
    from tierserve.manifest import ModelVersion, TensorSpec

    return ModelVersion(
        name=name, version="1", inputs=(TensorSpec("x", "FP32", (-1, IN_DIM)),),
        outputs=(TensorSpec("y", "FP32", (-1, OUT_DIM)),), variants={}, selected_variant="fp32",
        targets=("gpu",), max_batch_size=MAX_BATCH,
    )


_METRIC = re.compile(r'^(nv_inference_request_success|nv_inference_exec_count)\{([^}]*)\}\s+([0-9.eE+]+)$')


def counters(metrics_url: str) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()  # noqa: S310 - loopback URL we built
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            model = re.search(r'model="([^"]+)"', m.group(2))
            if model:
                key = (model.group(1), m.group(1))
                out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def run_round(backend, mv, threads: int, per_thread: int, seed: int) -> tuple[float, list[float], int]:
    from tierserve.types import InferRequest, Tensor

    lat: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    barrier = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        rng = np.random.default_rng(seed * 1000 + i)
        xs = rng.standard_normal((per_thread, 1, IN_DIM)).astype(np.float32)
        barrier.wait()
        for x in xs:
            req = InferRequest(inputs=[Tensor("x", "FP32", (1, IN_DIM), x)])
            t0 = time.perf_counter()
            try:
                resp = backend.infer(mv, req, 30.0)
                assert resp.outputs[0].data.shape == (1, OUT_DIM)
            except Exception:  # counted and reported, never hidden
                errors[i] += 1
                continue
            lat[i].append((time.perf_counter() - t0) * 1000)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return wall, [x for xs in lat for x in xs], sum(errors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--requests", type=int, default=100, help="requests per thread per round")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds per model (alternating)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up requests per thread per model")
    args = ap.parse_args()

    from tierserve.backends.triton import TritonBackend
    from tierserve.local.triton import TritonServer, build_local_repository, pytriton_available

    if not pytriton_available():
        print("nvidia-pytriton is not installed: no local tritonserver (pip install 'tierserve[local]')",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-dynbatch-") as tmp:
        prod = write_production_repo(Path(tmp) / "triton")
        local = build_local_repository(prod, Path(tmp) / "local")
        server = TritonServer(local, log_path=Path(tmp) / "server.log")
        try:
            server.start()
            print(f"tritonserver ready in {server.startup_s:.1f} s (pid {server.pid})")
            backend = TritonBackend(server.http_url, "http", timeout_s=30.0)
            mvs = {name: model_version(name) for name in MODELS}
            for name in MODELS:
                run_round(backend, mvs[name], args.threads, args.warmup, seed=99)
            before = counters(server.metrics_url)
            wall = dict.fromkeys(MODELS, 0.0)
            lats: dict[str, list[float]] = {m: [] for m in MODELS}
            errs = dict.fromkeys(MODELS, 0)
            for r in range(args.rounds):
                order = MODELS if r % 2 == 0 else MODELS[::-1]
                for name in order:
                    w, lat, e = run_round(backend, mvs[name], args.threads, args.requests, seed=r)
                    wall[name] += w
                    lats[name] += lat
                    errs[name] += e
            after = counters(server.metrics_url)
            backend.close()
        finally:
            server.stop()
            print(f"tritonserver stopped (running: {server.is_running()})")

    print()
    print(f"conditions: python {platform.python_version()}, {os.cpu_count()} CPU cores, no GPU; local tritonserver "
          f"(nvidia-pytriton) Python-backend shim running the ONNX MLP {IN_DIM}->{HIDDEN}->{HIDDEN}->{OUT_DIM} FP32 "
          f"with onnxruntime CPU, 1 instance; HTTP, one shared TritonBackend; {args.threads} threads x "
          f"{args.requests} single-row requests x {args.rounds} rounds per model, alternating; "
          f"{args.warmup}/thread warm-up excluded")
    print()
    hdr = f"{'model':<14}{'requests':>9}{'errors':>7}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}" \
          f"{'triton ok':>11}{'executions':>12}{'rows/exec':>11}"
    print(hdr)
    print("-" * len(hdr))
    for name in MODELS:
        n = len(lats[name])
        ok, ex = (after.get((name, k), 0) - before.get((name, k), 0)
                  for k in ("nv_inference_request_success", "nv_inference_exec_count"))
        p50 = float(np.percentile(lats[name], 50)) if n else float("nan")
        p99 = float(np.percentile(lats[name], 99)) if n else float("nan")
        print(f"{name:<14}{n:>9}{errs[name]:>7}{n / wall[name]:>9.0f}{p50:>9.2f}{p99:>9.2f}"
              f"{ok:>11.0f}{ex:>12.0f}{(ok / ex if ex else float('nan')):>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
