"""The KV cache's size per token of a generative model: one definition for the edge's admission and batch sizing.

Why its own module: the edge (``edge/dispatch.py``: generations within the device's memory) and batch generation
(``batch/generate.py``: a part's rows within the function's memory) size the same cache; batch must not import
the edge (a Lambda artifact ships only what its handler reaches, and the edge runtime is a device's).
"""

from __future__ import annotations

import json
from pathlib import Path

from tierserve.manifest import ModelVersion


def kv_bytes_per_token(model: ModelVersion, folder: Path | None) -> int:
    """The KV cache's bytes per token of ``model``: the manifest's figure, else computed from the folder's
    ``genai_config.json`` (layers x 2 (keys, values) x KV heads x head size x 4 bytes: fp32, the CPU's KV type)."""
    spec = model.generation
    if spec is not None and spec.kv_bytes_per_token > 0:
        return spec.kv_bytes_per_token
    if folder is None:
        return 0
    try:
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        layers, heads, size = (int(decoder[k]) for k in ("num_hidden_layers", "num_key_value_heads", "head_size"))
        return layers * 2 * heads * size * 4
    except (OSError, ValueError, KeyError, TypeError):
        return 0
