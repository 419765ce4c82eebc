"""Every variant, the --quantize modes, and the refused combinations."""

from __future__ import annotations

import pytest

from tierserve_compiler.config import make_config
from tierserve_compiler.data import sha256_file
from tierserve_compiler.errors import ConfigError, VariantError
from tierserve_compiler.pipeline import compile_model


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


def test_auto_never_selects_an_int8_slower_than_fp32(mlp_onnx, mlp_data, cfg_for):
    # Given / When an auto compile
    val, cal = mlp_data
    res = compile_model(cfg_for(mlp_onnx, "mlp", validation=val, calibration=cal))
    # Then a selected int8 is no slower than fp32 at batch 1 and at the largest batch (from the report)
    r = res.report
    sel = r["selected_variant"]

    def p50(key, b):
        return next(iter(r["variants"][key]["profile"]["threads"].values()))["batches"][b]["p50_ms"]

    if sel != "fp32":
        assert p50(sel, "1") <= p50("fp32", "1") and p50(sel, "32") <= p50("fp32", "32")
    for key, v in r["variants"].items():
        if v["decision"] == "rejected" and "slower" in v["reason"]:
            assert key.startswith("int8")


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
        ({"quantize": "dynamic", "calibration_method": "entropy"}, "only applies to static"),
        ({"quantize": "fp16", "target": "cpu"}, "use --quantize dynamic|static for CPU or --target gpu"),
        ({"quantize": "dynamic", "target": "gpu"}, "use --quantize fp16 for GPU"),
        ({"quantize": "int4"}, "use one of"),
        ({"slo_ms": -1.0}, "must be positive"),
        ({"validation": "missing.npz"}, "no such file"),
    ],
)
def test_impossible_combinations_are_refused(overrides, message, mlp_onnx, tmp_path):
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


def test_unknown_metric_is_refused(mlp_onnx, cfg_for):
    with pytest.raises(ConfigError, match="unknown --metric"):
        compile_model(cfg_for(mlp_onnx, "m", metrics=("f1",)))


def test_metric_override(mlp_onnx, cfg_for):
    # Given a regressor / When --metric cosine is asked / Then only cosine is reported
    res = compile_model(cfg_for(mlp_onnx, "m", quantize="dynamic", metrics=("cosine",)))
    assert res.report["metrics"] == ["cosine"]
    assert res.report["variants"]["int8_dynamic"]["metrics"]["cosine"] > 0.9
