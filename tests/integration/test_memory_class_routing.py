"""The router invokes each model's CPU memory class, through `tierserve serve` (real workers, boto3 Invoke):
a model the compiler recommended 3,538 MB for runs in CpuInferenceFunction3538 (2 vCPUs, its environment from
template.yaml), a 1,769 MB one in CpuInferenceFunction."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import replace

import numpy as np
import pytest

from tests.support.fakes import X_SPEC, Y_SPEC, json_body, rows_of
from tests.support.models import linear_onnx, write_model
from tierserve.manifest import Manifest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from tierserve_tools.serve import LocalStack

    root = tmp_path_factory.mktemp("models")
    weights = {}
    for name, memory, seed in (("small", 1769, 1), ("wide", 3538, 2)):
        data, w, b = linear_onnx(seed=seed)
        mv = write_model(root, name, "1", data, (X_SPEC,), (Y_SPEC,))
        manifest = Manifest.loads((root / "manifest.json").read_text())
        (root / "manifest.json").write_text(manifest.with_version(replace(mv, cpu={"memory_mb": memory})).dumps())
        weights[name] = (w, b)
    with LocalStack(root, port=0, triton=False, batch=False, s3=False, workdir=tmp_path_factory.mktemp("serve"),
                    cpu_workers=1) as s:
        s.weights = weights
        yield s


def _infer(stack, model: str, x: np.ndarray) -> dict:
    req = urllib.request.Request(f"{stack.url}/v2/models/{model}/infer", data=json_body(x), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["x-served-by"] == "cpu"
        return json.loads(resp.read())


def _served(stack, function: str) -> list[dict]:
    """The function's structured 'routed' log lines (Powertools adds the function's name and memory)."""
    path = stack.workdir / f"{function}.log"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")] if path.is_file() else []
    return [x for x in lines if x.get("message") == "routed"]


def test_each_model_runs_in_its_memory_class(stack):
    env = stack.function_env("RouterFunction")
    assert env["CPU_FUNCTIONS"].startswith("1769=CpuInferenceFunction,3538=CpuInferenceFunction3538")
    for name in ("small", "wide"):
        x = rows_of(3, seed=5)
        body = _infer(stack, name, x)
        w, b = stack.weights[name]
        np.testing.assert_allclose(np.asarray(body["outputs"][0]["data"]).reshape(3, 3), x @ w + b,
                                   rtol=1e-4, atol=1e-5)
    small, wide = _served(stack, "CpuInferenceFunction"), _served(stack, "CpuInferenceFunction3538")
    assert [x["model"] for x in small] == ["small"] and [x["model"] for x in wide] == ["wide"]
    assert str(wide[0]["function_memory_size"]) == "3538"
