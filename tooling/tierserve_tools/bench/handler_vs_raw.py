"""RouterFunction's warm handler (in-process CPU tier) against a raw ``InferenceSession.run``.

digits and MiniLM int8 (the variant the CPU tier serves) at batch 1 and 32, one intra-op thread,
interleaved (raw, handler, raw, ...) on the same input. The handler path is the whole invocation:
the HTTP API event, Powertools decorators, the header read, the manifest checks, routing, onnxruntime,
JSON encoding and metrics.

    python -m tierserve_tools.bench.handler_vs_raw [--models build/models] [--quick]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tierserve_tools.bench.harness import Context, Figure, Series, Skip, interleave, suite_main

SUITE = "handler"


def inputs(model: Any, rows: int, tokens: int = 16) -> dict[str, np.ndarray]:
    """Seeded inputs for a model: digits pixels 0-16, token ids (and a mask of ones), or normal floats."""
    rng = np.random.default_rng(0)
    out = {}
    for spec in model.inputs:
        shape = [rows if i == 0 else (tokens if d == -1 else d) for i, d in enumerate(spec.shape)]
        if spec.datatype == "INT64":
            arr = np.ones(shape, np.int64) if "mask" in spec.name else rng.integers(1000, 2000, shape)
            out[spec.name] = arr.astype(np.int64)
        elif model.name == "digits":
            out[spec.name] = rng.integers(0, 17, shape).astype(np.float32)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def json_body(arrays: dict[str, np.ndarray], model: Any) -> str:
    return json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": model.input_spec(k).datatype,
                                   "data": v.ravel().tolist()} for k, v in arrays.items()]})


def run(ctx: Context) -> None:
    from tierserve.manifest import Manifest

    if not (ctx.models / "manifest.json").is_file():
        raise Skip(f"no manifest in {ctx.models}: run `make demo` first")
    os.environ.update({"MODEL_STORE_URI": str(ctx.models.resolve()), "CPU_BACKEND": "inprocess", "TRITON_URL": "",
                       "MODEL_CACHE_DIR": str(Path(tempfile.mkdtemp(dir=ctx.workdir))), "ORT_THREADS": "1",
                       "ROUTING_POLICY": "cpu-first", "POWERTOOLS_METRICS_NAMESPACE": "bench"})
    import onnxruntime as ort

    from tierserve.app import reset_runtime
    from tierserve.handlers import router
    from tierserve.observability import logger
    from tierserve.sessions import session_options
    from tierserve_tools.apigw import http_api_event
    from tierserve_tools.emulation import LocalContext

    reset_runtime()
    logger.setLevel("ERROR")
    manifest = Manifest.loads((ctx.models / "manifest.json").read_text())
    sink = io.StringIO()
    n = ctx.n(400, 60)
    for name in ("digits", "minilm"):
        if name not in manifest.models:
            continue
        mv = manifest.resolve(name)
        raw = ort.InferenceSession(str(ctx.models / mv.cpu_artifact.path), session_options(1),
                                   providers=["CPUExecutionProvider"])
        for rows in (1, 32):
            arrays = inputs(mv, rows)
            event = http_api_event("POST", f"/v2/models/{name}/infer", [("content-type", "application/json")],
                                   json_body(arrays, mv).encode())

            def handler(event: dict[str, Any] = event) -> None:
                with contextlib.redirect_stdout(sink):  # EMF metrics go to stdout, as in Lambda
                    resp = router.lambda_handler(event, LocalContext("RouterFunction", 1769, 30))
                sink.seek(0)
                sink.truncate()
                assert resp["statusCode"] == 200, resp["body"][:300]

            def raw_run(arrays: dict[str, np.ndarray] = arrays, raw: Any = raw) -> None:
                raw.run(None, arrays)

            reps = n if name == "digits" or rows == 1 else max(10, n // 10)
            ctx.progress(f"{name} batch {rows}: {reps} interleaved calls")
            t = interleave({"raw": raw_run, "handler": handler}, reps)
            ctx.add(Figure(SUITE, f"{name} ({mv.cpu_variant or mv.selected_variant}) batch {rows}: handler vs raw",
                           Series("RouterFunction handler", t["handler"]), Series("raw session.run", t["raw"]),
                           conditions=f"warm, in-process CPU tier, JSON request, 1 ORT thread, {reps} interleaved "
                                      "calls after 3 warm-up rounds"))
    reset_runtime()


def main() -> int:
    return suite_main(SUITE, run, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
