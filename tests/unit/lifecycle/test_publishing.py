"""Publishing a compiled version: content-addressed uploads, the Triton repository, then the manifest entry."""

from __future__ import annotations

import pytest

from tests.support.lifecycle import compiled
from tierserve.errors import LifecycleError
from tierserve.lifecycle.objects import FolderObjects
from tierserve.lifecycle.registry import Registry
from tierserve.lifecycle.triton_repo import config_revision
from tierserve_tools.publishing import content_addressed, publish_version


def parse(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture
def store(tmp_path):
    objects = FolderObjects(tmp_path / "store")
    return objects, Registry(objects, actor="ci")


def test_a_shared_variant_is_uploaded_once(tmp_path, store):
    # Given v1 and v2 compiled from the same weights (same sha256)
    objects, reg = store
    build = tmp_path / "build"
    compiled(build, "m", "1", seed=1)
    compiled(build, "m", "2", seed=1)
    first = publish_version(build / "m" / "1", objects, reg)
    second = publish_version(build / "m" / "2", objects, reg)
    # Then the second publish uploads nothing and both versions point at the same object
    assert len(first.uploaded) == 1 and second.uploaded == [] and second.skipped == first.uploaded
    entry = reg.entry("m")
    assert entry.versions["1"].cpu_artifact.path == entry.versions["2"].cpu_artifact.path == first.uploaded[0]


def test_content_addresses_keep_external_data_beside_the_model():
    from tierserve.manifest import ExternalFile, Variant

    v = Variant("m/1/model.onnx", "a" * 64, 10, (ExternalFile("m/1/w/model.onnx.data", "b" * 64, 5),))
    ca = content_addressed(v)
    # the prefix is the variant's digest (all of its files), which the move does not change
    assert ca.digest == v.digest != v.sha256
    assert ca.path == f"_objects/{v.digest}/model.onnx"
    assert ca.external_data[0].path == f"_objects/{v.digest}/w/model.onnx.data" and ca.location(ca.external_data[0]) \
        == "w/model.onnx.data"
    # and a model with no other file keeps its sha256 as its prefix, as stores published before the digest have it
    plain = Variant("m/1/model.onnx", "a" * 64, 10)
    assert content_addressed(plain).path == f"_objects/{'a' * 64}/model.onnx"


def test_gpu_versions_go_to_the_triton_repository_which_lists_the_published_ones(tmp_path, store):
    objects, reg = store
    build = tmp_path / "build"
    for v in ("1", "2"):
        compiled(build, "g", v, seed=int(v), gpu=True)
    publish_version(build / "g" / "1", objects, reg)
    # When v2 is published (listed, not the default)
    result = publish_version(build / "g" / "2", objects, reg)
    # Then its Triton files are uploaded and the model config serves both versions, from the newest config
    root = tmp_path / "store" / "triton" / "g"
    assert sorted(result.triton) == ["triton/g/2/config.pbtxt", "triton/g/2/model.onnx"]
    text = (root / "config.pbtxt").read_text()
    assert list(parse(text).version_policy.specific.versions) == [1, 2]
    assert config_revision(text) == reg.manifest().revision
    # When v1 is retired, Then the config no longer lists it (Triton unloads it)
    reg.promote("g", "2")
    reg.retire("g", "1")
    from tierserve_tools.publishing import sync_triton_config

    sync_triton_config(objects, reg, "g")
    assert list(parse((root / "config.pbtxt").read_text()).version_policy.specific.versions) == [2]


def test_a_gpu_version_with_another_signature_is_refused_before_it_is_listed(tmp_path, store):
    objects, reg = store
    build = tmp_path / "build"
    compiled(build, "g", "1", gpu=True)
    compiled(build, "g", "2", gpu=True, in_dim=6)
    publish_version(build / "g" / "1", objects, reg)
    with pytest.raises(LifecycleError, match="one Triton config"):
        publish_version(build / "g" / "2", objects, reg)
    assert sorted(reg.entry("g").listed()) == ["1"]


def test_a_gpu_version_is_published_as_its_sagemaker_archive_too(tmp_path, store):
    # Given a GPU-placed version
    import tarfile

    objects, reg = store
    compiled(tmp_path / "build", "g", "1", gpu=True)
    # When it is published
    result = publish_version(tmp_path / "build" / "g" / "1", objects, reg)
    # Then sagemaker/g-1.tar.gz is in the store (GpuModelDataUrl), holding g/config.pbtxt and g/1/model.onnx
    archive = tmp_path / "store" / "sagemaker" / "g-1.tar.gz"
    assert "sagemaker/g-1.tar.gz" in result.uploaded
    assert any("GpuModelDataUrl" in n and n.endswith("GpuModelVersion=1)") for n in result.notes)
    with tarfile.open(archive) as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == ["g/1/model.onnx", "g/config.pbtxt"]
    # And publishing it again uploads nothing new
    assert "sagemaker/g-1.tar.gz" in publish_version(tmp_path / "build" / "g" / "1", objects, reg).skipped


# --- a variant is all of its files (issue 17): versions sharing model.onnx ---------------------------------


@pytest.mark.parametrize("where", ["folder", "s3"])
@pytest.mark.parametrize("kind", ["genai", "external"])
def test_versions_sharing_model_onnx_are_published_apart_and_each_fetched_with_its_files(tmp_path, kind, where):
    import boto3
    from moto import mock_aws

    from tests.support.variant_pairs import assert_holds, write_pair
    from tierserve.edge.store import EdgeStore
    from tierserve.lifecycle.objects import S3Objects
    from tierserve.store import ModelStore

    with mock_aws():
        # Given v1 and v2 compiled with the same model.onnx and another chat template (genai) or weights (external)
        build = tmp_path / "build"
        files = write_pair(build, "pair", kind)
        s3 = None
        if where == "s3":
            s3 = boto3.client("s3", region_name="us-east-1")
            s3.create_bucket(Bucket="tierserve-publish-test")
            objects = S3Objects("s3://tierserve-publish-test/models", s3)
        else:
            objects = FolderObjects(tmp_path / "store")
        reg = Registry(objects, actor="ci")
        # When both are published into one store, v2 as the canary
        first = publish_version(build / "pair" / "1", objects, reg)
        second = publish_version(build / "pair" / "2", objects, reg, canary=50)
        # Then the cloud fetches both, each verified beside its own files
        entry = reg.entry("pair")
        v1, v2 = (entry.versions[v].cpu_artifact for v in ("1", "2"))
        cloud = ModelStore(objects.uri, tmp_path / "cache", s3_client=s3)
        assert_holds(cloud.fetch(v1), files["1"])
        assert_holds(cloud.fetch(v2), files["2"])
        # And v2 shares no object with v1 (nothing of v1's was overwritten): each is under its variant's digest
        assert set(first.uploaded).isdisjoint(second.uploaded) and second.skipped == []
        assert v1.path == f"_objects/{v1.digest}/model.onnx" and v2.path == f"_objects/{v2.digest}/model.onnx"
        # And so does an edge device holding the default (v1) and the canary (v2)
        edge = EdgeStore(objects.uri, tmp_path / "edge-cache", s3_client=s3)
        assert edge.sync().refused == {}
        for v in ("1", "2"):
            h = edge.held(edge.manifest().resolve("pair", v))
            assert h is not None
            assert_holds(h.path, files[v])
        # And publishing v1 again with one file changed is refused before anything is uploaded
        changed = next(p for p in sorted((build / "pair" / "1").rglob("*")) if p.name in ("chat_template.jinja",
                                                                                         "weights.bin"))
        changed.write_bytes(files["2"][changed.name])
        import dataclasses

        from tierserve_compiler.publish import variant_entries, write_manifest_entry

        mv1 = reg.entry("pair").versions["1"]
        model = changed.parent / "model.onnx"
        redone = dataclasses.replace(mv1, variants=variant_entries("pair", "1", {"fp32": model}), published_at="",
                                     published_by="")
        (build / "manifest.json").unlink()
        write_manifest_entry(build, redone)
        before = objects.list("_objects")
        with pytest.raises(LifecycleError, match="different content"):
            publish_version(build / "pair" / "1", objects, reg)
        assert objects.list("_objects") == before
        assert_holds(ModelStore(objects.uri, tmp_path / "cache2", s3_client=s3).fetch(v1), files["1"])
