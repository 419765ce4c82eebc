"""Batch generation's bench (tierserve_tools.bench.batch_generate) on the tests' tiny Llama: its prompts, its sizes
quick and full, and both ways in (``compare`` on a store, ``measure`` as the generate suite calls it) giving
every path's tokens/s and the ratios, on a part generated as one batch (a few seconds; the bench itself measures
only when run)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tierserve_tools.bench import batch_generate
from tierserve_tools.bench.harness import Context


def test_prompts_are_deterministic_between_half_and_all_of_the_longest_and_never_hold_the_pad() -> None:
    prompts = batch_generate.prompts_for(8, 64, pad=None)
    assert len(prompts) == 8 and prompts == batch_generate.prompts_for(8, 64, pad=None)
    assert all(32 <= len(p) <= 64 for p in prompts) and len({len(p) for p in prompts}) > 1
    pad = prompts[0][0]
    assert all(pad not in p for p in batch_generate.prompts_for(8, 64, pad=pad))


def test_quick_times_the_same_part_fewer_times() -> None:
    full, quick = batch_generate.SUITE_SIZES[False], batch_generate.SUITE_SIZES[True]
    assert quick[:3] == full[:3]  # prompts, longest prompt, new tokens: the figure quick or not is the same one
    assert 2 <= quick[3] < full[3] and 1 <= quick[4] <= full[4]  # a median of more than one run, after a warm-up


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.genai_models import export, write_genai_store

    root = tmp_path_factory.mktemp("batchgen")
    write_genai_store(root / "store", "tiny", export(root, "llama"), context_length=256, default_max_tokens=16,
                      max_tokens_cap=64)
    return root / "store"


@pytest.fixture
def runtime(runtime_env: pytest.MonkeyPatch, tiny_store: Path, tmp_path: Path) -> Iterator[Any]:
    from tierserve.app import build_runtime
    from tierserve.generation import engine
    from tierserve.settings import Settings

    runtime_env.setenv("TIERSERVE_METRICS", "false")
    yield build_runtime(Settings(model_store_uri=str(tiny_store), model_cache_dir=str(tmp_path / "cache"),
                                 ort_threads=1))
    engine.clear()


def test_compare_times_the_three_paths_on_the_same_tokens(runtime: Any) -> None:
    mv = runtime.store.manifest().resolve("tiny")
    result = batch_generate.compare(runtime, mv, 1, batch=3, longest=12, new=4, runs=1, warm=0)
    assert set(result["tokens_per_s"]) == {"raw_batched", "batch_part", "one_at_a_time"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    tps = result["tokens_per_s"]
    assert result["batch_vs_raw_batched"] == pytest.approx(tps["batch_part"] / tps["raw_batched"], rel=0.01)
    assert result["conditions"]["batch"] == 3 and 0 < result["conditions"]["tokens_per_part"] <= 3 * 4


def test_measure_runs_on_the_suites_model_and_returns_what_the_suite_records(
        runtime: Any, tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the generate suite's notes: its store, its cache folder and the folder it loaded the model from
    monkeypatch.setitem(batch_generate.SUITE_SIZES, True, (3, 12, 4, 1, 0))
    cache = tmp_path / "suite-cache"
    folder = runtime.store.__class__(str(tiny_store), str(cache)).fetch(
        runtime.store.manifest().resolve("tiny").cpu_artifact).parent
    ctx = Context(tmp_path, tmp_path, quick=True, out=open(os.devnull, "w"),  # noqa: SIM115
                  notes={"generate": {"store": str(tiny_store), "cache_dir": str(cache), "model": "tiny"}})
    try:
        served, raw, extra = batch_generate.measure(ctx, folder)
        # Then: batch and raw batched tokens/s, one at a time beside them, and the conditions in words
        assert served > 0 and raw > 0 and extra["one_at_a_time_tokens_per_s"] > 0
        assert "3 OpenAI batch lines" in extra["conditions"] and extra["threads"] == batch_generate.BATCH_THREADS
        # And a folder that is not the suite's model is refused rather than measured
        with pytest.raises(RuntimeError, match="not the suite's model"):
            batch_generate.measure(ctx, tmp_path / "elsewhere")
    finally:
        ctx.out.close()
