"""Session-scoped fixtures: tiny causal LMs, and a model store holding one compiled with the real ``tierserve compile``.

Why: the generation engine, the transports and the edge all need a compiled generative model in a store, as the
runtime sees it (a manifest entry with ``task: text-generation``, each variant an onnxruntime-genai folder whose
every file is sha256-listed). Building and compiling one takes about half a minute, so it happens once per test
session. Use it by importing the fixture into a conftest (``from tests.support.genai_store import genai_store,
tiny_llama_hf  # noqa: F401``), then::

    def test_x(genai_store):
        store = ModelStore(str(genai_store), cache_dir=tmp_path / "cache")
        mv = store.manifest.resolve("tiny-llama")          # task text-generation, variants fp32 and int4
        folder = store.fetch(mv.variants["fp32"]).parent    # og.Model(str(folder)) loads it

The source model (Hugging Face layout, for transformers' reference) is ``tiny_llama_hf``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.causal_lm import build_causal_lm

#: The model name in the ``genai_store`` fixture's manifest.
GENAI_MODEL = "tiny-llama"
#: A short validation text (three prompts), so that the accuracy gate takes seconds.
VALIDATION_TEXT = (
    "The with statement is used to wrap the execution of a block with methods defined by a context manager.\n\n"
    "The for statement is used to iterate over the elements of a sequence (such as a string, tuple or list).\n\n"
    "Café, naïve façade: 5 € — ½ 🙂 über straße. The if statement is used for conditional execution.\n"
)


def tierserve_compile(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``tierserve compile ARGS...``, the real command line (the console script's module), in a subprocess."""
    return subprocess.run([sys.executable, "-m", "tierserve_tools.cli", "compile", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def tiny_llama_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama in Hugging Face's layout (tests/support/causal_lm.py), built once."""
    return build_causal_lm(tmp_path_factory.mktemp("hf-llama") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2 in Hugging Face's layout, built once."""
    return build_causal_lm(tmp_path_factory.mktemp("hf-qwen2") / "tiny-qwen2", "qwen2")


@pytest.fixture(scope="session")
def genai_validation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("genai-validation") / "prompts.txt"
    path.write_text(VALIDATION_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def genai_store(tmp_path_factory: pytest.TempPathFactory, tiny_llama_hf: Path, genai_validation: Path) -> Path:
    """A store folder holding ``tiny-llama`` v1 (task text-generation; variants fp32 and int4, int4 selected),
    compiled from ``tiny_llama_hf`` with ``tierserve compile --quantize int4``."""
    store = tmp_path_factory.mktemp("genai-store")
    proc = tierserve_compile(str(tiny_llama_hf), "--name", GENAI_MODEL, "--quantize", "int4", "--validation",
                             str(genai_validation), "--out", str(store), "--quiet")
    assert proc.returncode == 0, f"tierserve compile failed: {proc.stderr[-3000:]}"
    return store
