"""Cold start: each handler imports only what its path needs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = {"onnxruntime", "tritonclient", "torch", "onnx", "sklearn", "skl2onnx", "tierserve_compiler", "gevent",
         "grpc", "matplotlib"}


def _modules_after_import(module: str) -> set[str]:
    code = (f"import sys, json, {module}; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("handler", ["tierserve.handlers.router", "tierserve.handlers.cpu_inference"])
def test_importing_a_handler_pulls_in_no_heavy_library(handler):
    # When the handler module is imported cold, Then none of the heavy libraries is loaded yet
    loaded = _modules_after_import(handler)
    assert not (HEAVY & loaded), f"{handler} imports {sorted(HEAVY & loaded)} at import time"
