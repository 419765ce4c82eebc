"""tierserve_compiler.vllm: the GPU tier's Triton entry for a generative model (issue 18), and the pinned vLLM engine
arguments every model.json is checked against."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.support.genai_store import tierserve_compile
from tierserve.manifest import Manifest
from tierserve_compiler import vllm
from tierserve_compiler.causal_lm import INPUTS, OUTPUTS
from tierserve_compiler.data import sha256_file
from tierserve_compiler.sagemaker import package, unpack


@pytest.fixture(scope="module")
def gpu_store(tmp_path_factory, tiny_llama_hf, genai_validation) -> Path:
    """tiny-llama compiled with --target both: a CPU variant and the GPU tier's vLLM entry."""
    out = tmp_path_factory.mktemp("gpu-store")
    proc = tierserve_compile(str(tiny_llama_hf), "--name", "tl", "--quantize", "none", "--target", "both",
                             "--validation", str(genai_validation), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# --- the pinned engine arguments -----------------------------------------------------------------------------


def test_the_pinned_list_names_its_vllm_version_its_container_and_its_sources():
    pin = vllm.pinned()
    assert pin["vllm_version"] == "0.5.5"
    assert pin["triton_image"] == "nvcr.io/nvidia/tritonserver:24.12-vllm-python-py3"
    assert "arg_utils.py" in pin["sources"]["fields and choices"]
    assert "release_notes" in pin["sources"]["vllm_version of the Triton image"]
    # AsyncEngineArgs = EngineArgs' fields + its own two
    assert {"model", "max_model_len", "gpu_memory_utilization", "enforce_eager", "dtype", "engine_use_ray",
            "disable_log_requests"} <= set(pin["fields"])
    assert pin["choices"]["dtype"] == ["auto", "half", "float16", "bfloat16", "float", "float32"]


def test_the_engine_arguments_the_compiler_writes_are_all_pinned_vllm_arguments():
    args = vllm.engine_args("m", "3", context_length=2048, dtype="bfloat16")
    vllm.check_engine_args(args)  # the check the compiler runs: would raise on any key vLLM 0.5.5 does not know
    assert set(args) <= set(vllm.pinned()["fields"])
    assert args["model"] == args["tokenizer"] == "/models/m/3/hf"
    assert args["max_model_len"] == 2048 and args["dtype"] == "bfloat16"
    assert 0 < args["gpu_memory_utilization"] <= 0.95 and args["enforce_eager"] is False


@pytest.mark.parametrize(("args", "message"), [
    ({"max_model_length": 2048}, "'max_model_len'"),  # misspelt: fails here, not when Triton loads the model
    ({"gpu_memory_utilisation": 0.9}, "'gpu_memory_utilization'"),
    ({"enforce_eager": "yes"}, "does not fit"),
    ({"dtype": "fp16"}, "choices"),
    ({"max_model_len": 1.5}, "does not fit"),
])
def test_a_misspelt_or_mistyped_engine_argument_is_refused_naming_it(args, message):
    with pytest.raises(vllm.EngineArgsError, match=message):
        vllm.check_engine_args({"model": "/models/m/1/hf", **args})


def test_the_model_config_is_the_vllm_backends_decoupled_entry():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = text_format.Parse(vllm.config_pbtxt("m", list(INPUTS), list(OUTPUTS)), mc.ModelConfig())
    assert cfg.backend == "vllm" and not cfg.platform
    assert cfg.model_transaction_policy.decoupled is True and cfg.max_batch_size == 0
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in cfg.input] == [
        ("text_input", "TYPE_STRING", [1], False), ("stream", "TYPE_BOOL", [1], True),
        ("sampling_parameters", "TYPE_STRING", [1], True), ("exclude_input_in_output", "TYPE_BOOL", [1], True)]
    assert [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output] == [
        ("text_output", "TYPE_STRING", [-1])]
    assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_MODEL]


# --- what the compiler writes for a GPU-placed causal LM -------------------------------------------------------


def test_a_gpu_placed_causal_lm_gets_a_vllm_entry_and_content_addressed_weights(gpu_store, tiny_llama_hf):
    mv = Manifest.loads((gpu_store / "manifest.json").read_text()).resolve("tl")
    assert mv.targets == ("gpu", "cpu")
    weights = mv.generation.hf_weights
    assert weights is not None and weights.path == "tl/1/hf/config.json"
    names = {Path(f.path).name for f in weights.files()}
    assert "model.safetensors" in names and "tokenizer.json" in names and "tokenizer_config.json" in names
    # every weight file is listed with its sha256 and size, at its path in the store, and equals the source's
    for f in weights.files():
        assert sha256_file(gpu_store / f.path) == f.sha256 and (gpu_store / f.path).stat().st_size == f.size_bytes
        assert (gpu_store / f.path).read_bytes() == (tiny_llama_hf / Path(f.path).name).read_bytes()
    # the Triton entry: config, model.json (checked against the pinned list), the weights beside it
    vdir = gpu_store / "triton" / "tl" / "1"
    args = json.loads((vdir / "model.json").read_text())
    vllm.check_engine_args(args)
    assert args["model"] == "/models/tl/1/hf" and args["max_model_len"] == mv.generation.context_length
    assert {p.name for p in (vdir / "hf").iterdir()} == names
    cfg = (gpu_store / "triton" / "tl" / "config.pbtxt").read_text()
    assert 'backend: "vllm"' in cfg and "decoupled: true" in cfg and "versions: 1" in cfg
    report = json.loads((gpu_store / "tl" / "1" / "report.json").read_text())
    assert report["gpu_entry"]["image"] == vllm.pinned()["triton_image"]


def test_sagemaker_package_carries_the_vllm_entry_with_weights_where_sagemaker_unpacks_them(gpu_store, tmp_path):
    pkg = package(gpu_store, "tl", out_dir=tmp_path / "sm")
    assert pkg.variant == "vllm" and pkg.path.name == "tl-1.tar.gz"
    with tarfile.open(pkg.path) as tar:
        members = sorted(tar.getnames())
    assert "tl/config.pbtxt" in members and "tl/1/model.json" in members and "tl/1/hf/model.safetensors" in members
    root = unpack(pkg.path, tmp_path / "opt-ml-model")
    args = json.loads((root / "tl" / "1" / "model.json").read_text())
    vllm.check_engine_args(args)
    assert args["model"] == args["tokenizer"] == "/opt/ml/model/tl/1/hf"
    assert 'backend: "vllm"' in pkg.config and "decoupled: true" in pkg.config and "versions: 1" in pkg.config
    # the archive is reproducible
    assert package(gpu_store, "tl", out_dir=tmp_path / "sm2").sha256 == pkg.sha256


def test_sagemaker_package_refuses_weights_that_changed_after_compiling(gpu_store, tmp_path):
    import shutil

    from tierserve_compiler.sagemaker import PackageError

    copy = tmp_path / "store"
    shutil.copytree(gpu_store, copy)
    (copy / "triton" / "tl" / "1" / "hf" / "tokenizer.json").unlink()
    (copy / "triton" / "tl" / "1" / "hf" / "tokenizer.json").write_text("{}")
    with pytest.raises(PackageError, match=r"tokenizer\.json: sha256"):
        package(copy, "tl", out_dir=tmp_path / "sm")
