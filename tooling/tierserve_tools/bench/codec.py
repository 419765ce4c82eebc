"""The binary tensor extension against JSON, for one request as the router reads it.

For a 224x224x3 FP32 image and a 1M-element FP32 tensor: the client's encoding (tierserve.protocol.tensors's
``encode_request``, the same layout tritonclient writes) plus the server's read (``wire.parse_request``
and materialising the numpy tensor), interleaved, binary then JSON. Ratio = binary / JSON time.

    python -m tierserve_tools.bench.codec [--quick]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from tierserve_tools.bench.harness import Context, Figure, Series, interleave

SUITE = "codec"


def run(ctx: Context) -> None:
    from tierserve.protocol.calls import Body, InferenceCall
    from tierserve.protocol.messages import InferRequest
    from tierserve.protocol.tensors import encode_request, tensor_from_numpy

    rng = np.random.default_rng(0)
    cases = [("224x224x3 FP32 image", rng.standard_normal((1, 224, 224, 3)).astype(np.float32)),
             ("1M-element FP32 tensor", rng.standard_normal((1, 1_000_000)).astype(np.float32))]
    n = ctx.n(30, 6)
    for label, x in cases:
        request = InferRequest([tensor_from_numpy("x", x)])

        def round_trip(binary: bool, request: InferRequest = request, size: int = x.size) -> None:
            body, header_length = encode_request(request, binary=binary)
            call = InferenceCall.from_body(Body(body, header_length))
            assert call.request().inputs[0].data.size == size

        ctx.progress(f"{label}: {n} interleaved round trips")
        t = interleave({"binary": lambda: round_trip(True), "json": lambda: round_trip(False)}, n, warmup=1)
        body_bin, _ = encode_request(request, binary=True)
        body_json, _ = encode_request(request, binary=False)
        ctx.add(Figure(SUITE, f"{label}: binary vs JSON (encode + parse + materialise)",
                       Series("binary tensor extension", t["binary"]), Series("JSON", t["json"]),
                       conditions=f"{n} interleaved round trips in one process; bodies {len(body_bin) / 1e6:.2f} MB "
                                  f"binary vs {len(body_json) / 1e6:.2f} MB JSON",
                       extra={"binary_bytes": len(body_bin), "json_bytes": len(body_json)}))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        c = Context(Path("build/models"), Path(tmp), quick=True, suite=SUITE)
        run(c)
        print(json.dumps([f.to_json() for f in c.figures], indent=1))
