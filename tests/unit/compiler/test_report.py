"""report.json, report.md and report.png."""

from __future__ import annotations

import json
from pathlib import Path

from tierserve_compiler.pipeline import compile_model


def test_report_files_exist(mlp_onnx, cfg_for, tmp_path):
    # Given / When a compile
    res = compile_model(cfg_for(mlp_onnx, "r", quantize="none"))
    # Then report.json, report.md and a PNG are written
    for f in ("report.json", "report.md", "report.png"):
        assert (res.version_dir / f).stat().st_size > 0
    assert json.loads((res.version_dir / "report.json").read_text())["name"] == "r"
    assert (res.version_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "Placement rules" in Path(res.version_dir / "report.md").read_text()


def _report() -> dict:
    profile = {"threads": {"1": {"batches": {b: {"p50_ms": float(b)} for b in ("1", "8", "32")}}}}
    variants = {k: {"size_bytes": s, "profile": profile, "metrics": {"cosine": c}}
                for k, s, c in (("fp32", 4 << 20, 1.0), ("int8_dynamic", 1 << 20, 0.993), ("fp16", 2 << 20, 0.99999))}
    return {"name": "r", "version": "1", "selected_variant": "int8_dynamic", "metrics": ["cosine", "max_abs"],
            "variants": variants}


def test_the_chart_gives_each_colour_one_meaning_and_zooms_the_cosine_axis_to_the_data() -> None:
    from tierserve_compiler.report import chart_figure

    # Given variants whose cosine to fp32 is 1, 0.99999 and 0.993, one of them selected
    fig = chart_figure(_report())
    size, latency, accuracy = fig.axes[:3]
    # Then the colours that say "selected" / "not selected" are never the colours of a batch size
    selection = {tuple(p.get_facecolor()) for ax in (size, accuracy) for p in ax.patches}
    batches = {tuple(p.get_facecolor()) for p in latency.patches}
    assert len(selection) == 2 and len(batches) == 3 and not selection & batches
    # And each panel says what its colours mean
    assert all(ax.get_legend() is not None for ax in (size, latency, accuracy))
    # And the accuracy panel shows the distance to fp32 (1 - cosine) on a log axis: 0.993 and 0.99999 are
    # two decades apart, not two bars of the same height on a 0-1 axis
    assert accuracy.get_yscale() == "log" and "1 - cosine" in accuracy.get_ylabel()
    heights = {round(p.get_height(), 6) for p in accuracy.patches}
    assert {0.007, 0.00001} <= heights
