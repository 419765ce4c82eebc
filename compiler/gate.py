"""The accuracy gate: an exported graph must reproduce its source model before anything is written.

``gate`` runs the ONNX graph and the source framework (scikit-learn, PyTorch) on the same inputs,
``compare_outputs`` measures the worst error per output (padding tokens excluded), and
``run_onnx`` is the one place the compiler runs a graph in-process (variants are evaluated with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tierserve_compiler.data import Dataset, synthetic_dataset
from tierserve_compiler.errors import AccuracyGateError, require

if TYPE_CHECKING:
    from tierserve_compiler.sources import Exported


def run_onnx(path: Path, feed: dict[str, np.ndarray], threads: int = 1) -> dict[str, np.ndarray]:
    ort = require("onnxruntime", "compiler")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed), strict=True))


def mask_for(out: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray | None:
    """Padding mask for [batch, seq, ...] outputs when an input named *mask* has shape [batch, seq]."""
    for name, v in feed.items():
        if "mask" in name and v.ndim == 2 and out.ndim >= 3 and out.shape[:2] == v.shape:
            return v.astype(bool)
    return None


def compare_outputs(
    got: dict[str, np.ndarray], ref: dict[str, np.ndarray], feed: dict[str, np.ndarray], tol: float
) -> dict[str, dict[str, Any]]:
    """Per output: the worst error (absolute, relative above magnitude 1) and whether it is within ``tol``."""
    res: dict[str, dict[str, Any]] = {}
    for name, r in ref.items():
        g = got[name]
        r = np.asarray(r)
        if g.shape != r.shape:
            res[name] = {"error": float("inf"), "ok": False, "detail": f"shape {list(g.shape)} != {list(r.shape)}"}
            continue
        if not np.issubdtype(r.dtype, np.floating):
            mism = float(np.mean(g != r)) if r.size else 0.0
            res[name] = {"error": mism, "ok": mism == 0.0, "detail": "fraction of differing values"}
            continue
        m = mask_for(g, feed)
        a, b = g.astype(np.float64), r.astype(np.float64)
        if m is not None:
            a, b = a[m], b[m]
        err = float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)))) if b.size else 0.0
        res[name] = {
            "error": err,
            "ok": bool(err <= tol and np.isfinite(err)),
            "detail": "max |onnx - source| / max(1, |source|)" + (" on non-padding tokens" if m is not None else ""),
        }
    return res


def gate(exported: Exported, datasets: list[Dataset], tol: float) -> dict[str, Any]:
    """Step 1b: run the ONNX graph and the source framework on the same inputs; refuse a mismatch."""
    if exported.reference is None:
        exported.gate = {"checked": False, "reason": "no source framework to compare with (ONNX file)"}
        return exported.gate
    worst: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        feed = ds.inputs
        res = compare_outputs(run_onnx(exported.onnx_path, feed), exported.reference(feed), feed, tol)
        for k, v in res.items():
            if k not in worst or v["error"] > worst[k]["error"]:
                worst[k] = {**v, "data": ds.source}
    exported.gate = {"checked": True, "tolerance": tol, "outputs": worst, "rows": int(sum(d.rows for d in datasets))}
    bad = {k: v for k, v in worst.items() if not v["ok"]}
    if bad:
        desc = "; ".join(
            f"output {k!r}: error {v['error']:.3g} > {tol:g} ({v['detail']}, on {v['data']})" for k, v in bad.items()
        )
        raise AccuracyGateError(
            f"the exported ONNX graph runs but does not match the {exported.source_kind} model: "
            f"{desc}. Nothing was written. Check the exporter/opset, or raise the tolerance "
            "only if the difference is expected"
        )
    return exported.gate


def gate_datasets(exported: Exported, validation: Dataset | None, seed: int) -> list[Dataset]:
    sets = [d for d in (exported.example, validation) if d is not None]
    if not sets:
        sets = [synthetic_dataset(exported.inputs, 16, seed)]
    return [d.take(256) for d in sets]
