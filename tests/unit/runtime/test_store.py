"""Model store: sha256 verification, missing objects, unsafe paths, S3 fetch and cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from tests.support.models import linear_onnx, write_model
from tierserve.errors import ArtifactNotFoundError, IntegrityError, InvalidNameError, ManifestError, UnsafeModelError
from tierserve.manifest import TensorSpec, Variant
from tierserve.store import ModelStore, check_s3_key

X = (TensorSpec("x", "FP32", (-1, 4)),)
Y = (TensorSpec("y", "FP32", (-1, 3)),)


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
    with pytest.raises(UnsafeModelError, match="outside the model's folder"):
        store.fetch(mv.cpu_artifact)


@mock_aws
def test_s3_fetch_verifies_caches_by_hash_and_refuses_mismatch(tmp_path):
    # Given a store uploaded to S3
    local = tmp_path / "models"
    data, _, _ = linear_onnx()
    mv = write_model(local, "lin", "1", data, X, Y)
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="tierserve-models-test")
    for f in local.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), "tierserve-models-test", f"models/{f.relative_to(local).as_posix()}")
    store = ModelStore("s3://tierserve-models-test/models", tmp_path / "cache", s3_client=s3)
    # When the manifest and artifact are fetched
    got = store.manifest().resolve("lin")
    path = store.fetch(got.cpu_artifact)
    # Then the artifact is cached under its content hash
    assert path.name == f"{mv.cpu_artifact.sha256}.onnx"
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
