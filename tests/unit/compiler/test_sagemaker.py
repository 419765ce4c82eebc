"""model.tar.gz for SageMaker's Triton container: layout, production config, fp16, determinism, refusals."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
from google.protobuf import text_format

from tests.support.fakes import X_SPEC, Y_SPEC
from tests.support.models import linear_onnx, write_model
from tierserve_compiler.sagemaker import PackageError, package, unpack
from tierserve_compiler.triton import write_triton_repo


def _parse(text: str):
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _store(root: Path, name: str = "lin", version: str = "3", targets=("gpu", "cpu"), fp16: bool = False) -> bytes:
    """A compiled store with ``name`` v``version``; the Triton repository holds fp16.onnx when ``fp16``."""
    data, _, _ = linear_onnx(seed=2)
    mv = write_model(root, name, version, data, (X_SPEC,), (Y_SPEC,), targets=targets, max_batch_size=16)
    gpu_file = root / name / version / "model.onnx"
    if fp16:  # stand-in bytes for the fp16 variant, listed in the manifest like the compiler lists it
        from tierserve.manifest import Manifest, Variant

        fp16_bytes = linear_onnx(seed=3)[0]
        gpu_file = root / name / version / "fp16.onnx"
        gpu_file.write_bytes(fp16_bytes)
        variant = Variant(f"{name}/{version}/fp16.onnx", hashlib.sha256(fp16_bytes).hexdigest(), len(fp16_bytes))
        mv = type(mv)(**{**mv.__dict__, "variants": {**mv.variants, "fp16": variant}})
        manifest = Manifest.loads((root / "manifest.json").read_text())
        (root / "manifest.json").write_text(manifest.with_version(mv).dumps())
    if "gpu" in targets:
        write_triton_repo(root, name, version, gpu_file, [X_SPEC], [Y_SPEC], 16)
    return gpu_file.read_bytes()


def test_the_archive_holds_a_triton_repository_with_the_production_config(tmp_path):
    # Given a GPU-placed model (fp32 GPU variant) compiled into a store
    onnx_bytes = _store(tmp_path / "models")
    # When it is packaged
    pkg = package(tmp_path / "models", "lin")
    # Then the archive is NAME/config.pbtxt + NAME/VERSION/model.onnx, named NAME-VERSION.tar.gz
    assert pkg.path == tmp_path / "models" / "sagemaker" / "lin-3.tar.gz"
    with tarfile.open(pkg.path) as tar:
        files = sorted(m.name for m in tar.getmembers() if m.isfile())
        assert files == ["lin/3/model.onnx", "lin/config.pbtxt"]
        assert tar.extractfile("lin/3/model.onnx").read() == onnx_bytes
        cfg = _parse(tar.extractfile("lin/config.pbtxt").read().decode())
    # And the config is onnxruntime on GPU instances, this version alone, no TensorRT for an fp32 model
    assert cfg.platform == "onnxruntime_onnx" and cfg.name == "lin" and cfg.max_batch_size == 16
    assert [g.kind for g in cfg.instance_group] == [1]  # KIND_GPU: onnxruntime's CUDA execution provider
    assert list(cfg.version_policy.specific.versions) == [3]
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert pkg.variant == "fp32" and list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]


def test_the_fp16_variant_keeps_tensorrt_fp16(tmp_path):
    _store(tmp_path / "models", fp16=True)
    pkg = package(tmp_path / "models", "lin", "3")
    acc = _parse(pkg.config).optimization.execution_accelerators.gpu_execution_accelerator
    assert pkg.variant == "fp16"
    assert [(a.name, a.parameters["precision_mode"]) for a in acc] == [("tensorrt", "FP16")]


def test_packaging_twice_gives_the_same_bytes_and_unpacks_like_sagemaker(tmp_path):
    _store(tmp_path / "models")
    first = package(tmp_path / "models", "lin", out_dir=tmp_path / "a")
    second = package(tmp_path / "models", "lin", out_dir=tmp_path / "b")
    assert first.sha256 == second.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    opt_ml_model = unpack(first.path, tmp_path / "opt-ml-model")
    assert (opt_ml_model / "lin" / "config.pbtxt").is_file() and (opt_ml_model / "lin" / "3" / "model.onnx").is_file()


def test_a_cpu_only_model_or_a_missing_repository_is_refused_with_what_to_do(tmp_path):
    _store(tmp_path / "models", name="cpuonly", targets=("cpu",))
    with pytest.raises(PackageError, match="--target gpu"):
        package(tmp_path / "models", "cpuonly")
    with pytest.raises(PackageError, match="compile the model first"):
        package(tmp_path / "empty", "lin")


def test_a_repository_that_matches_no_manifest_variant_is_refused(tmp_path):
    _store(tmp_path / "models")
    (tmp_path / "models" / "triton" / "lin" / "3" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(PackageError, match="matches no variant"):
        package(tmp_path / "models", "lin")


def test_the_versions_own_config_is_the_base_and_stays_out_of_the_version_folder(tmp_path):
    # Given the compiler's layout since lifecycle: triton/NAME/VERSION/config.pbtxt beside the model
    from tierserve_compiler.triton import config_pbtxt

    _store(tmp_path / "models")
    vdir = tmp_path / "models" / "triton" / "lin" / "3"
    (vdir / "config.pbtxt").write_text(config_pbtxt("lin", [X_SPEC], [Y_SPEC], 8))
    # When it is packaged
    pkg = package(tmp_path / "models", "lin")
    # Then that version's signature (max_batch_size 8) is what the archive serves, and the file is not copied twice
    assert _parse(pkg.config).max_batch_size == 8
    with tarfile.open(pkg.path) as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == ["lin/3/model.onnx", "lin/config.pbtxt"]
