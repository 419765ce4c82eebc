"""The accuracy gate: an export that computes something else is refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest

from tierserve_compiler.errors import AccuracyGateError
from tierserve_compiler.pipeline import compile_model


def test_gate_refuses_a_graph_that_computes_something_else(mlp_onnx, cfg_for, monkeypatch, tmp_path):
    # Given a source whose ONNX graph runs but differs from the framework's output (reference + 0.5)
    from tierserve_compiler import sources
    from tierserve_compiler.gate import run_onnx

    def wrong_export(path, cfg, workdir):
        exp = sources.export_onnx_file(path, cfg, workdir)
        exp.reference = lambda feed: {"y": run_onnx(path, feed)["y"] + 0.5}
        exp.source_kind = "fake"
        return exp

    monkeypatch.setitem(sources.SOURCES, "onnx", sources.SourceKind(sources._is_onnx_path, wrong_export))
    # When it is compiled / Then the gate fails naming the output and the error, and nothing is written
    with pytest.raises(AccuracyGateError, match=r"output 'y': error 0\.5") as err:
        compile_model(cfg_for(mlp_onnx, "wrong"))
    assert "Nothing was written" in str(err.value)
    models = tmp_path / "models"
    assert not (models / "manifest.json").exists() and not (models / "wrong").exists()


def test_compare_outputs_ignores_padding_tokens_and_flags_shape_and_label_mismatches():
    # Given token outputs [batch, seq, dim] that differ only where the attention mask is 0
    from tierserve_compiler.gate import compare_outputs

    mask = np.array([[1, 1, 0], [1, 0, 0]])
    ref = np.zeros((2, 3, 4), dtype=np.float32)
    got = ref.copy()
    got[mask == 0] = 5.0
    feed = {"attention_mask": mask}
    # When compared / Then the padding does not count and the detail says so
    res = compare_outputs({"h": got, "n": np.array([1, 2])}, {"h": ref, "n": np.array([1, 3])}, feed, 1e-4)
    assert res["h"]["ok"] and res["h"]["error"] == 0.0 and "non-padding" in res["h"]["detail"]
    # And integer outputs count differing values; a wrong shape is never within tolerance
    assert res["n"] == {"error": 0.5, "ok": False, "detail": "fraction of differing values"}
    bad = compare_outputs({"h": got[:, :2]}, {"h": ref}, feed, 1.0)["h"]
    assert not bad["ok"] and "shape" in bad["detail"]
