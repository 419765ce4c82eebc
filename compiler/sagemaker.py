"""A GPU-placed model version packaged the way SageMaker's Triton container expects: ``model.tar.gz``.

SageMaker downloads an endpoint's ``ModelDataUrl`` (a ``.tar.gz``), unpacks it into
``/opt/ml/model`` and NVIDIA's image starts ``tritonserver`` on that folder as its model repository,
serving ``SAGEMAKER_TRITON_DEFAULT_MODEL_NAME`` at ``/invocations``. A multi-model endpoint does the
same per ``TargetModel`` archive under its S3 prefix. So the archive holds a Triton repository::

    NAME/config.pbtxt
    NAME/VERSION/model.onnx          (the GPU variant the compiler kept: fp16 where it kept one)
    NAME/VERSION/<file>.data         (its external data, if any)

The production config is the compiler's own (``tierserve_compiler.triton``: names, dims,
``max_batch_size``, dynamic batching, warm-up) with three changes, because one archive is one
deployable unit:

* ``platform: "onnxruntime_onnx"`` on ``KIND_GPU`` instances, so onnxruntime runs on its CUDA
  execution provider;
* ``version_policy: specific`` with this version alone (the endpoint serves exactly what it was
  deployed with; a new version is a new archive and a new endpoint config, or a new ``TargetModel``);
* the TensorRT execution accelerator (FP16) is kept only when the archive holds the fp16 variant:
  an fp32 model on TensorRT FP16 would compute something the accuracy gate never checked, and
  TensorRT builds its engines at load, which a SageMaker health check may not wait for.

A generative version (a causal LM, issue 18) has a vLLM entry instead (``tierserve_compiler.vllm``): its archive
holds ``NAME/config.pbtxt`` (``backend: "vllm"``, decoupled, this version alone), ``NAME/VERSION/model.json`` with
the weights' path rewritten to ``/opt/ml/model/NAME/VERSION/hf`` (vLLM reads an absolute path) and the weights
themselves, each checked against the manifest's sha256 first. The endpoint serving it sets
``SAGEMAKER_TRITON_INFERENCE_TYPE=generate_stream`` and runs NVIDIA's vLLM image (docs/deploy.md).

The archive is deterministic (sorted members, fixed owner and times), so publishing the same
version twice gives the same bytes and the same sha256. The file is named ``NAME-VERSION.tar.gz``,
which serves both as a single-model endpoint's ``ModelDataUrl`` and as a multi-model endpoint's
``TargetModel`` (``SAGEMAKER_TARGET_MODEL={name}-{version}.tar.gz``).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tierserve_compiler.data import sha256_file
from tierserve_compiler.errors import CompilerError

SAGEMAKER_DIR = "sagemaker"


class PackageError(CompilerError):
    """The model version cannot be packaged for SageMaker (says what to do)."""


@dataclass(frozen=True)
class Package:
    path: Path
    name: str
    version: str
    variant: str
    sha256: str
    size_bytes: int
    config: str

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def archive_name(name: str, version: str) -> str:
    return f"{name}-{version}.tar.gz"


def production_config(config_text: str, version: str, fp16: bool) -> str:
    """The archive's ``config.pbtxt`` from the compiler's (see the module docstring)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = mc.ModelConfig()
    text_format.Parse(config_text, cfg)
    cfg.platform = "onnxruntime_onnx"
    cfg.ClearField("backend")
    cfg.version_policy.Clear()
    cfg.version_policy.specific.versions.append(int(version))
    del cfg.instance_group[:]
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    accelerators = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    kept = [a for a in accelerators if a.name != "tensorrt"]
    del accelerators[:]
    accelerators.extend(kept)
    if fp16:
        trt = accelerators.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16"
        trt.parameters["max_workspace_size_bytes"] = "1073741824"
    if not accelerators:
        cfg.ClearField("optimization")
    return str(text_format.MessageToString(cfg))


def _gpu_variant(models: Path, name: str, version: str, model_file: Path) -> str:
    """Which manifest variant the Triton repository holds (by sha256): ``fp16``, ``fp32``, ..."""
    from tierserve.manifest import Manifest

    manifest = Manifest.loads((models / "manifest.json").read_bytes())
    mv = manifest.resolve(name, version)
    digest = sha256_file(model_file)
    for key, variant in mv.variants.items():
        if variant.sha256 == digest:
            return key
    raise PackageError(f"{model_file} matches no variant of {name} v{version} in the manifest (sha256 {digest[:12]}); "
                       "recompile the model")


def package(models: Path | str, name: str, version: str | None = None, out_dir: Path | str | None = None) -> Package:
    """Write ``OUT/NAME-VERSION.tar.gz`` (default OUT: ``MODELS/sagemaker``) for a GPU-placed model version."""
    from tierserve.manifest import Manifest

    models = Path(models)
    manifest_path = models / "manifest.json"
    if not manifest_path.is_file():
        raise PackageError(f"no manifest.json in {models}; compile the model first (tierserve compile)")
    mv = Manifest.loads(manifest_path.read_bytes()).resolve(name, version)
    version = mv.version
    if not mv.serves_gpu:
        raise PackageError(f"{name} v{version} is not placed on the GPU tier (targets {list(mv.targets)}); "
                           "recompile it with --target gpu or --target both to serve it from SageMaker")
    src = models / "triton" / name
    vdir = src / version
    out = Path(out_dir) if out_dir is not None else models / SAGEMAKER_DIR
    if (vdir / "model.json").is_file():
        return _package_vllm(mv, vdir, out)
    # The version's own config (the compiler keeps one beside its files); else the model's, from older compilers.
    own = vdir / "config.pbtxt" if (vdir / "config.pbtxt").is_file() else src / "config.pbtxt"
    if not own.is_file() or not (vdir / "model.onnx").is_file():
        raise PackageError(f"{own} or {vdir}/model.onnx is missing; recompile {name} v{version}")
    variant = _gpu_variant(models, name, version, vdir / "model.onnx")
    config = production_config(own.read_text(), version, fp16=variant == "fp16")
    out.mkdir(parents=True, exist_ok=True)
    dest = out / archive_name(name, version)
    members: list[tuple[str, bytes | Path]] = [(f"{name}/config.pbtxt", config.encode())]
    for f in sorted(p for p in vdir.rglob("*") if p.is_file() and p != vdir / "config.pbtxt"):
        if f.is_symlink():
            raise PackageError(f"{f} is a symbolic link; refusing to package it")
        members.append((f"{name}/{version}/{f.relative_to(vdir).as_posix()}", f))
    tmp = dest.with_name(f".{dest.name}.tmp")
    _write_tar(tmp, members)
    os.replace(tmp, dest)
    return Package(dest, name, version, variant, sha256_file(dest), dest.stat().st_size, config)


def _package_vllm(mv: Any, vdir: Path, out: Path) -> Package:
    """A generative version's archive: its vLLM entry (``tierserve_compiler.vllm``) with ``model.json`` pointing at
    the weights where SageMaker unpacks them (``/opt/ml/model/NAME/VERSION/hf``), each weight file checked against
    the manifest's sha256 (GenerationSpec.hf_weights) before it goes in."""
    import posixpath

    from tierserve_compiler import vllm

    name, version = mv.name, mv.version
    weights = mv.generation.hf_weights if mv.generation is not None else None
    if weights is None:
        raise PackageError(f"{name} v{version} has a vLLM entry but its manifest lists no hf_weights; recompile it")
    listed = {posixpath.basename(f.path): f.sha256 for f in weights.files()}
    hf = vdir / vllm.HF_DIR
    present = {p.name for p in hf.iterdir() if p.is_file()} if hf.is_dir() else set()
    if present != set(listed):
        raise PackageError(f"{hf} holds {sorted(present)}, the manifest lists {sorted(listed)}; recompile "
                           f"{name} v{version}")
    for fname, sha in sorted(listed.items()):
        got = sha256_file(hf / fname)
        if got != sha:
            raise PackageError(f"{hf / fname}: sha256 {got[:12]}... is not the manifest's {sha[:12]}...; the weights "
                               "changed after compiling: recompile the model")
    args = json.loads((vdir / vllm.MODEL_JSON).read_text())
    model_json = vllm.model_json_text(args, root=vllm.SAGEMAKER_REPOSITORY_ROOT)
    config = vllm.config_pbtxt(name, list(mv.inputs), list(mv.outputs), version=version)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / archive_name(name, version)
    members: list[tuple[str, bytes | Path]] = [
        (f"{name}/config.pbtxt", config.encode()),
        (f"{name}/{version}/{vllm.MODEL_JSON}", model_json.encode()),
        *((f"{name}/{version}/{vllm.HF_DIR}/{fname}", hf / fname) for fname in sorted(listed)),
    ]
    tmp = dest.with_name(f".{dest.name}.tmp")
    _write_tar(tmp, members)
    os.replace(tmp, dest)
    return Package(dest, name, version, "vllm", sha256_file(dest), dest.stat().st_size, config)


def _write_tar(path: Path, members: list[tuple[str, bytes | Path]]) -> None:
    """A reproducible .tar.gz: fixed mtime, owner and modes; directories listed before their files."""
    dirs: list[str] = []
    for arcname, _ in members:
        parts = arcname.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.append(d)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for arcname, content in members:
            info = tarfile.TarInfo(arcname)
            info.mode, info.mtime = 0o644, 0
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.size = content.stat().st_size
                with open(content, "rb") as f:
                    tar.addfile(info, f)


def unpack(archive: Path | str, dest: Path | str) -> Path:
    """Unpack an archive as SageMaker does into ``/opt/ml/model`` (regular files and folders only)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def upload(pkg: Package, s3_uri: str, client: Any = None) -> str:
    """Upload to ``s3://bucket/prefix/NAME-VERSION.tar.gz``; returns the object's URI (the ModelDataUrl)."""
    if not s3_uri.startswith("s3://"):
        raise PackageError(f"--upload needs an s3://bucket/prefix URI, got {s3_uri!r}")
    bucket, _, prefix = s3_uri[len("s3://"):].partition("/")
    key = "/".join(p for p in (prefix.strip("/"), pkg.path.name) if p)
    if client is None:
        import boto3

        client = boto3.client("s3")
    client.upload_file(str(pkg.path), bucket, key, ExtraArgs={"Metadata": {"sha256": pkg.sha256}})
    return f"s3://{bucket}/{key}"


# --- CLI -----------------------------------------------------------------------------------------


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser(
        "sagemaker-package",
        help="package a GPU-placed model version as a SageMaker model.tar.gz (Triton repository)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("name", help="the GPU-placed model to package")
    p.add_argument("--version", default=None, help="default: the model's default version")
    p.add_argument("--models", type=Path, default=Path("build/models"), help="the compiler's output folder")
    p.add_argument("--out", type=Path, default=None, help="default: MODELS/sagemaker")
    p.add_argument("--upload", default=None, metavar="S3_URI", help="also upload to s3://bucket/prefix")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    pkg = package(args.models, args.name, args.version, args.out)
    info = pkg.to_json()
    info.pop("config")
    if args.upload:
        info["model_data_url"] = upload(pkg, args.upload)
    print(json.dumps(info, indent=2))
    return 0
