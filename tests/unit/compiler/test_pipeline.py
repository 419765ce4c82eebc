"""compile_model's selection step: what the CPU and GPU tiers serve, and why."""

from __future__ import annotations

from tierserve_compiler.pipeline import compile_model


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


def _built(key: str, p50: float, within: bool = True):
    from pathlib import Path

    from tierserve_compiler.pipeline import BuiltVariant

    batches = {str(b): {"p50_ms": p50 * b, "p95_ms": p50 * b} for b in (1, 8, 32)}
    prof = {"threads": {"1": {"batches": batches}}}
    return BuiltVariant(key, Path(f"{key}.onnx"), profile=prof, within_budget=within, budget_reasons=["r"])


def test_select_reads_the_records_gpu_only_variants_never_serve_the_cpu():
    # Given fp16 that is the fastest on paper, int8_dynamic faster than fp32 and int8_static over budget
    from tierserve_compiler.config import make_config
    from tierserve_compiler.pipeline import select

    vs = [_built("fp32", 2.0), _built("int8_dynamic", 1.0), _built("int8_static", 0.5, within=False),
          _built("fp16", 0.1)]  # fmt: skip
    # When auto selects
    sel = select(vs, make_config("m.onnx", "m", preset="test"))
    # Then the CPU serves the fastest CPU variant within budget and the GPU the GPU-only variant
    assert sel == ("int8_dynamic", "int8_dynamic", "fp16")
    assert {v.key: v.decision for v in vs} == {
        "fp32": "kept", "int8_dynamic": "selected", "int8_static": "rejected", "fp16": "kept"
    }  # fmt: skip
    # When fp16 is asked explicitly / Then it is selected, the CPU tier falls back to fp32
    vs = [_built("fp32", 2.0), _built("fp16", 0.1, within=False)]
    assert select(vs, make_config("m.onnx", "m", preset="test", quantize="fp16")) == ("fp16", "fp32", "fp16")
    # When fp16 is over budget in auto / Then the GPU tier serves fp32
    vs = [_built("fp32", 2.0), _built("fp16", 0.1, within=False)]
    assert select(vs, make_config("m.onnx", "m", preset="test")).triton == "fp32"
