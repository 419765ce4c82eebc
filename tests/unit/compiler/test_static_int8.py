"""Static int8: sensitive MatMuls are found by measuring, kept float until the outputs agree with fp32."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tierserve_compiler.data import Dataset
from tierserve_compiler.static_int8 import DEFAULT, output_agreement, quantize_static_recipe, recipe_for, sensitivity


def outlier_mlp(path: Path, seed: int = 0) -> Path:
    """x -> MatMul(W1) "plain" -> * gain (channel 0 x 300: an outlier channel) -> MatMul(W2) "outlier" -> y."""
    rng = np.random.default_rng(seed)
    gain = np.ones(32, dtype=np.float32)
    gain[0] = 300.0
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(gain, "gain"),
        numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32) * 0.3, "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="plain"),
        helper.make_node("Mul", ["h", "gain"], ["hg"]),
        helper.make_node("MatMul", ["hg", "w2"], ["y"], name="outlier"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def data(seed: int = 1) -> Dataset:
    return Dataset({"x": np.random.default_rng(seed).standard_normal((64, 16)).astype(np.float32)})


def test_sensitivity_ranks_the_matmul_fed_by_an_outlier_channel_first(tmp_path):
    # Given a two-MatMul model whose second MatMul reads an activation with one outlier channel
    model = outlier_mlp(tmp_path / "m.onnx")
    # When each weight MatMul's own quantization error is measured on the calibration data
    ranked = sensitivity(model, data(), DEFAULT)
    # Then the outlier-fed MatMul comes first, with about twice the error
    assert [name for name, _ in ranked] == ["outlier", "plain"]
    assert ranked[0][1] > 1.5 * ranked[1][1]


def test_sensitive_matmuls_are_kept_float_until_the_outputs_agree(tmp_path):
    # Given the outlier model and a recipe that may keep half of the weight MatMuls float
    model = outlier_mlp(tmp_path / "m.onnx")
    recipe = replace(DEFAULT, max_excluded=0.5, target_cosine=0.99999)
    # When it is quantized with a target agreement that full quantization misses
    everything = quantize_static_recipe(model, tmp_path / "all.onnx", data(), replace(recipe, target_cosine=None))
    info = quantize_static_recipe(model, tmp_path / "q.onnx", data(), recipe)
    # Then the outlier-fed MatMul is kept float, the other one is quantized, and the outputs agree better
    assert everything["kept_float"] == [] and info["kept_float"] == ["outlier"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert "QuantizeLinear" in ops and "MatMul" in ops
    held_out = Dataset({"x": np.random.default_rng(7).standard_normal((32, 16)).astype(np.float32)})
    assert output_agreement(model, tmp_path / "q.onnx", held_out) > output_agreement(
        model, tmp_path / "all.onnx", held_out
    )
    assert info["calibration_agreement_cosine"] >= everything["calibration_agreement_cosine"]


def test_recipe_for_applies_the_options_and_the_budget():
    r = recipe_for(False, "entropy", 0.98)
    assert (r.per_channel, r.calibration, r.target_cosine) == (False, "entropy", 0.98)
    assert recipe_for(None, None, 0.99) == replace(DEFAULT, target_cosine=0.99)
