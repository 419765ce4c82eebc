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
    assert ca.path == f"_objects/{'a' * 64}/model.onnx"
    assert ca.external_data[0].path == f"_objects/{'a' * 64}/w/model.onnx.data" and ca.location(ca.external_data[0]) \
        == "w/model.onnx.data"


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
