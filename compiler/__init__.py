"""tierserve_compiler: turn a model (ONNX file, scikit-learn, PyTorch) into served artifacts.

``compile_model(make_config(SOURCE, NAME, ...))`` exports to ONNX behind an accuracy gate, builds
fp32 / int8 / fp16 variants, measures them, places the model on Lambda (CPU) and/or Triton (GPU) and
writes ``DIR/NAME/VERSION/*``, ``DIR/triton/NAME`` and ``DIR/manifest.json``.

Importing this package is cheap: torch, skl2onnx, sklearn, onnxruntime and matplotlib are
imported inside the functions that need them.
"""

from __future__ import annotations

from typing import Any

from tierserve_compiler.config import (
    PRESETS,
    Budget,
    CompileConfig,
    LambdaLimits,
    ProfileConfig,
    make_config,
)
from tierserve_compiler.errors import CompilerError

__all__ = [
    "PRESETS",
    "Budget",
    "CompileConfig",
    "CompileResult",
    "CompilerError",
    "LambdaLimits",
    "ProfileConfig",
    "compile_model",
    "make_config",
]


def __getattr__(name: str) -> Any:  # lazy: the pipeline pulls numpy and friends
    if name in ("compile_model", "CompileResult"):
        from tierserve_compiler import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
