"""Triton repository layout and config.pbtxt round-trip; manifest contents; immutability."""

from __future__ import annotations

import json

import pytest
from compiler_testlib import make_mlp_onnx
from google.protobuf import text_format

from tierserve.manifest import Manifest, TensorSpec
from tierserve_compiler.errors import ArtifactExistsError
from tierserve_compiler.pipeline import compile_model
from tierserve_compiler.triton import config_pbtxt


def parse(text: str):
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_config_pbtxt_round_trips_into_model_config():
    # Given a two-input, two-output model with a dynamic sequence axis
    ins = [TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1))]
    outs = [TensorSpec("last_hidden_state", "FP32", (-1, -1, 384)), TensorSpec("sentence_embedding", "FP32", (-1, 384))]
    # When the config is rendered with batching, TensorRT fp16 and warm-up
    cfg = parse(config_pbtxt("minilm", ins, outs, 64))
    # Then it parses into ModelConfig with batch-less dims and every section
    assert cfg.name == "minilm" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input_ids", [-1]), ("attention_mask", [-1])]
    assert [list(o.dims) for o in cfg.output] == [[-1, 384], [384]]
    assert cfg.input[0].data_type == 9 and cfg.output[0].data_type == 11  # TYPE_INT64, TYPE_FP32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32, 64]
    assert cfg.instance_group[0].kind == 1 and cfg.instance_group[0].count == 1  # KIND_GPU
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert cfg.model_warmup[0].inputs["input_ids"].zero_data


def test_config_without_batching_keeps_full_dims():
    cfg = parse(
        config_pbtxt(
            "fixed",
            [TensorSpec("x", "FP32", (1, 3))],
            [TensorSpec("y", "FP32", (1, 2))],
            0,
            tensorrt_fp16=False,
            warmup=False,
        )
    )
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 3]
    assert not cfg.HasField("dynamic_batching") and not cfg.HasField("optimization")


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
    # When different content is compiled without --version / Then it becomes v2 and the default
    other = make_mlp_onnx(tmp_path / "other.onnx", seed=7)
    second = compile_model(cfg_for(other, "m", quantize="none"))
    assert second.version == "2"
    assert Manifest.loads((tmp_path / "models" / "manifest.json").read_text()).models["m"].default_version == "2"


def test_recompiling_a_version_with_different_content_is_refused(mlp_onnx, tmp_path, cfg_for):
    # Given v1 exists
    compile_model(cfg_for(mlp_onnx, "m", quantize="none", version="1"))
    before = (tmp_path / "models" / "m" / "1" / "model.onnx").read_bytes()
    # When other content is compiled as v1 / Then it is refused and v1 is untouched
    other = make_mlp_onnx(tmp_path / "other.onnx", seed=3)
    with pytest.raises(ArtifactExistsError, match=r"immutable.*omit --version to get version 2"):
        compile_model(cfg_for(other, "m", quantize="none", version="1"))
    assert (tmp_path / "models" / "m" / "1" / "model.onnx").read_bytes() == before
