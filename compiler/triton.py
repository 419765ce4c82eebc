"""Triton model repository for models whose targets include ``gpu``::

    DIR/triton/NAME/config.pbtxt
    DIR/triton/NAME/VERSION/model.onnx      (the GPU variant: fp32 or fp16)
    DIR/triton/NAME/VERSION/<file>.data     (its external data, if it has any)

``config.pbtxt`` is a ``tritonclient.grpc.model_config_pb2.ModelConfig`` written with
``google.protobuf.text_format``, so it is valid by construction and the datatype names are Triton's
own (BYTES is ``TYPE_STRING``). It uses ``platform: "onnxruntime_onnx"`` on ``KIND_GPU`` instances,
dynamic batching when ``max_batch_size > 0`` (dims then exclude the batch axis), the TensorRT fp16
accelerator and a zero-data warm-up request. ``tierserve_tools.triton.localize_config`` parses the
same file for the local CPU server.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from tierserve.manifest import TensorSpec
from tierserve.protocol.datatypes import DATATYPES, triton_type
from tierserve_compiler.external_data import locations

TRITON_DIR = "triton"

#: Open Inference Protocol datatype -> Triton ``DataType`` enum name, from the runtime's one datatype table.
TRITON_DATATYPES = {dt: triton_type(dt) for dt in DATATYPES}
PROTOCOL_DATATYPES = {v: k for k, v in TRITON_DATATYPES.items()}


def _dims(spec: TensorSpec, batched: bool, fill: list[int] | None = None) -> list[int]:
    """Config dims: without the batch axis when batching; ``fill`` replaces dynamic dims (warm-up)."""
    dims = [d if d > 0 or fill is None else max(1, fill[i]) for i, d in enumerate(spec.shape)]
    return dims[1:] if batched else dims


def model_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    *,
    tensorrt_fp16: bool = True,
    warmup: bool = True,
    queue_delay_us: int = 100,
    warmup_dims: dict[str, list[int]] | None = None,
) -> Any:
    """The production ``ModelConfig`` for the GPU tier."""
    from tritonclient.grpc import model_config_pb2 as mc

    batched = max_batch_size > 0
    cfg = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    cfg.version_policy.all.SetInParent()
    for specs, section in ((inputs, cfg.input), (outputs, cfg.output)):
        for s in specs:
            section.add(name=s.name, data_type=mc.DataType.Value(TRITON_DATATYPES[s.datatype]))
            dims = _dims(s, batched)
            section[-1].dims.extend(dims or [1])
            if not dims:  # a [batch]-only tensor: Triton needs one dim, the model has none past the batch
                section[-1].reshape.SetInParent()
    if batched:
        preferred = [b for b in (8, 16, 32, 64) if b <= max_batch_size] or [max_batch_size]
        cfg.dynamic_batching.preferred_batch_size.extend(preferred)
        cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    if tensorrt_fp16:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        acc.parameters["precision_mode"] = "FP16"
        acc.parameters["max_workspace_size_bytes"] = "1073741824"
    if warmup:
        sample = cfg.model_warmup.add(name="zeros", batch_size=1)
        for s in inputs:
            fill = (warmup_dims or {}).get(s.name, [1] * len(s.shape))
            sample.inputs[s.name].data_type = mc.DataType.Value(TRITON_DATATYPES[s.datatype])
            sample.inputs[s.name].dims.extend(_dims(s, batched, fill) or [1])
            sample.inputs[s.name].zero_data = True
    return cfg


def config_pbtxt(
    name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], max_batch_size: int, **options: Any
) -> str:
    """:func:`model_config` (same arguments) as protobuf text, the format Triton reads from ``config.pbtxt``."""
    from google.protobuf import text_format

    return str(text_format.MessageToString(model_config(name, inputs, outputs, max_batch_size, **options)))


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
    for loc in locations(model_file):  # external data keeps its name: model.onnx refers to it by that
        (vdir / loc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(model_file).parent / loc, vdir / loc)
    shutil.copyfile(model_file, vdir / "model.onnx")
    text = config_pbtxt(name, inputs, outputs, max_batch_size, tensorrt_fp16=tensorrt_fp16, warmup=warmup)
    tmp = root / ".config.pbtxt.tmp"
    tmp.write_text(text)
    os.replace(tmp, root / "config.pbtxt")
    return root
