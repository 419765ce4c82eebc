"""Triton model repository for models whose targets include ``gpu``::

    DIR/triton/NAME/config.pbtxt
    DIR/triton/NAME/VERSION/model.onnx      (the fp32 or fp16 variant)

``config.pbtxt`` uses ``platform: "onnxruntime_onnx"``; with ``max_batch_size > 0`` dims exclude the
batch axis. It parses into ``tritonclient.grpc.model_config_pb2.ModelConfig``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tierserve.manifest import TensorSpec

TRITON_DIR = "triton"


def _tensor(spec: TensorSpec, batched: bool) -> str:
    dims = list(spec.shape[1:] if batched else spec.shape) or [1]
    dtype = "STRING" if spec.datatype == "BYTES" else spec.datatype
    return (
        f'  {{\n    name: "{spec.name}"\n    data_type: TYPE_{dtype}\n'
        f"    dims: [ {', '.join(str(d) for d in dims)} ]\n  }}"
    )


def config_pbtxt(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    *,
    tensorrt_fp16: bool = True,
    warmup: bool = True,
    queue_delay_us: int = 100,
    warmup_dims: dict[str, list[int]] | None = None,
) -> str:
    batched = max_batch_size > 0
    lines = [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "version_policy: { all { } }",
        "input [\n" + ",\n".join(_tensor(s, batched) for s in inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(s, batched) for s in outputs) + "\n]",
    ]
    if batched:
        preferred = [b for b in (8, 16, 32, 64) if b <= max_batch_size] or [max_batch_size]
        lines.append(
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
            f"  max_queue_delay_microseconds: {queue_delay_us}\n}}"
        )
    lines.append("instance_group [\n  {\n    kind: KIND_GPU\n    count: 1\n  }\n]")
    if tensorrt_fp16:
        lines.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator [\n    {\n"
            '      name: "tensorrt"\n      parameters { key: "precision_mode" value: "FP16" }\n'
            '      parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n    }\n    ]\n  }\n}'
        )
    if warmup:
        ins = []
        for s in inputs:
            dims = [
                d if d > 0 else (warmup_dims or {}).get(s.name, [1] * len(s.shape))[i] for i, d in enumerate(s.shape)
            ]
            dims = dims[1:] if batched else dims
            ins.append(
                f'    inputs {{\n      key: "{s.name}"\n      value: {{\n        data_type: TYPE_{s.datatype}\n'
                f"        dims: [ {', '.join(str(max(1, d)) for d in dims) or '1'} ]\n        zero_data: true\n"
                "      }\n    }"
            )
        lines.append('model_warmup [\n  {\n    name: "zeros"\n    batch_size: 1\n' + "\n".join(ins) + "\n  }\n]")
    return "\n".join(lines) + "\n"


def write_triton_repo(
    out_dir: Path,
    name: str,
    version: str,
    model_file: Path,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    *,
    tensorrt_fp16: bool = True,
    warmup: bool = True,
) -> Path:
    """Write (or refresh) ``DIR/triton/NAME``; the config describes the newest version."""
    root = Path(out_dir) / TRITON_DIR / name
    vdir = root / version
    vdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, vdir / "model.onnx")
    text = config_pbtxt(name, inputs, outputs, max_batch_size, tensorrt_fp16=tensorrt_fp16, warmup=warmup)
    tmp = root / ".config.pbtxt.tmp"
    tmp.write_text(text)
    os.replace(tmp, root / "config.pbtxt")
    return root
