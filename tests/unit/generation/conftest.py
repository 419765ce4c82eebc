"""Fixtures of the generation tests: the tiny Llama and Qwen2 exports (built once per session), a store around
one of them, and a runtime over that store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.genai_models import TinyLM, export, write_genai_store


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyLM]:
    root = tmp_path_factory.mktemp("tiny-lms")
    return {family: export(root, family) for family in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def llama(tiny_lms: dict[str, TinyLM]) -> TinyLM:
    return tiny_lms["llama"]


@pytest.fixture
def genai_runtime(runtime_env: pytest.MonkeyPatch, tmp_path: Path, llama: TinyLM) -> Iterator[object]:
    """A runtime (in-process CPU tier, 1 thread) over a store holding 'tiny' v1 (the Llama) and 'plain' v1 (the
    same model without a chat template)."""
    from tierserve.app import build_runtime
    from tierserve.generation import engine, service
    from tierserve.settings import Settings

    root = tmp_path / "store"
    write_genai_store(root, "tiny", llama, max_concurrency=2, context_length=256, default_max_tokens=16,
                      max_tokens_cap=200)
    write_genai_store(root, "plain", llama, drop=("chat_template.jinja",))
    runtime_env.setenv("TIERSERVE_METRICS", "false")
    service.clear()  # the tokenizers and templates of earlier tests' stores (same digests, other caches)
    yield build_runtime(Settings(model_store_uri=str(root), model_cache_dir=str(tmp_path / "cache"), ort_threads=1))
    engine.clear()
    service.clear()
