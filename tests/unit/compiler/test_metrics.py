"""Metrics registry: task detection, values, and the --metric override."""

from __future__ import annotations

import numpy as np
import pytest

from tierserve.manifest import TensorSpec
from tierserve_compiler.errors import ConfigError
from tierserve_compiler.metrics import METRICS, detect_task, evaluate_outputs
from tierserve_compiler.pipeline import compile_model


def test_metrics_by_task():
    # Given classifier outputs where one of four labels differs
    outs = [TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 3))]
    task = detect_task(outs)
    ref = {"label": np.array([0, 1, 2, 1]), "probabilities": np.eye(3)[[0, 1, 2, 1]]}
    got = {"label": np.array([0, 1, 2, 2]), "probabilities": np.eye(3)[[0, 1, 2, 2]]}
    # When evaluated / Then agreement and accuracy follow
    vals = evaluate_outputs(ref, got, task, ("label_agreement", "accuracy", "cosine"), np.array([0, 1, 2, 2]))
    assert task.kind == "classifier" and vals["label_agreement"] == 0.75 and vals["accuracy"] == 1.0
    assert detect_task([TensorSpec("sentence_embedding", "FP32", (-1, 4))]).kind == "embedding"
    assert detect_task([TensorSpec("y", "FP32", (-1, 1))]).kind == "regressor"
    assert set(METRICS) == {"label_agreement", "accuracy", "max_abs", "mean_rel", "cosine"}


def test_unknown_metric_is_refused(mlp_onnx, cfg_for):
    with pytest.raises(ConfigError, match="unknown --metric"):
        compile_model(cfg_for(mlp_onnx, "m", metrics=("f1",)))


def test_metric_override(mlp_onnx, cfg_for):
    # Given a regressor / When --metric cosine is asked / Then only cosine is reported
    res = compile_model(cfg_for(mlp_onnx, "m", quantize="dynamic", metrics=("cosine",)))
    assert res.report["metrics"] == ["cosine"]
    assert res.report["variants"]["int8_dynamic"]["metrics"]["cosine"] > 0.9
