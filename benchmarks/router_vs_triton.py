"""Issue 4 figure: the router in front of Triton, over the local API, vs a direct tritonclient call.

One run, one `tierserve serve` stack (API Gateway emulation -> RouterFunction worker -> Triton), the
same tritonclient code and the same binary-tensor request for both paths, interleaved
(direct, routed, direct, ...). The routed path adds: HTTP into the emulator, the HTTP API v2 event,
the router's decode/validate/route/encode, and the router's own tritonclient call to Triton.

    python -m benchmarks.router_vs_triton [--models build/models] [--model minilm] [--rows 64] [--n 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=Path, default=Path("build/models"))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    if not (args.models / "triton" / args.model).is_dir():
        print(f"no Triton repository for {args.model!r} in {args.models}: run `make compile-minilm` first",
              file=sys.stderr)
        return 2
    import tritonclient.http as httpclient

    from tierserve.local.serve import LocalStack
    from tierserve.manifest import Manifest

    mv = Manifest.loads((args.models / "manifest.json").read_text()).resolve(args.model)
    rng = np.random.default_rng(0)
    arrays = {}
    for spec in mv.inputs:
        shape = [args.rows if i == 0 else (16 if d == -1 else d) for i, d in enumerate(spec.shape)]
        if spec.datatype == "INT64":
            arrays[spec.name] = (rng.integers(1000, 2000, shape) if "mask" not in spec.name
                                 else np.ones(shape)).astype(np.int64)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(np.float32)
    outputs = [mv.outputs[-1].name]

    def make_inputs() -> list:
        ins = []
        for name, arr in arrays.items():
            i = httpclient.InferInput(name, list(arr.shape), mv.input_spec(name).datatype)  # type: ignore[union-attr]
            i.set_data_from_numpy(arr, binary_data=True)
            ins.append(i)
        return ins

    with LocalStack(args.models, port=0, batch=False) as stack:
        assert stack.triton is not None, "the local Triton did not start"
        direct = httpclient.InferenceServerClient(stack.triton.http_url)
        routed = httpclient.InferenceServerClient(stack.url.removeprefix("http://"))
        outs = [httpclient.InferRequestedOutput(o, binary_data=True) for o in outputs]
        for _ in range(10):  # warm both paths (sessions, connections, router worker)
            direct.infer(args.model, make_inputs(), outputs=outs)
            routed.infer(args.model, make_inputs(), outputs=outs, headers={"x-target": "gpu"})
        t_direct, t_routed = [], []
        for _ in range(args.n):
            t0 = time.perf_counter()
            a = direct.infer(args.model, make_inputs(), outputs=outs).as_numpy(outputs[0])
            t1 = time.perf_counter()
            b = routed.infer(args.model, make_inputs(), outputs=outs, headers={"x-target": "gpu"}).as_numpy(outputs[0])
            t2 = time.perf_counter()
            t_direct.append((t1 - t0) * 1e3)
            t_routed.append((t2 - t1) * 1e3)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        direct.close()
        routed.close()
    print(f"model={args.model} v{mv.version} rows={args.rows} n={args.n} binary tensors, HTTP, local Triton "
          "(python-backend onnxruntime shim, CPU), 2 cores")
    print(f"{'path':<40}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}")
    for name, xs in (("direct tritonclient -> Triton", t_direct), ("tritonclient -> local API -> router -> Triton",
                                                                  t_routed)):
        print(f"{name:<40}{pct(xs, 50):>10.3f}{pct(xs, 95):>10.3f}{pct(xs, 99):>10.3f}")
    print(f"routed/direct p50 ratio: {pct(t_routed, 50) / pct(t_direct, 50):.2f}x; "
          f"added p50 {pct(t_routed, 50) - pct(t_direct, 50):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
