"""Tiny, seeded models and helpers for the compiler tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from compiler_testlib import make_mlp_onnx, save_npz

from tierserve_compiler import make_config


@pytest.fixture
def mlp_onnx(tmp_path: Path) -> Path:
    return make_mlp_onnx(tmp_path / "mlp.onnx")


@pytest.fixture
def mlp_data(tmp_path: Path) -> tuple[Path, Path]:
    """(validation.npz, calibration.npz) for the tiny MLP, seeded."""
    rng = np.random.default_rng(1)
    val = save_npz(tmp_path / "val.npz", x=rng.standard_normal((64, 16)).astype(np.float32))
    cal = save_npz(tmp_path / "cal.npz", x=rng.standard_normal((64, 16)).astype(np.float32))
    return val, cal


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write ``tiny_user_models.py`` (given source text) into an importable folder; returns its name."""
    counter = {"n": 0}

    def write(source: str) -> str:
        counter["n"] += 1
        stem = "".join(c if c.isalnum() else "_" for c in tmp_path.name)
        name = f"tiny_user_models_{stem}_{counter['n']}"  # unique per test: modules are cached
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        return name

    return write


@pytest.fixture
def cfg_for(tmp_path: Path):
    """A test-preset config writing under tmp_path/models."""

    def make(source: str, name: str = "m", **kw):
        kw.setdefault("out_dir", tmp_path / "models")
        return make_config(str(source), name, preset="test", **kw)

    return make


# Causal LMs (issue 17): tiny models and a compiled store, once per session.
from tests.support.genai_store import genai_store, genai_validation, tiny_llama_hf, tiny_qwen2_hf  # noqa: E402, F401
