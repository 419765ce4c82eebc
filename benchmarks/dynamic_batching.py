"""Dynamic batching on the REAL local tritonserver: throughput at concurrency 8, measured in ONE run.

One production-style repository (what the compiler writes: ``platform: "onnxruntime_onnx"``,
KIND_GPU) holds the same seeded ONNX MLP (FP32 128 -> 512 -> 512 -> 10, ReLU, max_batch_size 32)
three times: ``mlp_unbatched`` without ``dynamic_batching``, and ``mlp_batched_0us`` /
``mlp_batched_1000us`` with ``dynamic_batching { max_queue_delay_microseconds: 0 | 1000 }`` (0 batches
only what is already queued; 1000 also waits up to 1 ms to fill a batch).
``build_local_repository`` converts it for the local server (Python backend shim over
onnxruntime, CPU) and ``TritonServer`` runs it.

Each round: 8 threads, each with its own ``tritonclient.http`` client (it is not thread-safe),
send single-row binary requests back to back for ``--seconds``; the models alternate round by
round. Reported: requests/s, per-request p50/p95 latency, and Triton's own execution count per
request from its metrics endpoint (``nv_inference_exec_count / nv_inference_request_success``).

    python benchmarks/dynamic_batching.py [--concurrency 8] [--seconds 5] [--rounds 3]

CPU figures through a local shim: they show what dynamic batching does when per-execution overhead
dominates, not GPU throughput.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

IN, HID, OUT, MAX_BATCH = 128, 512, 10, 32
DELAYS_US = (0, 1000)
MODELS = {"mlp_unbatched": "",
          **{f"mlp_batched_{d}us": f"dynamic_batching {{ max_queue_delay_microseconds: {d} }}\n" for d in DELAYS_US}}
CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {mb}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {i} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {o} ] }} ]
{dyn}instance_group [ {{ kind: KIND_GPU count: 1 }} ]
"""


def mlp_onnx(path: Path, seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [IN, HID, HID, OUT]
    nodes, inits, prev = [], [], "x"
    for k in range(3):
        w = (rng.standard_normal((dims[k], dims[k + 1])) / np.sqrt(dims[k])).astype(np.float32)
        b = np.zeros(dims[k + 1], np.float32)
        inits += [numpy_helper.from_array(w, f"W{k}"), numpy_helper.from_array(b, f"B{k}")]
        nodes += [helper.make_node("MatMul", [prev, f"W{k}"], [f"m{k}"]),
                  helper.make_node("Add", [f"m{k}", f"B{k}"], [f"a{k}" if k < 2 else "y"])]
        if k < 2:
            nodes.append(helper.make_node("Relu", [f"a{k}"], [f"r{k}"]))
            prev = f"r{k}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def counters(metrics_url: str) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()  # noqa: S310 - loopback
    out: dict[tuple[str, str], float] = {}
    for m in re.finditer(r'^(nv_inference_(?:exec_count|request_success))\{model="([^"]+)"[^}]*\} (\S+)$', text,
                         re.M):
        out[(m.group(1), m.group(2))] = out.get((m.group(1), m.group(2)), 0.0) + float(m.group(3))
    return out


def run_round(url: str, model: str, concurrency: int, seconds: float, x: np.ndarray) -> tuple[int, list[float]]:
    import tritonclient.http as httpclient

    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        client = httpclient.InferenceServerClient(url)
        inp = httpclient.InferInput("x", [1, IN], "FP32")
        inp.set_data_from_numpy(x[i : i + 1], binary_data=True)
        out = [httpclient.InferRequestedOutput("y", binary_data=True)]
        client.infer(model, [inp], outputs=out)  # connection warm
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            client.infer(model, [inp], outputs=out)
            latencies[i].append((time.perf_counter() - t0) * 1e3)
        client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    stop_at[0] = time.perf_counter() + seconds
    start.wait()
    for t in threads:
        t.join()
    flat = [v for lat in latencies for v in lat]
    return len(flat), flat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from tierserve.local.triton import TritonServer, build_local_repository

    work = Path(tempfile.mkdtemp(prefix="dynbatch-bench-"))
    try:
        prod = work / "triton"
        for name, dyn in MODELS.items():
            mlp_onnx(prod / name / "1" / "model.onnx")
            (prod / name / "config.pbtxt").write_text(CONFIG.format(name=name, mb=MAX_BATCH, i=IN, o=OUT, dyn=dyn))
        repo = build_local_repository(prod, work / "local")
        x = np.random.default_rng(1).standard_normal((args.concurrency, IN)).astype(np.float32)
        with TritonServer(repo, log_path=work / "server.log") as server:
            for name in MODELS:  # warm each model
                run_round(server.http_url, name, args.concurrency, 1.0, x)
            before = counters(server.metrics_url)
            counts = dict.fromkeys(MODELS, 0)
            seconds = dict.fromkeys(MODELS, 0.0)
            latencies: dict[str, list[float]] = {name: [] for name in MODELS}
            for _ in range(args.rounds):
                for name in MODELS:
                    n, lat = run_round(server.http_url, name, args.concurrency, args.seconds, x)
                    counts[name] += n
                    seconds[name] += args.seconds
                    latencies[name] += lat
            after = counters(server.metrics_url)
        print(f"dynamic batching, local tritonserver 2.51 (python-backend onnxruntime shim, CPU) | concurrency "
              f"{args.concurrency}, single-row binary HTTP requests, {args.rounds} x {args.seconds:.0f} s per model, "
              f"alternating | MLP FP32 {IN}->{HID}->{HID}->{OUT} | Python {platform.python_version()}, "
              f"{os.cpu_count()} cores")
        print(f"{'model':<20}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'rows/exec':>11}")
        rates = {}
        for name in MODELS:
            n, secs, lat = counts[name], seconds[name], latencies[name]
            execs = after.get(("nv_inference_exec_count", name), 0) - before.get(("nv_inference_exec_count", name), 0)
            reqs = after.get(("nv_inference_request_success", name), 0) - before.get(
                ("nv_inference_request_success", name), 0)
            rates[name] = n / secs
            print(f"{name:<20}{n / secs:>10.1f}{np.percentile(lat, 50):>10.2f}{np.percentile(lat, 95):>10.2f}"
                  f"{(reqs / execs if execs else float('nan')):>11.2f}")
        for d in DELAYS_US:
            print(f"throughput ratio, dynamic batching (max_queue_delay {d} us) / none: "
                  f"{rates[f'mlp_batched_{d}us'] / rates['mlp_unbatched']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
