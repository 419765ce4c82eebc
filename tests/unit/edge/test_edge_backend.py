"""EdgeBackend: onnxruntime on the versions the device holds, sessions bounded in memory (LRU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.edge import EDGE
from tests.support.fakes import json_call, rows_of, write_linear
from tierserve.edge.backend import EdgeBackend
from tierserve.edge.store import EdgeStore, session_estimate
from tierserve.errors import BackendUnavailableError


def test_it_runs_the_held_edge_variant_and_refuses_what_is_not_held(store_dir: Path, tmp_path: Path) -> None:
    store = EdgeStore(str(store_dir), tmp_path / "cache")
    store.sync()
    backend = EdgeBackend(store, threads=1, max_memory_bytes=64 << 20)
    # When the held model runs, Then its outputs are the model's
    mv = store.manifest().resolve("lin")
    reply = backend.infer(mv, json_call(3), 1.0)
    out = reply.arrays()["y"]
    assert out.shape == (3, 3) and backend.ready(mv) and backend.tier == "edge"
    # And a model the device does not hold is refused (the dispatcher forwards it instead)
    other = store.manifest().resolve("cpu-only")
    assert not backend.ready(other)
    with pytest.raises(BackendUnavailableError, match="not held"):
        backend.infer(other, json_call(1), 1.0)


def test_sessions_are_evicted_least_recently_used_within_the_memory_budget(tmp_path: Path) -> None:
    root = tmp_path / "store"
    weights = {name: write_linear(root, name, "1", seed=i, targets=EDGE)[1:] for i, name in enumerate("abc")}
    store = EdgeStore(str(root), tmp_path / "cache")
    store.sync()
    one = session_estimate(store.held(store.manifest().resolve("a")).size_bytes)
    # Given a budget for two sessions
    backend = EdgeBackend(store, threads=1, max_memory_bytes=2 * one)
    x = rows_of(2)
    for name in "abca":  # a, b, then c evicts a (least recent), then a evicts b
        w, b = weights[name]
        out = backend.infer(store.manifest().resolve(name), json_call(2), 1.0).arrays()["y"]
        np.testing.assert_allclose(out, x @ w + b, rtol=1e-5, atol=1e-5)
    # Then at most two sessions are loaded, the most recent ones, within the budget
    loaded = {store.held(store.manifest().resolve(n)).sha256: n for n in "abc"}
    assert [loaded[s] for s in backend.pool.loaded()] == ["c", "a"]
    assert backend.pool.evictions == 2 and backend.pool.used_bytes <= 2 * one


def test_versions_sharing_model_onnx_run_each_with_their_own_weights(tmp_path: Path) -> None:
    # Given v1 (default) and v2 (canary) held: the same model.onnx, other external weights (issue 17)
    from tests.support.models import linear_onnx
    from tests.support.variant_pairs import write_pair

    write_pair(tmp_path / "store", "pair", "external")
    store = EdgeStore(str(tmp_path / "store"), tmp_path / "cache")
    assert store.sync().refused == {}
    backend = EdgeBackend(store, threads=1, max_memory_bytes=64 << 20)
    # When each is run, in turn, on the same rows
    for v in ("1", "2", "1"):
        out = backend.infer(store.manifest().resolve("pair", v), json_call(2), 1.0).arrays()["y"]
        # Then each answers with its own weights (its own session in the pool), not the other's
        _, w, b = linear_onnx(seed=int(v))
        np.testing.assert_allclose(out, rows_of(2) @ w + b, rtol=1e-5, atol=1e-5)
    assert len(backend.pool.loaded()) == 2
