"""A text-generation model's readiness in the cloud: the CPU tier loads it with onnxruntime-genai.

Why its own test: the CPU tier's readiness probe feeds the smallest request a model takes, which a causal LM's
graph (input ids and a KV cache) cannot take from its vLLM-shaped inputs, so every generative model answered
503 on ``/v2/models/NAME/ready`` in the cloud and through ``tierserve serve``.
"""

from __future__ import annotations

from tierserve.protocol.dataplane import DataPlane


def test_a_generative_model_that_loads_is_ready_on_the_cpu_tier(genai_runtime) -> None:
    answer = DataPlane(genai_runtime).model_ready("tiny", None)
    assert answer.document == {"name": "tiny", "version": "1", "ready": True}
    assert answer.headers["x-served-by"] == "cpu"


def test_a_generative_model_whose_weights_are_unreadable_is_not_ready(genai_runtime, tmp_path) -> None:
    import pytest

    from tierserve import errors

    mv = genai_runtime.store.manifest().resolve("tiny", None)
    store_root = genai_runtime.settings.model_store_uri
    data = next(e for e in mv.cpu_artifact.external_data if e.path.endswith("model.onnx.data"))
    from pathlib import Path

    Path(store_root, data.path).write_bytes(b"tampered")
    with pytest.raises(errors.BackendUnavailableError, match="not ready"):
        DataPlane(genai_runtime).model_ready("tiny", None)
