"""The variant registry and every builder: the --quantize modes and the refused combinations."""

from __future__ import annotations

import pytest

from tierserve_compiler.config import make_config
from tierserve_compiler.data import sha256_file
from tierserve_compiler.errors import ConfigError, VariantError
from tierserve_compiler.pipeline import compile_model
from tierserve_compiler.variants import (
    MODE_VARIANTS,
    QUANTIZE_MODES,
    REFERENCE,
    VARIANTS,
    VariantSpec,
    build_int8_dynamic,
    mode_variants,
    quantize_modes,
    variants_for,
)


def test_modes_and_option_rules_are_derived_from_the_records():
    # Given the registry / Then every mode builds fp32 first plus the variants whose record names that mode
    inference = variants_for("inference")
    assert quantize_modes("inference") == ("auto", "none", "dynamic", "static", "fp16")
    assert quantize_modes("text-generation") == ("auto", "none", "int4", "int8")
    assert QUANTIZE_MODES == ("auto", "none", "dynamic", "static", "fp16", "int4", "int8")
    assert MODE_VARIANTS["none"] == (REFERENCE,) and MODE_VARIANTS["auto"] == tuple(inference)
    for key, spec in inference.items():
        if key != REFERENCE:
            assert MODE_VARIANTS[spec.mode] == (REFERENCE, key)
    # And the records say which tier serves what, and what needs calibration
    assert [k for k, s in inference.items() if "cpu" not in s.tiers] == ["fp16"]
    assert [k for k, s in VARIANTS.items() if s.needs_calibration] == ["int8_static"]


def test_causal_lm_variants_are_records_of_their_task_measured_in_tokens():
    # Given the registry / Then a causal LM's variants are onnxruntime-genai folders keyed like the manifest's
    gen = variants_for("text-generation")
    assert list(gen) == ["fp32", "int4", "int8"]
    assert {s.filename for s in gen.values()} == {"fp32/model.onnx", "int4/model.onnx", "int8/model.onnx"}
    assert all(s.task == "text-generation" and s.unit == "tokens/s" for s in gen.values())
    assert all(s.task == "inference" and s.unit == "ms" for s in variants_for("inference").values())
    # And each --quantize mode builds fp32 plus its own
    assert mode_variants("int4", "text-generation") == ("fp32", "int4")
    assert mode_variants("auto", "text-generation") == ("fp32", "int4", "int8")
    # And the quantized ones carry named budgets, fp32 the exact one
    assert gen["fp32"].budget.min_greedy_match == 1.0
    assert gen["int4"].budget.min_top1_agreement == 0.90 and gen["int8"].budget.min_top1_agreement == 0.97


def test_a_variant_added_to_the_registry_alone_is_built_evaluated_and_selectable(mlp_onnx, cfg_for, monkeypatch):
    # Given a new CPU variant registered only in variants.VARIANTS (here: dynamic int8, per-tensor)
    def build(src, dst, cfg, data):
        info = build_int8_dynamic(src, dst, cfg, data)
        return {**info, "method": "test variant"}

    spec = VariantSpec(build, "int8_tensor.onnx", ("cpu",), "per-tensor", per_channel=False)
    monkeypatch.setitem(VARIANTS, "int8_tensor", spec)
    # When its mode is asked for
    res = compile_model(cfg_for(mlp_onnx, "new", quantize="per-tensor"))
    # Then it is built next to fp32, published under its file name and selected
    mv = res.model_version
    assert set(mv.variants) == {"fp32", "int8_tensor"} and mv.selected_variant == "int8_tensor"
    assert mv.variants["int8_tensor"].path == "new/1/int8_tensor.onnx"
    assert res.report["variants"]["int8_tensor"]["build"]["method"] == "test variant"


def test_auto_builds_every_variant_with_hash_and_size(mlp_onnx, mlp_data, cfg_for, tmp_path):
    # Given a quantizable MLP with validation and calibration data
    val, cal = mlp_data
    # When it is compiled with --quantize auto
    res = compile_model(cfg_for(mlp_onnx, "mlp", validation=val, calibration=cal))
    # Then all four variants exist, with sha256 and size matching the files on disk
    mv = res.model_version
    assert set(mv.variants) == {"fp32", "int8_dynamic", "int8_static", "fp16"}
    for key, var in mv.variants.items():
        path = tmp_path / "models" / var.path
        assert path.is_file(), key
        assert var.sha256 == sha256_file(path) and var.size_bytes == path.stat().st_size
    assert mv.variants["fp32"].path == "mlp/1/model.onnx"
    assert mv.variants["int8_static"].path == "mlp/1/int8_static.onnx"
    # And every variant has a decision with a reason, and metrics against fp32
    for key, v in res.report["variants"].items():
        assert v["decision"] in ("selected", "kept", "rejected") and v["reason"], key
        assert v["metrics"]["mean_rel"] is not None
    assert res.report["variants"]["int8_static"]["build"]["calibration_method"] == "minmax"
    # And fp16 is never what the CPU tier serves
    assert mv.selected_variant != "fp16" and (mv.cpu_variant or mv.selected_variant) != "fp16"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("none", {"fp32"}),
        ("dynamic", {"fp32", "int8_dynamic"}),
        ("fp16", {"fp32", "fp16"}),
    ],
)
def test_explicit_modes_build_that_variant(mode, expected, mlp_onnx, cfg_for):
    # Given / When an explicit --quantize mode
    res = compile_model(cfg_for(mlp_onnx, f"m{mode}", quantize=mode))
    # Then exactly fp32 plus that variant, and it is the selected one
    assert set(res.model_version.variants) == expected
    if mode != "none":
        assert res.model_version.selected_variant == sorted(expected - {"fp32"})[0]


def test_static_with_calibration_methods(mlp_onnx, mlp_data, cfg_for):
    # Given calibration data
    val, cal = mlp_data
    # When static quantization uses entropy calibration, per-tensor
    res = compile_model(
        cfg_for(
            mlp_onnx,
            "st",
            validation=val,
            calibration=cal,
            quantize="static",
            calibration_method="entropy",
            per_channel=False,
        )
    )
    # Then the QDQ variant was built with that method and selected
    build = res.report["variants"]["int8_static"]["build"]
    assert build["calibration_method"] == "entropy" and build["per_channel"] is False
    assert res.model_version.selected_variant == "int8_static"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"quantize": "static"}, "pass --calibration or use --quantize dynamic"),
        ({"quantize": "none", "per_channel": True}, "drop --per-channel"),
        ({"quantize": "fp16", "per_channel": True}, "drop --per-channel"),
        ({"quantize": "dynamic", "calibration_method": "entropy"}, "only applies to calibrated variants"),
        ({"quantize": "fp16", "target": "cpu"}, "use --quantize dynamic|static for CPU or --target gpu"),
        ({"quantize": "dynamic", "target": "gpu"}, "use --quantize fp16 for GPU"),
        ({"quantize": "static", "target": "gpu"}, "use --quantize fp16 for GPU or --target cpu|both"),
        ({"quantize": "int4"}, "use one of"),
    ],
)
def test_combinations_the_variant_records_contradict_are_refused(overrides, message, mlp_onnx, tmp_path):
    # Given an impossible combination of options
    cfg = make_config(str(mlp_onnx), "m", preset="test", out_dir=tmp_path / "models", **overrides)
    # When it is compiled / Then it is refused with an actionable message, before any work
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        compile_model(cfg)
    assert not (tmp_path / "models" / "m").exists()


def test_explicit_int8_on_a_graph_without_weights_is_refused(tmp_path, cfg_for):
    # Given a graph with nothing to quantize (x * 2)
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    path = tmp_path / "mul.onnx"
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    # When --quantize dynamic is asked for / Then the error says so and what to do
    with pytest.raises(VariantError, match=r"nothing was quantized.*use --quantize none"):
        compile_model(cfg_for(path, "mul", quantize="dynamic"))
