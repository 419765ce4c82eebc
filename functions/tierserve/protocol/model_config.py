"""Triton's model configuration and repository index as JSON, built from the manifest alone.

Why: perf_analyzer asks ``GET /v2/models/NAME/config`` before it sends any load, and
``tritonclient``'s ``get_model_config`` / ``get_model_repository_index`` are how users' tools list
and size models. The gateway answers the documents Triton would for the model as the gateway
serves it, from what the manifest knows (pure Python: no protobuf, no tritonclient on the router):

* ``platform: "onnxruntime_onnx"`` (every variant is ONNX run by onnxruntime, on either tier);
* ``max_batch_size`` from the manifest; when it is above 0, ``dims`` leave out the batch axis,
  exactly as in the ``config.pbtxt`` the compiler writes for the GPU tier;
* one instance group, ``KIND_GPU`` when the model is deployed on the GPU tier, else ``KIND_CPU``;
* ``parameters.tierserve_targets``: the tiers the model is deployed on, GPU first.

The scheduler settings of the GPU tier (dynamic batching's queue delay) live in Triton's own
config, which the router does not read; ask Triton for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tierserve.manifest import Manifest, ModelVersion, TensorSpec
from tierserve.protocol.datatypes import triton_type


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    return list(spec.shape[1:] if batched and spec.shape else spec.shape)


def _tensor(spec: TensorSpec, batched: bool, **fields: Any) -> dict[str, Any]:
    """One input/output entry; a [batch]-only tensor gets ``dims: [1]`` and an empty ``reshape``, as in
    the ``config.pbtxt`` the compiler writes (Triton needs one dim where the model has none past the batch)."""
    dims = _dims(spec, batched)
    entry = {"name": spec.name, "data_type": triton_type(spec.datatype), **fields, "dims": dims or [1]}
    if not dims:
        entry["reshape"] = {"shape": []}
    return entry


#: The inputs of Triton's vLLM backend a client may leave out (``text_input`` is required).
_OPTIONAL_GENERATION_INPUTS = {"stream", "sampling_parameters", "exclude_input_in_output"}


def model_config(model: ModelVersion) -> dict[str, Any]:
    """Triton's model configuration JSON (``GET /v2/models/NAME/config``) for one model version."""
    config = _config(model)
    if model.generative:
        # issue 17: a causal LM answers as Triton's vLLM backend does: decoupled (a request may get many
        # responses, the generate_stream route), its inputs and outputs by that backend's names, the optional
        # ones marked optional; the backend that runs it is onnxruntime-genai
        config.update(platform="", backend="onnxruntime_genai", model_transaction_policy={"decoupled": True})
        for entry in config["input"]:
            entry["optional"] = entry["name"] in _OPTIONAL_GENERATION_INPUTS
        config["default_model_filename"] = ""
    return config


def _config(model: ModelVersion) -> dict[str, Any]:
    batched = model.max_batch_size > 0
    kind = "KIND_GPU" if model.serves_gpu else "KIND_CPU"
    return {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "runtime": "",
        "version_policy": {"specific": {"versions": [int(model.version)]}},
        "max_batch_size": model.max_batch_size,
        "input": [
            {**_tensor(s, batched, format="FORMAT_NONE"), "is_shape_tensor": False, "allow_ragged_batch": False,
             "optional": False, "is_non_linear_format_io": False}
            for s in model.inputs
        ],
        "output": [
            {**_tensor(s, batched), "label_filename": "", "is_shape_tensor": False, "is_non_linear_format_io": False}
            for s in model.outputs
        ],
        "batch_input": [],
        "batch_output": [],
        "optimization": {"priority": "PRIORITY_DEFAULT", "input_pinned_memory": {"enable": True},
                         "output_pinned_memory": {"enable": True}, "gather_kernel_buffer_threshold": 0,
                         "eager_batching": False},
        "instance_group": [{"name": f"{model.name}_0", "kind": kind, "count": 1, "gpus": [], "secondary_devices": [],
                            "profile": [], "passive": False, "host_policy": ""}],
        "default_model_filename": "model.onnx",
        "cc_model_filenames": {},
        "metric_tags": {},
        "parameters": {"tierserve_targets": {"string_value": ",".join(sorted(model.targets, reverse=True))}},
        "model_warmup": [],
    }


def repository_index(manifest: Manifest, gpu_configured: bool, ready_only: bool = False,
                     readiness: Callable[[ModelVersion], Exception | None] | None = None) -> list[dict[str, Any]]:
    """``POST /v2/repository/index``: every model version with its state (and why, when not READY).

    READY: the manifest entry is valid and some tier here can serve it. UNAVAILABLE: the entry is
    broken (the manifest's reason), or the model runs on the GPU tier only and none is configured.
    The state is what the manifest and the configuration say; it probes nothing (``/ready`` does).
    ``readiness`` (a dispatcher's cheap per-version answer, the edge's): the state is its answer instead,
    the same predicate as ``/ready`` (None: READY; an error: UNAVAILABLE, with its message as the reason)."""
    out: list[dict[str, Any]] = []
    for name in sorted(set(manifest.models) | set(manifest.broken)):
        if name in manifest.broken:
            if not ready_only:
                out.append({"name": name, "version": "", "state": "UNAVAILABLE",
                            "reason": f"invalid manifest entry: {manifest.broken[name].reason}"})
            continue
        for version, mv in sorted(manifest.models[name].listed().items(), key=lambda kv: int(kv[0])):
            if readiness is not None:
                problem = readiness(mv)
                if problem is None:
                    out.append({"name": name, "version": version, "state": "READY"})
                elif not ready_only:
                    out.append({"name": name, "version": version, "state": "UNAVAILABLE",
                                "reason": getattr(problem, "message", None) or str(problem)})
            elif mv.serves_cpu or gpu_configured:
                out.append({"name": name, "version": version, "state": "READY"})
            elif not ready_only:
                out.append({"name": name, "version": version, "state": "UNAVAILABLE",
                            "reason": "the model runs on the GPU tier only and no GPU tier is configured"})
    return out
