"""make_config, presets, option checks that do not depend on the variants, and prices."""

from __future__ import annotations

import pytest

from tierserve_compiler import PRESETS, make_config
from tierserve_compiler.config import load_prices
from tierserve_compiler.errors import ConfigError
from tierserve_compiler.pipeline import compile_model


def test_presets_and_unknown_fields():
    assert {"default", "fast", "test", "embedding"} <= set(PRESETS)
    assert make_config("a.onnx", "a", preset="embedding", quantize="none").task == "embedding"
    with pytest.raises(ConfigError, match="unknown preset"):
        make_config("a.onnx", "a", preset="nope")
    with pytest.raises(ConfigError, match="unknown config fields"):
        make_config("a.onnx", "a", colour="red")


def test_prices_file_is_editable(tmp_path):
    # Given a prices file overriding one price / Then the others keep their documented defaults
    f = tmp_path / "p.json"
    f.write_text('{"gpu_hourly_usd": 0.5}')
    prices = load_prices(f)
    assert prices["gpu_hourly_usd"] == 0.5 and prices["lambda_request_usd"] == 2e-7


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"slo_ms": -1.0}, "must be positive"),
        ({"slo_total_ms": 0.0}, "--slo-total-ms must be positive"),
        ({"validation": "missing.npz"}, "no such file"),
        ({"target": "tpu"}, "use one of cpu, gpu, both"),
        ({"calibration_method": "histogram"}, "use one of minmax, entropy, percentile"),
    ],
)
def test_impossible_options_are_refused_before_any_work(overrides, message, mlp_onnx, tmp_path):
    # Given an impossible option
    cfg = make_config(str(mlp_onnx), "m", preset="test", out_dir=tmp_path / "models", **overrides)
    # When it is compiled / Then it is refused with an actionable message, and nothing is written
    with pytest.raises(ConfigError, match=message):
        compile_model(cfg)
    assert not (tmp_path / "models" / "m").exists()


def test_the_placement_limits_are_the_functions_template_yaml_deploys():
    # Given template.yaml's CPU class functions and its CpuEphemeralStorageMb parameter
    from pathlib import Path

    from tierserve_compiler.config import LambdaLimits
    from tierserve_tools.sam import load_template

    template = load_template(Path(__file__).resolve().parents[3] / "template.yaml")
    cpu = {name: r["Properties"] for name, r in template["Resources"].items()
           if name.startswith("CpuInferenceFunction") and r["Type"] == "AWS::Serverless::Function"}
    lim = LambdaLimits()
    # Then the compiler places models against those functions: their memory classes, timeout and /tmp bound
    assert sorted(int(p["MemorySize"]) for p in cpu.values()) == list(lim.memory_classes_mb)
    assert {float(p["Timeout"]) for p in cpu.values()} == {lim.timeout_s}
    assert float(template["Parameters"]["CpuEphemeralStorageMb"]["MaxValue"]) == lim.tmp_mb
    assert lim.max_memory_mb == max(lim.memory_classes_mb)
