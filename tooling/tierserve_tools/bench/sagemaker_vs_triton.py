"""Issue 12 figure: the router's ``sagemaker`` backend vs a direct tritonclient call to the same Triton.

One run, one local tritonserver started as NVIDIA's SageMaker image starts it (its SageMaker front
end on, serving the model's model.tar.gz), the same binary-tensor request body for every path,
interleaved (direct, raw /invocations, backend, direct, ...):

* ``direct``: tritonclient.http -> Triton's KServe API (``/v2/models/NAME/infer``);
* ``invocations``: one HTTP POST of the same body to Triton's SageMaker front end (``/invocations``),
  parsed with tritonclient: what the container itself costs;
* ``backend``: ``SageMakerBackend.infer`` -> boto3 ``InvokeEndpoint`` (SigV4) -> the local
  InvokeEndpoint (``tierserve_tools.sagemaker``, one more loopback hop, standing in for SageMaker's
  front door) -> ``/invocations`` -> the decoded outputs, as the router gets them.

    python -m tierserve_tools.bench.sagemaker_vs_triton [--models build/models] [--model minilm] [--rows 1] [--n 300]
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=Path, default=Path("build/models"))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--seq", type=int, default=16, help="length of a dynamic non-batch axis")
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    if not (args.models / "triton" / args.model).is_dir():
        print(f"no Triton repository for {args.model!r} in {args.models}: run `make compile-minilm` first",
              file=sys.stderr)
        return 2
    import tritonclient.http as httpclient

    from tierserve.backends.sagemaker import BINARY_CONTENT_TYPE, SageMakerBackend
    from tierserve.manifest import Manifest
    from tierserve.protocol.calls import Body, InferenceCall
    from tierserve_tools.sagemaker import (
        ENDPOINT_NAME,
        LocalEndpoint,
        SageMakerRuntime,
        endpoint_repository,
        triton_container,
    )

    mv = Manifest.loads((args.models / "manifest.json").read_text()).resolve(args.model)
    rng = np.random.default_rng(0)
    arrays = {}
    for spec in mv.inputs:
        shape = [args.rows if i == 0 else (args.seq if d == -1 else d) for i, d in enumerate(spec.shape)]
        if spec.datatype.startswith("INT"):
            arrays[spec.name] = (rng.integers(1000, 2000, shape) if "mask" not in spec.name
                                 else np.ones(shape)).astype(np.int64)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(np.float32)
    output = mv.outputs[-1].name
    inputs = []
    for name, arr in arrays.items():
        i = httpclient.InferInput(name, list(arr.shape), mv.input_spec(name).datatype)  # type: ignore[union-attr]
        i.set_data_from_numpy(arr, binary_data=True)
        inputs.append(i)
    outs = [httpclient.InferRequestedOutput(output, binary_data=True)]
    body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outs)

    with tempfile.TemporaryDirectory(prefix="bench-sagemaker-") as tmp:
        repo, name, version, _ = endpoint_repository(args.models, args.models / "triton", Path(tmp), args.model)
        server, container_url = triton_container(repo, name, log_path=Path(tmp) / "triton.log")
        server.start()
        runtime = SageMakerRuntime([LocalEndpoint(ENDPOINT_NAME, container_url, name)]).start()
        os.environ.update({"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime.url, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
        try:
            direct = httpclient.InferenceServerClient(server.http_url)
            port = int(container_url.rsplit(":", 1)[1])
            raw = http.client.HTTPConnection("127.0.0.1", port)
            backend = SageMakerBackend(ENDPOINT_NAME, model=f"{name}/{version}", timeout_s=30)

            def run_direct() -> np.ndarray:
                return direct.infer(name, inputs, outputs=outs).as_numpy(output)

            def run_invocations() -> np.ndarray:
                raw.request("POST", "/invocations", body=body,
                            headers={"Content-Type": f"{BINARY_CONTENT_TYPE}{header_length}"})
                resp = raw.getresponse()
                data = resp.read()
                length = int(resp.getheader("Content-Type", "").rsplit("=", 1)[1])
                return httpclient.InferenceServerClient.parse_response_body(data, header_length=length).as_numpy(output)

            def run_backend() -> np.ndarray:
                call = InferenceCall.from_body(Body(body, header_length))
                return backend.infer(mv, call, timeout_s=30).arrays()[output]

            paths = {"direct tritonclient -> Triton KServe": run_direct,
                     "HTTP POST -> Triton /invocations": run_invocations,
                     "SageMakerBackend -> InvokeEndpoint -> Triton": run_backend}
            times: dict[str, list[float]] = {k: [] for k in paths}
            results = {}
            for _ in range(10):  # warm every path (sessions, connections, boto3 client)
                for fn in paths.values():
                    fn()
            for _ in range(args.n):
                for key, fn in paths.items():
                    t0 = time.perf_counter()
                    results[key] = fn()
                    times[key].append((time.perf_counter() - t0) * 1e3)
            first = next(iter(results.values()))
            for value in results.values():
                np.testing.assert_allclose(value, first, rtol=1e-5, atol=1e-5)
            direct.close()
            raw.close()
        finally:
            runtime.stop()
            server.stop()
    print(f"model={name} v{version} rows={args.rows} seq={args.seq} n={args.n} interleaved, binary tensors, HTTP; "
          "local tritonserver 2.51 (python-backend onnxruntime shim, CPU), 2 shared cores")
    print(f"{'path':<48}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}")
    for key, xs in times.items():
        print(f"{key:<48}{pct(xs, 50):>10.3f}{pct(xs, 95):>10.3f}{pct(xs, 99):>10.3f}")
    d = pct(times["direct tritonclient -> Triton KServe"], 50)
    b = pct(times["SageMakerBackend -> InvokeEndpoint -> Triton"], 50)
    i = pct(times["HTTP POST -> Triton /invocations"], 50)
    print(f"backend/direct p50 ratio: {b / d:.2f}x; added p50 {b - d:.3f} ms "
          f"(of which the container's /invocations vs KServe: {i - d:+.3f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
