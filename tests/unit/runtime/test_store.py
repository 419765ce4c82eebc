"""Model store: sha256 verification, missing objects, unsafe paths, S3 fetch and cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import boto3
import numpy as np
import pytest
from moto import mock_aws

from tests.support.models import linear_onnx, write_model
from tests.support.onnx_external import external_linear, with_custom_op, with_location, write_entry
from tierserve.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    IntegrityError,
    InvalidNameError,
    ManifestError,
    UnsafeModelError,
)
from tierserve.manifest import Manifest, TensorSpec, Variant
from tierserve.store import ModelStore, check_s3_key

X = (TensorSpec("x", "FP32", (-1, 4)),)
Y = (TensorSpec("y", "FP32", (-1, 3)),)


def _upload(root: Path):
    """A boto3 S3 client (mocked) with ``root`` uploaded under s3://tierserve-models-test/models/."""
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="tierserve-models-test")
    for f in root.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "tierserve-models-test", f"models/{f.relative_to(root).as_posix()}")
    return s3


def _store(tmp_path: Path) -> tuple[ModelStore, Variant]:
    data, _, _ = linear_onnx()
    mv = write_model(tmp_path / "models", "lin", "1", data, X, Y)
    return ModelStore(str(tmp_path / "models"), tmp_path / "cache"), mv.cpu_artifact


def test_fetch_verifies_and_returns_the_local_artifact(tmp_path):
    # Given a store with one model
    store, variant = _store(tmp_path)
    # When it is fetched
    path = store.fetch(variant)
    # Then the path holds exactly the bytes the manifest describes
    assert hashlib.sha256(path.read_bytes()).hexdigest() == variant.sha256


def test_sha256_mismatch_is_refused_before_loading(tmp_path):
    # Given an artifact that was modified after compilation
    store, variant = _store(tmp_path)
    (tmp_path / "models" / variant.path).write_bytes(b"tampered")
    # When it is fetched, Then the store refuses it and says what to do
    with pytest.raises(IntegrityError, match="refusing to load it") as err:
        store.fetch(variant)
    assert variant.sha256[:12] in str(err.value)


def test_missing_artifact_is_a_clear_error(tmp_path):
    store, variant = _store(tmp_path)
    (tmp_path / "models" / variant.path).unlink()
    with pytest.raises(ArtifactNotFoundError, match="missing from"):
        store.fetch(variant)


def test_missing_manifest_says_to_compile_first(tmp_path):
    store = ModelStore(str(tmp_path / "empty"), tmp_path / "cache")
    with pytest.raises(ManifestError, match="compile a model first"):
        store.manifest()


@pytest.mark.parametrize("key", ["../secrets", "a/../../b", "/abs/key", "models/x y", "models/$(rm)", ""])
def test_s3_keys_outside_the_allowlist_are_refused(key):
    with pytest.raises(InvalidNameError):
        check_s3_key(key)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    # Given an ONNX model whose initializer points at ../../etc/passwd as external data
    import onnx
    from onnx import TensorProto, helper

    tensor = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 3])
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../../etc/passwd"), ("offset", "0"), ("length", "48")):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [tensor])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    mv = write_model(tmp_path / "models", "evil", "1", data, X, Y)
    store = ModelStore(str(tmp_path / "models"), tmp_path / "cache")
    # When it is fetched, Then it is refused before onnxruntime ever sees it
    with pytest.raises(UnsafeModelError, match="leaves the model's folder"):
        store.fetch(mv.cpu_artifact)


@mock_aws
def test_s3_fetch_verifies_caches_by_hash_and_refuses_mismatch(tmp_path):
    # Given a store uploaded to S3
    local = tmp_path / "models"
    data, _, _ = linear_onnx()
    mv = write_model(local, "lin", "1", data, X, Y)
    s3 = _upload(local)
    store = ModelStore("s3://tierserve-models-test/models", tmp_path / "cache", s3_client=s3)
    # When the manifest and artifact are fetched
    got = store.manifest().resolve("lin")
    path = store.fetch(got.cpu_artifact)
    # Then the artifact is cached in a folder named after its content hash
    assert path.parent.name == mv.cpu_artifact.sha256 and path.name == "model.onnx"
    assert path.read_bytes() == data
    # And a tampered object is refused and leaves nothing behind in the cache
    s3.put_object(Bucket="tierserve-models-test", Key="models/lin/1/model.onnx", Body=b"evil")
    fresh = ModelStore("s3://tierserve-models-test/models", tmp_path / "cache2", s3_client=s3)
    with pytest.raises(IntegrityError):
        fresh.fetch(got.cpu_artifact)
    assert not any((tmp_path / "cache2").iterdir())
    # And a missing object is a not-found error naming the key
    s3.delete_object(Bucket="tierserve-models-test", Key="models/lin/1/model.onnx")
    with pytest.raises(ArtifactNotFoundError, match=r"models/lin/1/model\.onnx"):
        ModelStore("s3://tierserve-models-test/models", tmp_path / "cache3", s3_client=s3).fetch(got.cpu_artifact)


def test_scanner_agrees_with_onnx_on_a_model_saved_with_external_data(tmp_path):
    # Given a model saved by onnx itself with its weights in an external file beside it
    import onnx

    from tierserve.onnx_scan import external_data_locations

    data, _, _ = linear_onnx(in_dim=64, out_dim=64)
    model = onnx.load_from_string(data)
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    # When the wire-format scanner reads it
    found = external_data_locations((tmp_path / "m.onnx").read_bytes())
    # Then it finds exactly the tensors onnx stored externally, at the location onnx wrote
    assert sorted(found) == [("B", "weights.bin"), ("W", "weights.bin")]
    # And a model without external data reports none
    assert external_data_locations(data) == []


def test_external_data_hidden_in_a_subgraph_is_refused(tmp_path):
    # Given an If node whose then-branch holds a Constant with an external tensor at an absolute path
    import onnx
    from onnx import TensorProto, helper

    evil = onnx.TensorProto(name="C", data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
    entry = evil.external_data.add()
    entry.key, entry.value = "location", "/etc/shadow"
    branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=evil)], "then", [],
                               [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    other = helper.make_graph([helper.make_node("Constant", [], ["d"], value_floats=[0.0])], "else", [],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, [1])])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=other)],
                              "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    mv = write_model(tmp_path / "models", "sub", "1", data, (TensorSpec("cond", "BOOL", ()),), (
        TensorSpec("out", "FP32", (1,)),))
    # When it is fetched, Then it is refused and the message names the tensor and the path
    with pytest.raises(UnsafeModelError, match="/etc/shadow"):
        ModelStore(str(tmp_path / "models"), tmp_path / "cache").fetch(mv.cpu_artifact)


# --- external data: integrity (issue 8 defect 6), serving (8), unsafe locations (9) ----------------


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


def _external_store(tmp_path: Path, name: str = "ext") -> tuple[Path, np.ndarray]:
    """A local store with one model whose W and B live in NAME/1/weights.bin; returns (root, expected y)."""
    root = tmp_path / "models"
    _, w, b = external_linear(root / name / "1")
    write_entry(root, name)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    return root, x @ w + b


def test_model_with_external_data_is_fetched_into_its_own_cache_folder_and_runs(tmp_path):
    # Given a store whose model keeps its weights in weights.bin, listed in the manifest with its sha256
    root, expected = _external_store(tmp_path)
    store = ModelStore(str(root), tmp_path / "cache")
    variant = store.manifest().resolve("ext").cpu_artifact
    # When it is fetched
    path = store.fetch(variant)
    # Then model and weights sit together in a cache folder named after the variant's digest, and it runs
    assert path.parent == tmp_path / "cache" / variant.digest
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "weights.bin"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(_run(path, x), expected, rtol=1e-6)


def test_replaced_weights_next_to_a_verified_model_are_refused(tmp_path):
    # Given a compiled store, then weights.bin replaced by other numbers of the same size
    root, _ = _external_store(tmp_path)
    weights = root / "ext" / "1" / "weights.bin"
    weights.write_bytes(np.frombuffer(weights.read_bytes(), np.float32).__mul__(1000).tobytes())
    store = ModelStore(str(root), tmp_path / "cache")
    # When it is fetched / Then the unchanged model.onnx does not vouch for the weights: integrity error
    with pytest.raises(IntegrityError, match=r"ext/1/weights\.bin.*sha256"):
        store.fetch(store.manifest().resolve("ext").cpu_artifact)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


def test_external_data_the_manifest_does_not_list_is_refused(tmp_path):
    # Given an older manifest entry without external_data for a model that has some
    root = tmp_path / "models"
    external_linear(root / "old" / "1")
    write_entry(root, "old", external=())
    store = ModelStore(str(root), tmp_path / "cache")
    # When it is fetched / Then nothing vouches for weights.bin, so it is refused, saying what to do
    with pytest.raises(IntegrityError, match=r"weights\.bin.*does not list.*(?i:recompile)"):
        store.fetch(store.manifest().resolve("old").cpu_artifact)


@pytest.mark.parametrize("which", ["model.onnx", "weights.bin"])
def test_hardlinked_model_or_weights_are_refused(tmp_path, which):
    # Given a store where the file is a hardlink (st_nlink 2) to a file outside it
    root, _ = _external_store(tmp_path)
    target = root / "ext" / "1" / which
    outside = tmp_path / f"outside-{which}"
    target.rename(outside)
    os.link(outside, target)
    store = ModelStore(str(root), tmp_path / "cache")
    # When it is fetched / Then it is refused before anything reads it
    with pytest.raises(UnsafeModelError, match="hard link"):
        store.fetch(store.manifest().resolve("ext").cpu_artifact)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_weights_that_are_not_regular_files_are_refused(tmp_path, kind):
    # Given weights.bin replaced by a symlink (to the same bytes), a FIFO or a directory
    root, _ = _external_store(tmp_path)
    weights = root / "ext" / "1" / "weights.bin"
    kept = tmp_path / "kept.bin"
    weights.rename(kept)
    {"symlink": lambda: weights.symlink_to(kept), "fifo": lambda: os.mkfifo(weights),
     "directory": weights.mkdir}[kind]()
    store = ModelStore(str(root), tmp_path / "cache")
    # When it is fetched / Then it is refused (a FIFO does not hang the fetch)
    with pytest.raises(UnsafeModelError, match="not a regular file"):
        store.fetch(store.manifest().resolve("ext").cpu_artifact)


@pytest.mark.parametrize("in_constant", [False, True], ids=["initializer", "constant"])
@pytest.mark.parametrize("location", ["w\x00eights.bin", "/proc/self/environ", "../../etc/passwd", "/etc/passwd",
                                      "sub/../../w.bin"])
def test_unsafe_external_data_locations_are_an_unsafe_model(tmp_path, location, in_constant):
    # Given a model with one tensor at an unsafe location (NUL byte, absolute, /proc, '..'),
    # as an initializer or inside a Constant node
    root, _ = _external_store(tmp_path)
    with_location(root / "ext" / "1" / "model.onnx", location, in_constant=in_constant)
    write_entry(root, "ext")
    store = ModelStore(str(root), tmp_path / "cache")
    # When it is fetched / Then it is a clear unsafe_model refusal naming the location
    with pytest.raises(UnsafeModelError, match="refusing to load it") as err:
        store.fetch(store.manifest().resolve("ext").cpu_artifact)
    assert err.value.code == "unsafe_model" and repr(location)[1:-1] in str(err.value)


@mock_aws
def test_s3_fetches_and_verifies_every_file_a_model_needs(tmp_path):
    # Given a store with external data uploaded to S3
    root, expected = _external_store(tmp_path)
    s3 = _upload(root)
    store = ModelStore("s3://tierserve-models-test/models", tmp_path / "cache", s3_client=s3)
    variant = store.manifest().resolve("ext").cpu_artifact
    # When it is fetched / Then weights.bin came too, verified, next to the model, and the model runs
    path = store.fetch(variant)
    assert (path.parent / "weights.bin").is_file()
    np.testing.assert_allclose(_run(path, np.arange(8, dtype=np.float32).reshape(2, 4)), expected, rtol=1e-6)
    # And a tampered weights object is refused, leaving no partial cache folder behind
    s3.put_object(Bucket="tierserve-models-test", Key="models/ext/1/weights.bin", Body=b"\0" * 60)
    fresh = ModelStore("s3://tierserve-models-test/models", tmp_path / "cache2", s3_client=s3)
    with pytest.raises(IntegrityError, match=r"weights\.bin"):
        fresh.fetch(variant)
    assert not list((tmp_path / "cache2").iterdir())


def test_a_corrupted_cache_is_fetched_again(tmp_path):
    # Given a model fetched into the cache, whose cached weights are then corrupted
    root, expected = _external_store(tmp_path)
    variant = ModelStore(str(root), tmp_path / "cache").manifest().resolve("ext").cpu_artifact
    cached = ModelStore(str(root), tmp_path / "cache").fetch(variant)
    (cached.parent / "weights.bin").write_bytes(b"\0" * 60)
    # When a new process (store) fetches it / Then the cache is verified, refetched and right again
    path = ModelStore(str(root), tmp_path / "cache").fetch(variant)
    np.testing.assert_allclose(_run(path, np.arange(8, dtype=np.float32).reshape(2, 4)), expected, rtol=1e-6)


@pytest.mark.parametrize("key", ["models/m\n", "models/m/1/model.onnx\n"])
def test_s3_keys_with_a_trailing_newline_are_refused(key):
    with pytest.raises(InvalidNameError):
        check_s3_key(key)


def test_a_manifest_change_evicts_models_no_version_serves(tmp_path, monkeypatch):
    # Given v1 and v2 fetched (and a session listener)
    from tests.support.lifecycle import compiled
    from tierserve.lifecycle.objects import FolderObjects
    from tierserve.lifecycle.registry import Registry

    store_dir = tmp_path / "store"
    reg = Registry(FolderObjects(store_dir), actor="t")
    for v in ("1", "2"):
        mv = compiled(tmp_path / "build", "m", v, seed=int(v))
        reg.publish(mv)
    import shutil

    for v in ("1", "2"):  # the artifacts where the manifest says (a folder store)
        (store_dir / "m" / v).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "build" / "m" / v / "model.onnx", store_dir / "m" / v / "model.onnx")
    store = ModelStore(str(store_dir), tmp_path / "cache", manifest_ttl_s=0)
    evicted: list[set[str]] = []
    store.on_evict.append(evicted.append)
    manifest = store.manifest()
    v1, v2 = (manifest.resolve("m", v).cpu_artifact for v in ("1", "2"))
    p1, p2 = store.fetch(v1), store.fetch(v2)
    # When v2 is promoted and v1 retired, and its grace has passed
    reg.promote("m", "2")
    reg.retire("m", "1")
    import time as time_module

    from tierserve.manifest import RETIRE_GRACE_S

    real = time_module.time
    monkeypatch.setattr("tierserve.manifest.time.time", lambda: real() + RETIRE_GRACE_S + 1)
    store.manifest()
    # Then v1's cached copy and session are gone, v2's are kept
    assert evicted == [{v1.sha256}] and not p1.exists() and p2.exists()


def test_refresh_returns_a_manifest_read_after_the_request_arrived(tmp_path):
    import time as time_module

    spec_in, spec_out = (TensorSpec("x", "FP32", (-1, 4)),), (TensorSpec("y", "FP32", (-1, 3)),)
    write_model(tmp_path, "m", "1", linear_onnx()[0], spec_in, spec_out)
    store = ModelStore(str(tmp_path), tmp_path / "cache", manifest_ttl_s=60)
    store.manifest()
    before = time_module.monotonic() - 10  # a request that arrived before that read: the cached copy will do
    write_model(tmp_path, "m", "2", linear_onnx(seed=2)[0], spec_in, spec_out)
    assert "2" not in store.refresh(since=before).models["m"].versions
    assert "2" in store.refresh().models["m"].versions  # a request arriving now: read again


@pytest.mark.parametrize("in_subgraph", [False, True], ids=["top-level", "if-branch"])
def test_operators_from_a_domain_off_the_allowlist_are_an_unsafe_model(tmp_path, in_subgraph):
    # Given a model (sha256 listed, so integrity passes) with one node from a custom-op domain
    root, _ = _external_store(tmp_path)
    with_custom_op(root / "ext" / "1" / "model.onnx", "evil.custom", in_subgraph=in_subgraph)
    write_entry(root, "ext")
    store = ModelStore(str(root), tmp_path / "cache")
    # When it is fetched / Then it is refused before onnxruntime sees it, naming the domain and the allowlist
    with pytest.raises(UnsafeModelError, match=r"domain\(s\) 'evil.custom', which are not on the allowlist") as err:
        store.fetch(store.manifest().resolve("ext").cpu_artifact)
    assert err.value.code == "unsafe_model" and "'com.microsoft'" in str(err.value)


class _FailingS3:
    """A boto3 S3 client whose manifest reads work and whose artifact reads fail as ``failure`` says."""

    def __init__(self, manifest: bytes, failure: str) -> None:
        self.manifest, self.failure = manifest, failure

    def get_object(self, Bucket: str, Key: str) -> dict:
        import io

        from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

        if Key.endswith("manifest.json"):
            return {"Body": io.BytesIO(self.manifest)}
        if self.failure == "slowdown":
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "reduce your rate"},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
        if self.failure == "refused":
            raise EndpointConnectionError(endpoint_url="http://s3")
        if self.failure == "denied":
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"},
                               "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")

        class Cut(io.BytesIO):
            def read(self, n: int = -1) -> bytes:
                raise ReadTimeoutError(endpoint_url="http://s3")

        return {"Body": Cut(b"")}


@pytest.mark.parametrize(("failure", "error", "code"), [
    ("slowdown", "ArtifactUnavailableError", "artifact_unavailable"),
    ("refused", "ArtifactUnavailableError", "artifact_unavailable"),
    ("stalled-mid-object", "ArtifactUnavailableError", "artifact_unavailable"),
    ("denied", "ArtifactError", "artifact_error"),
])
def test_s3_failing_during_a_fetch_is_unavailable_not_a_broken_model_and_leaves_no_cache(tmp_path, failure, error,
                                                                                        code):
    from tierserve.protocol.http_api import error_response

    # Given a store whose S3 answers the manifest but fails this way for the model's bytes
    data, _, _ = linear_onnx()
    mv = write_model(tmp_path / "models", "lin", "1", data, X, Y)
    client = _FailingS3((tmp_path / "models" / "manifest.json").read_bytes(), failure)
    store = ModelStore("s3://tierserve-models-test/models", tmp_path / "cache", s3_client=client)
    # When the model is fetched, Then the error says the store is unavailable (503, Retry-After) unless S3
    # refused on purpose (a misconfiguration: 500), and nothing is left in the cache
    with pytest.raises(Exception) as info:
        store.fetch(mv.cpu_artifact)
    assert (type(info.value).__name__, info.value.code) == (error, code)
    resp = error_response(info.value)
    assert resp["statusCode"] == (503 if code == "artifact_unavailable" else 500)
    if code == "artifact_unavailable":
        assert resp["headers"]["retry-after"] == "5"
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


# --- a variant is all of its files (issue 17): versions sharing model.onnx ---------------------------------


def _pair_store(tmp_path: Path, kind: str, where: str) -> tuple[ModelStore, dict[str, dict[str, bytes]]]:
    """A store (folder, or S3 under mock_aws) holding 'pair' v1 and v2: the same model.onnx, one other file apart."""
    from tests.support.variant_pairs import write_pair

    root = tmp_path / "models"
    files = write_pair(root, "pair", kind)
    if where == "folder":
        return ModelStore(str(root), tmp_path / "cache", manifest_ttl_s=0), files
    return ModelStore("s3://tierserve-models-test/models", tmp_path / "cache", manifest_ttl_s=0,
                      s3_client=_upload(root)), files


def _drop_v1(store: ModelStore, manifest: Manifest, tmp_path: Path) -> None:
    """Rewrite the pair store's manifest without v1 (v2 the default, no canary), and let the store read it."""
    doc = manifest.to_json()
    entry = doc["models"]["pair"]
    entry.pop("canary")
    entry["default_version"] = "2"
    del entry["versions"]["1"]
    (tmp_path / "models" / "manifest.json").write_text(json.dumps(doc))
    store.manifest()


@pytest.mark.parametrize("where", ["folder", "s3"])
@pytest.mark.parametrize("kind", ["genai", "external"])
def test_versions_sharing_model_onnx_are_each_fetched_with_their_own_files(tmp_path, kind, where):
    from tests.support.variant_pairs import assert_holds

    with mock_aws():
        # Given v1 and v2 with the same model.onnx and another chat template (genai) or other weights (external)
        store, files = _pair_store(tmp_path, kind, where)
        manifest = store.manifest()
        v1, v2 = (manifest.resolve("pair", v).cpu_artifact for v in ("1", "2"))
        assert v1.sha256 == v2.sha256 and v1.digest != v2.digest
        # When both are fetched by one store
        p1, p2 = store.fetch(v1), store.fetch(v2)
        # Then each sits beside its own files, verified, in its own cache folder named by its digest
        assert_holds(p1, files["1"])
        assert_holds(p2, files["2"])
        assert p1.parent == tmp_path / "cache" / v1.digest and p2.parent == tmp_path / "cache" / v2.digest
        # And a new process (a store over the same cache) reuses both, in either order, without refetching
        fresh = ModelStore(store.uri, tmp_path / "cache", s3_client=store._s3)
        assert (fresh.fetch(v2), fresh.fetch(v1)) == (p2, p1)
        assert_holds(p1, files["1"])
        assert_holds(p2, files["2"])


def test_eviction_keeps_the_version_still_served_when_another_shares_its_model_onnx(tmp_path):
    from tests.support.variant_pairs import assert_holds

    # Given v1 and v2 (same model.onnx, other weights) both fetched, and a session listener
    store, files = _pair_store(tmp_path, "external", "folder")
    evicted: list[set[str]] = []
    store.on_evict.append(evicted.append)
    manifest = store.manifest()
    v1, v2 = (manifest.resolve("pair", v).cpu_artifact for v in ("1", "2"))
    p1, p2 = store.fetch(v1), store.fetch(v2)
    # When the store's manifest no longer lists v1
    _drop_v1(store, manifest, tmp_path)
    # Then v2's folder is kept, with v2's files, and v1's folder and sessions are evicted (by its digest)
    assert_holds(store.fetch(v2), files["2"])
    assert store.fetch(v2) == p2 and p2.exists()
    assert evicted == [{v1.digest}] and not p1.exists()


# --- some of a variant's files, never its weights (issue 17/18: the router's tokenizer) --------------------

TOKENIZER_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


def _cached_files(cache: Path) -> dict[str, set[str]]:
    """{cache folder: the names of the files in it} (temporary folders included)."""
    return {d.name: {f.name for f in d.rglob("*") if f.is_file()} for d in cache.iterdir()} if cache.exists() else {}


def _drop_weights(store: ModelStore, root: Path, version: str) -> None:
    """Delete pair vN's model.onnx and model.onnx.data from the store (folder or S3): nothing may need them."""
    for name in ("model.onnx", "model.onnx.data"):
        rel = f"pair/{version}/fp32/{name}"
        if store.root is not None:
            (root / rel).unlink()
        else:
            store._s3.delete_object(Bucket="tierserve-models-test", Key=f"models/{rel}")


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_fetch_files_materialises_only_the_named_files_verified(tmp_path, where):
    from tests.support.variant_pairs import assert_holds

    with mock_aws():
        # Given a genai store (folder or S3) whose weights cannot be read at all
        store, files = _pair_store(tmp_path, "genai", where)
        v1, v2 = (store.manifest().resolve("pair", v).cpu_artifact for v in ("1", "2"))
        _drop_weights(store, tmp_path / "models", "1")
        _drop_weights(store, tmp_path / "models", "2")
        # When the tokenizer files of each version are fetched
        f1, f2 = store.fetch_files(v1, TOKENIZER_FILES), store.fetch_files(v2, reversed(TOKENIZER_FILES))
        # Then each sits in a folder of its own, named by the variant's digest, holding exactly those files
        assert f1.parent == f2.parent == tmp_path / "cache"
        assert f1.name.startswith(v1.digest + ".files-") and f2.name.startswith(v2.digest + ".files-")
        assert_holds(f1 / "model.onnx", {n: files["1"][n] for n in TOKENIZER_FILES})
        assert_holds(f2 / "model.onnx", {n: files["2"][n] for n in TOKENIZER_FILES})
        assert _cached_files(tmp_path / "cache") == {f1.name: set(TOKENIZER_FILES), f2.name: set(TOKENIZER_FILES)}
        assert store.fetch_files(v1, TOKENIZER_FILES) == f1  # cached in this process
        # And a new process over the same cache reuses them (the store's copies are gone: nothing refetched)
        for name in TOKENIZER_FILES:
            if store.root is not None:
                (tmp_path / "models" / f"pair/1/fp32/{name}").unlink()
            else:
                store._s3.delete_object(Bucket="tierserve-models-test", Key=f"models/pair/1/fp32/{name}")
        fresh = ModelStore(store.uri, tmp_path / "cache", s3_client=store._s3)
        assert fresh.fetch_files(v1, TOKENIZER_FILES) == f1
        # And read_file reads one verified file without writing anything
        assert fresh.read_file(v1, "chat_template.jinja") == files["1"]["chat_template.jinja"]
        assert store.read_file(v2, "tokenizer.json") == files["2"]["tokenizer.json"]
        assert len(_cached_files(tmp_path / "cache")) == 2


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_fetch_files_refuses_a_tampered_file_and_leaves_nothing(tmp_path, where):
    with mock_aws():
        # Given a store whose v1 tokenizer.json was changed after compilation
        store, _ = _pair_store(tmp_path, "genai", where)
        v1 = store.manifest().resolve("pair", "1").cpu_artifact
        if store.root is not None:
            (tmp_path / "models" / "pair/1/fp32/tokenizer.json").write_text('{"tampered": true}')
        else:
            store._s3.put_object(Bucket="tierserve-models-test", Key="models/pair/1/fp32/tokenizer.json",
                                 Body=b'{"tampered": true}')
        # When its files are fetched or read / Then it is refused, and no folder is left behind
        with pytest.raises(IntegrityError, match=r"pair/1/fp32/tokenizer\.json.*refusing"):
            store.fetch_files(v1, TOKENIZER_FILES)
        with pytest.raises(IntegrityError, match=r"tokenizer\.json"):
            store.read_file(v1, "tokenizer.json")
        assert _cached_files(tmp_path / "cache") == {}
        # The other files still fetch
        assert store.fetch_files(v1, ["chat_template.jinja"]).is_dir()


def test_fetch_files_takes_only_files_the_manifest_lists(tmp_path):
    store, _ = _pair_store(tmp_path, "genai", "folder")
    v1 = store.manifest().resolve("pair", "1").cpu_artifact
    for name in ("special_tokens_map.json", "../2/fp32/tokenizer.json", "/etc/passwd", "manifest.json"):
        with pytest.raises(ArtifactNotFoundError, match="not one of the files the manifest lists"):
            store.fetch_files(v1, [name])
        with pytest.raises(ArtifactNotFoundError, match="not one of the files the manifest lists"):
            store.read_file(v1, name)
    with pytest.raises(ArtifactError, match="at least one"):
        store.fetch_files(v1, [])


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_fetch_files_refuses_links(tmp_path, kind):
    # Given a tokenizer.json that is a link to the same bytes elsewhere
    store, _ = _pair_store(tmp_path, "genai", "folder")
    v1 = store.manifest().resolve("pair", "1").cpu_artifact
    target = tmp_path / "models" / "pair/1/fp32/tokenizer.json"
    outside = tmp_path / "outside.json"
    target.rename(outside)
    target.symlink_to(outside) if kind == "symlink" else os.link(outside, target)
    # When its files are fetched / Then the link is refused before anything reads it
    with pytest.raises(UnsafeModelError, match=r"symbolic|hard link"):
        store.fetch_files(v1, TOKENIZER_FILES)
    with pytest.raises(UnsafeModelError, match=r"symbolic|hard link"):
        store.read_file(v1, "tokenizer.json")


def test_a_corrupted_partial_cache_is_fetched_again(tmp_path):
    from tests.support.variant_pairs import assert_holds

    store, files = _pair_store(tmp_path, "genai", "folder")
    v1 = store.manifest().resolve("pair", "1").cpu_artifact
    folder = store.fetch_files(v1, TOKENIZER_FILES)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "chat_template.jinja").unlink()
    fresh = ModelStore(store.uri, tmp_path / "cache")
    assert fresh.fetch_files(v1, TOKENIZER_FILES) == folder
    assert_holds(folder / "model.onnx", {n: files["1"][n] for n in TOKENIZER_FILES})


def test_fetch_files_uses_the_whole_folder_once_it_is_fetched(tmp_path):
    store, _ = _pair_store(tmp_path, "genai", "folder")
    v1 = store.manifest().resolve("pair", "1").cpu_artifact
    full = store.fetch(v1).parent
    assert store.fetch_files(v1, TOKENIZER_FILES) == full
    assert sorted(_cached_files(tmp_path / "cache")) == [v1.digest]


def test_eviction_removes_the_partial_folders_of_versions_no_longer_served(tmp_path):
    # Given v1's and v2's tokenizer files fetched alone
    store, _ = _pair_store(tmp_path, "genai", "folder")
    evicted: list[set[str]] = []
    store.on_evict.append(evicted.append)
    manifest = store.manifest()
    v1, v2 = (manifest.resolve("pair", v).cpu_artifact for v in ("1", "2"))
    f1, f2 = store.fetch_files(v1, TOKENIZER_FILES), store.fetch_files(v2, TOKENIZER_FILES)
    # When the manifest no longer lists v1
    _drop_v1(store, manifest, tmp_path)
    # Then v1's folder is gone and its digest told to the listeners; v2's stays
    assert not f1.exists() and f2.exists() and evicted == [{v1.digest}]
    assert store.fetch_files(v2, TOKENIZER_FILES) == f2
