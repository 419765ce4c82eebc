"""Issue 2 acceptance: a compiled scikit-learn pipeline, served through RouterFunction, agrees with
scikit-learn's own predictions on held-out rows; the store the compiler wrote is what the router loads."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import load_event
from tierserve.handlers import router


def test_breast_cancer_pipeline_served_through_the_router_agrees_with_sklearn(runtime_env, tmp_path,
                                                                              lambda_context):
    # Given StandardScaler + LogisticRegression on load_breast_cancer, compiled with --quantize auto
    from tierserve_compiler.config import make_config
    from tierserve_compiler.demo import breast_cancer_classifier, write_breast_cancer_validation
    from tierserve_compiler.pipeline import compile_model

    val = write_breast_cancer_validation(tmp_path / "val.npz")
    cfg = make_config("tierserve_compiler.demo:breast_cancer_classifier", "breast-cancer", preset="test",
                      version="1", out_dir=tmp_path / "models", validation=val, quantize="auto")
    result = compile_model(cfg)
    manifest = json.loads((tmp_path / "models" / "manifest.json").read_text())
    entry = manifest["models"]["breast-cancer"]["versions"]["1"]
    assert entry["selected_variant"] in entry["variants"]
    # When every held-out row is sent through the router as one protocol request
    runtime_env.setenv("MODEL_STORE_URI", str(tmp_path / "models"))
    runtime_env.setenv("CPU_BACKEND", "inprocess")
    data = np.load(val)
    x = data["input"].astype(np.float32)
    event = load_event("http_infer.json")
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/v2/models/breast-cancer/infer"
    event["body"] = json.dumps({"id": "bc", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                                        "data": x.ravel().tolist()}],
                                "outputs": [{"name": "label"}]})
    resp = router.lambda_handler(event, lambda_context)
    # Then the served labels agree with scikit-learn's own predictions on >= 99.5% of the rows
    assert resp["statusCode"] == 200, resp["body"]
    assert resp["headers"]["x-served-by"] == "cpu"
    served = np.asarray(json.loads(resp["body"])["outputs"][0]["data"])
    expected = breast_cancer_classifier().predict(x)
    agreement = float((served == expected).mean())
    assert len(served) == len(x) >= 100
    assert agreement >= 0.995, f"agreement {agreement:.4f} with sklearn on {len(x)} held-out rows"
    assert result.model_version.cpu_artifact.sha256 == entry["variants"][entry.get("cpu_variant") or
                                                                         entry["selected_variant"]]["sha256"]
