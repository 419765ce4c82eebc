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
