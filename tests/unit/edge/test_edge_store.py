"""EdgeStore: what a device holds after each sync, offline, after a restart, and within its budgets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.edge import EDGE, set_canary, set_default
from tests.support.fakes import write_linear
from tierserve.edge.store import STATE_FILE, EdgeStore
from tierserve.errors import BackendUnavailableError

MB = 1024 * 1024


def held(store: EdgeStore) -> set[str]:
    return {f"{n}/{v}" for n, v in store.snapshot.held}


def test_a_sync_holds_the_edge_placed_default_and_lists_every_model(store_dir: Path, tmp_path: Path) -> None:
    # Given a store with one model on the edge and two that are not
    store = EdgeStore(str(store_dir), tmp_path / "cache")
    # Before any sync the device has nothing to serve, and says why with a Retry-After
    with pytest.raises(BackendUnavailableError, match="has not synced") as err:
        store.manifest()
    assert err.value.retry_after_s
    # When it syncs
    status = store.sync()
    # Then it holds the edge model only, verified, and knows every model (the rest is forwarded)
    assert status.last_error is None and status.refused == {}
    assert held(store) == {"lin/1"}
    assert set(store.manifest().models) == {"lin", "cpu-only", "gpu-only"}
    assert store.held(store.manifest().resolve("cpu-only")) is None
    h = store.held(store.manifest().resolve("lin"))
    assert h is not None and h.path.read_bytes() == (store_dir / "lin/1/model.onnx").read_bytes()


def test_a_promotion_is_swapped_in_and_a_tampered_version_is_refused(store_dir: Path, tmp_path: Path) -> None:
    store = EdgeStore(str(store_dir), tmp_path / "cache")
    store.sync()
    # Given v2 published and made the default
    write_linear(store_dir, "lin", "2", seed=4, targets=EDGE)
    store.sync()
    # Then the next sync holds it and serves it by default; v1 stays listed for requests that name it
    assert store.manifest().resolve("lin").version == "2" and held(store) == {"lin/2"}
    assert store.manifest().resolve("lin", "1").version == "1"
    # Given v3 whose artifact was altered after it was published
    write_linear(store_dir, "lin", "3", seed=5, targets=EDGE)
    (store_dir / "lin/3/model.onnx").write_bytes(b"tampered")
    status = store.sync()
    # Then v3 is refused with the reason, and v2 keeps serving as the default
    assert list(status.refused) == ["lin/3"] and "sha256" in status.refused["lin/3"]
    assert store.manifest().resolve("lin").version == "2" and held(store) == {"lin/2"}
    # And once v3 is fixed in the store, the next sync takes it
    write_linear(store_dir, "lin", "3", seed=5, targets=EDGE)
    assert store.sync().refused == {} and store.manifest().resolve("lin").version == "3"


def test_the_canary_is_held_beside_the_default_and_dropped_when_refused(store_dir: Path, tmp_path: Path) -> None:
    store = EdgeStore(str(store_dir), tmp_path / "cache")
    write_linear(store_dir, "lin", "2", seed=4, targets=EDGE)
    set_default(store_dir, "lin", "1")
    set_canary(store_dir, "lin", "2", 25)
    store.sync()
    entry = store.manifest().models["lin"]
    assert held(store) == {"lin/1", "lin/2"} and entry.default_version == "1" and entry.canary["version"] == "2"
    # Given the canary's artifact tampered with (and no longer cached), When the device syncs again
    shutil.rmtree(tmp_path / "cache")
    store._verified.clear()
    (store_dir / "lin/2/model.onnx").write_bytes(b"tampered")
    store.sync()
    # Then the canary is dropped (its share goes to the default) and the default keeps serving
    assert store.manifest().models["lin"].canary is None and held(store) == {"lin/1"}


def test_offline_the_device_serves_what_it_holds(store_dir: Path, tmp_path: Path) -> None:
    store = EdgeStore(str(store_dir), tmp_path / "cache")
    store.sync()
    before = store.snapshot
    # Given the store becomes unreachable
    (store_dir / "manifest.json").rename(store_dir / "away.json")
    status = store.sync()
    # Then the sync fails, says why, and nothing held changes
    assert status.last_error and "no manifest" in status.last_error and status.failures == 1
    assert status.state(True) == "offline" and store.snapshot is before


def test_a_restart_offline_serves_the_saved_state_after_re_verifying_it(store_dir: Path, tmp_path: Path) -> None:
    EdgeStore(str(store_dir), tmp_path / "cache").sync()
    assert (tmp_path / "cache" / STATE_FILE).is_file()
    # Given the device restarts while the store is unreachable
    shutil.rmtree(store_dir)
    restarted = EdgeStore(str(store_dir), tmp_path / "cache")
    # Then it serves what it held, from the saved view
    assert restarted.load_state() and held(restarted) == {"lin/1"}
    assert restarted.manifest().resolve("lin").version == "1"
    # Given the cached file was altered while the device was off
    next(p for p in (tmp_path / "cache").glob("*/model.onnx")).write_bytes(b"tampered")
    again = EdgeStore(str(store_dir), tmp_path / "cache")
    # Then the saved view loads but the tampered version is not held (it is refused, with the reason)
    assert again.load_state() and held(again) == set() and "sha256" in again.status.refused["lin/1"]
    # And a device with no saved state at all has nothing to serve yet
    assert not EdgeStore(str(store_dir), tmp_path / "empty").load_state()


def test_a_seed_folder_is_served_before_the_first_sync(store_dir: Path, tmp_path: Path) -> None:
    store = EdgeStore("s3://unreachable-bucket/models", tmp_path / "cache")
    status = store.seed_from(store_dir)
    assert status.last_error is None and held(store) == {"lin/1"} and store.status.source.startswith("seed")


def test_disk_is_bounded_by_evicting_versions_no_longer_held(tmp_path: Path) -> None:
    from tests.support.models import write_model
    from tierserve.manifest import TensorSpec

    # Given versions of ~0.6 MB each (padded with an unused initializer) and a 1 MB disk budget
    root = tmp_path / "store"
    x, y = (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),)
    store = EdgeStore(str(root), tmp_path / "cache", max_disk_bytes=1 * MB, max_memory_bytes=64 * MB)
    for version in ("1", "2", "3"):
        write_model(root, "big", version, padded_linear(int(version)), x, y, targets=EDGE)
        store.sync()
        # Then each sync holds the new default, and the cache never exceeds the budget
        assert held(store) == {f"big/{version}"}
        assert sum(store.disk_usage().values()) <= 1 * MB
    assert store.status.evicted  # the older version went, least recently used first
    # And a version that cannot fit at all is refused, saying which budget and what happens instead
    small = EdgeStore(str(root), tmp_path / "small", max_disk_bytes=MB // 4, max_memory_bytes=64 * MB)
    assert "--max-disk-mb" in small.sync().refused["big/3"] and held(small) == set()
    tiny_memory = EdgeStore(str(root), tmp_path / "mem", max_memory_bytes=8 * MB)
    assert "--max-memory-mb" in tiny_memory.sync().refused["big/3"]


def padded_linear(seed: int) -> bytes:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from tests.support.models import linear_onnx

    model = onnx.load_from_string(linear_onnx(seed=seed)[0])
    pad = np.random.default_rng(seed).standard_normal(150_000).astype(np.float32)  # 0.6 MB, unused
    model.graph.initializer.append(numpy_helper.from_array(pad, "pad"))
    return model.SerializeToString()


def test_models_no_longer_on_the_edge_and_models_not_chosen_are_not_held(store_dir: Path, tmp_path: Path) -> None:
    write_linear(store_dir, "other", "1", seed=6, targets=EDGE)
    only = EdgeStore(str(store_dir), tmp_path / "only", models=("other",))
    only.sync()
    assert held(only) == {"other/1"}
    store = EdgeStore(str(store_dir), tmp_path / "cache")
    store.sync()
    assert held(store) == {"lin/1", "other/1"}
    # Given v2 of 'lin' is published for the cloud CPU only, When the device syncs
    write_linear(store_dir, "lin", "2", seed=7, targets=("cpu",))
    store.sync()
    # Then 'lin' is no longer held (it is forwarded) and nothing was refused
    assert held(store) == {"other/1"} and store.status.refused == {}


def test_refresh_never_reads_the_store_it_answers_the_synced_view(store_dir: Path, tmp_path: Path) -> None:
    from tierserve.errors import ModelNotFoundError

    # Given a device restarted from its saved state while the store is unreachable
    EdgeStore(str(store_dir), tmp_path / "cache").sync()
    shutil.rmtree(store_dir)
    store = EdgeStore(str(store_dir), tmp_path / "cache")
    assert store.load_state()
    # When a request names a model the view lacks (the inference path then refreshes the manifest)
    # Then the refresh answers the view (no read of the store): the model is unknown (404), not a store error
    assert set(store.refresh().models) == {"lin", "cpu-only", "gpu-only"}
    with pytest.raises(ModelNotFoundError, match="unknown model 'nosuch'"):
        store.refresh().resolve("nosuch")
    # And before any view, a refresh is the same 503 as manifest()
    with pytest.raises(BackendUnavailableError, match="has not synced"):
        EdgeStore(str(store_dir), tmp_path / "other").refresh()


def test_knows_a_model_held_or_in_the_last_manifest_only(store_dir: Path, tmp_path: Path) -> None:
    store = EdgeStore(str(store_dir), tmp_path / "cache")
    assert not store.knows("lin")  # nothing synced yet
    store.sync()
    assert store.knows("lin") and store.knows("gpu-only") and not store.knows("nosuch")


# --- a variant is all of its files (issue 17): versions sharing model.onnx ---------------------------------


@pytest.mark.parametrize("where", ["folder", "s3"])
@pytest.mark.parametrize("kind", ["genai", "external"])
def test_versions_sharing_model_onnx_are_held_each_with_their_own_files(tmp_path: Path, kind: str,
                                                                        where: str) -> None:
    import boto3
    from moto import mock_aws

    from tests.support.variant_pairs import assert_holds, write_pair

    with mock_aws():
        # Given v1 (default) and v2 (canary) on the edge: the same model.onnx, another chat template or weights
        root = tmp_path / "store"
        files = write_pair(root, "pair", kind)
        uri, s3 = str(root), None
        if where == "s3":
            s3 = boto3.client("s3", region_name="us-east-1")
            s3.create_bucket(Bucket="tierserve-edge-test")
            for f in (p for p in root.rglob("*") if p.is_file()):
                s3.upload_file(str(f), "tierserve-edge-test", f"models/{f.relative_to(root).as_posix()}")
            uri = "s3://tierserve-edge-test/models"
        store = EdgeStore(uri, tmp_path / "cache", s3_client=s3)
        # When the device syncs
        status = store.sync()
        # Then it holds both, each verified beside its own files, in its own folder named by the variant's digest
        assert status.refused == {} and held(store) == {"pair/1", "pair/2"}
        manifest = store.manifest()
        holds = {v: store.held(manifest.resolve("pair", v)) for v in ("1", "2")}
        for v, h in holds.items():
            assert h is not None
            assert_holds(h.path, files[v])
        assert all(h is not None and h.path.parent.name == h.model.edge_artifact.digest for h in holds.values())
        assert len(store.disk_usage()) == 2
        # And after a restart offline, the saved state re-verifies and holds both, each with its own files
        restarted = EdgeStore("s3://unreachable-bucket/models", tmp_path / "cache")
        assert restarted.load_state() and held(restarted) == {"pair/1", "pair/2"} and restarted.status.refused == {}
        for v in ("1", "2"):
            h = restarted.held(restarted.manifest().resolve("pair", v))
            assert h is not None
            assert_holds(h.path, files[v])
        # And eviction keeps both folders: each is held, by its digest
        assert restarted.evict(room=restarted.max_disk_bytes) == [] and len(restarted.disk_usage()) == 2
