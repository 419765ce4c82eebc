"""Publishing: the version folder, the Triton repository, the manifest entry and immutability."""

from __future__ import annotations

import json

import pytest
from compiler_testlib import make_mlp_onnx
from google.protobuf import text_format

from tierserve.manifest import Manifest
from tierserve_compiler.errors import ArtifactExistsError
from tierserve_compiler.pipeline import compile_model


def parse(text: str):
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_gpu_target_writes_the_triton_repository(mlp_onnx, cfg_for, tmp_path):
    # Given / When a compile forced to both tiers
    res = compile_model(cfg_for(mlp_onnx, "tri", target="both", quantize="fp16"))
    # Then DIR/triton/NAME/config.pbtxt + DIR/triton/NAME/1/model.onnx hold the fp16 variant
    root = tmp_path / "models" / "triton" / "tri"
    cfg = parse((root / "config.pbtxt").read_text())
    assert cfg.name == "tri" and [list(i.dims) for i in cfg.input] == [[16]]
    assert (root / "1" / "model.onnx").read_bytes() == (res.version_dir / "fp16.onnx").read_bytes()
    mv = res.model_version
    assert list(mv.targets) == ["gpu", "cpu"] and mv.cpu_variant == "fp32" and res.report["triton_variant"] == "fp16"
    # And the version keeps its own config, and the model's config serves exactly the listed GPU versions
    assert parse((root / "1" / "config.pbtxt").read_text()).name == "tri"
    assert list(cfg.version_policy.specific.versions) == [1]


def test_cpu_only_model_has_no_triton_folder(mlp_onnx, cfg_for, tmp_path):
    compile_model(cfg_for(mlp_onnx, "cpuonly", target="cpu", quantize="none"))
    assert not (tmp_path / "models" / "triton" / "cpuonly").exists()


def test_manifest_contents_and_other_models_kept(mlp_onnx, mlp_data, cfg_for, tmp_path):
    # Given two models compiled into the same store
    val, _ = mlp_data
    compile_model(cfg_for(mlp_onnx, "alpha", quantize="none"))
    res = compile_model(cfg_for(mlp_onnx, "beta", validation=val, quantize="dynamic"))
    # Then the manifest loads with the schema, keeps both and has every field
    text = (tmp_path / "models" / "manifest.json").read_text()
    man = Manifest.loads(text)
    assert set(man.models) == {"alpha", "beta"}
    raw = json.loads(text)["models"]["beta"]["versions"]["1"]
    assert {
        "inputs",
        "outputs",
        "variants",
        "selected_variant",
        "targets",
        "max_batch_size",
        "routing",
        "cpu",
        "created_at",
    } <= set(raw)
    assert raw["cpu"]["memory_mb"] >= 128 and raw["cpu"]["threads"] >= 1
    assert set(raw["routing"]) == {"gpu_min_rows", "gpu_min_bytes"}
    assert raw["max_batch_size"] == 64 and raw["created_at"].endswith("Z")
    assert raw["variants"]["int8_dynamic"]["path"] == "beta/1/int8_dynamic.onnx"
    assert res.model_version == man.resolve("beta", "1")
    assert not list((tmp_path / "models").glob(".staging-*")) and not list((tmp_path / "models").glob(".manifest-*"))


def test_versions_increment_and_same_content_is_a_noop(mlp_onnx, tmp_path, cfg_for):
    # Given model A compiled as v1
    first = compile_model(cfg_for(mlp_onnx, "m", quantize="none"))
    assert first.version == "1"
    # When the same content is compiled again, with or without --version 1
    again = compile_model(cfg_for(mlp_onnx, "m", quantize="none", version="1"))
    implicit = compile_model(cfg_for(mlp_onnx, "m", quantize="none"))
    # Then nothing changes
    assert again.noop and implicit.noop and implicit.version == "1"
    # When different content is compiled without --version / Then it becomes v2, listed but not the default
    # (compiling never changes what is served; `tierserve models promote` does)
    other = make_mlp_onnx(tmp_path / "other.onnx", seed=7)
    second = compile_model(cfg_for(other, "m", quantize="none"))
    assert second.version == "2"
    entry = Manifest.loads((tmp_path / "models" / "manifest.json").read_text()).models["m"]
    assert entry.default_version == "1" and sorted(entry.listed()) == ["1", "2"]
    assert "v2 is listed, not the default" in second.next_steps and "models promote m 2" in second.next_steps


def test_recompiling_a_version_with_different_content_is_refused(mlp_onnx, tmp_path, cfg_for):
    # Given v1 exists
    compile_model(cfg_for(mlp_onnx, "m", quantize="none", version="1"))
    before = (tmp_path / "models" / "m" / "1" / "model.onnx").read_bytes()
    # When other content is compiled as v1 / Then it is refused and v1 is untouched
    other = make_mlp_onnx(tmp_path / "other.onnx", seed=3)
    with pytest.raises(ArtifactExistsError, match=r"immutable.*omit --version to get version 2"):
        compile_model(cfg_for(other, "m", quantize="none", version="1"))
    assert (tmp_path / "models" / "m" / "1" / "model.onnx").read_bytes() == before


def test_other_external_weights_under_the_same_graph_are_a_new_version(tmp_path, cfg_for):
    # Given a model with external weights compiled as v1
    from tests.support.onnx_external import external_linear

    first, _, _ = external_linear(tmp_path / "a", seed=1)
    compile_model(cfg_for(first, "w", quantize="none"))
    # When the same graph with other weights in weights.bin is compiled (model.onnx bytes identical)
    second, _, _ = external_linear(tmp_path / "b", seed=2)
    assert first.read_bytes() == second.read_bytes()
    res = compile_model(cfg_for(second, "w", quantize="none"))
    # Then it is new content: version 2, not a no-op
    assert not res.noop and res.version == "2"
