"""Publishing a compiled version into a model store (operator tooling; runs where `tierserve models` runs).

``publish_version(DIR/NAME/VERSION, objects, registry)`` does four things, in this order, so that a reader
of the store never sees a version whose files are not all there:

1. refuses a version that the store already holds with other content (before uploading anything);
2. uploads the artifacts content-addressed, ``_objects/<digest of the variant>/<file>`` (``Variant.digest``:
   all of the variant's files, so two versions sharing a ``model.onnx`` with other weights, tokenizer or chat
   template never share, or overwrite, a prefix; a model with no other file keeps its sha256 as before), the
   external data beside the model under the name the model refers to, skipping every object whose sha256 is
   already there, so republishing, or publishing a version that shares a variant with an older one, uploads
   nothing twice; the manifest entry it commits points at these keys. When the store IS the compiler's folder, the
   files are already in place and are not copied;
3. uploads the Triton repository of a GPU-placed version, ``triton/NAME/VERSION/`` with its own config, and its
   SageMaker archive, ``sagemaker/NAME-VERSION.tar.gz`` (``tierserve_compiler.sagemaker``: what a SageMaker
   endpoint running Triton's container serves; template.yaml's ``GpuModelDataUrl``);
4. commits the manifest entry (``Registry.publish``: If-Match, re-read and merge on 412), then rewrites
   ``triton/NAME/config.pbtxt`` to list the published GPU versions (``sync_triton_config``).

Publishing changes what is served only with ``promote`` or ``canary``.
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierserve.errors import ConflictError, InvalidNameError, LifecycleError, ManifestError
from tierserve.lifecycle.objects import FolderObjects, ObjectStore
from tierserve.lifecycle.registry import Registry
from tierserve.lifecycle.triton_repo import (
    TRITON_DIR,
    config_revision,
    gpu_versions,
    model_config_key,
    model_config_text,
    version_config_key,
)
from tierserve.manifest import MANIFEST_FILE, Manifest, ModelVersion, Variant, check_model_name, check_version
from tierserve.store import sha256_file

OBJECTS_PREFIX = "_objects"


@dataclass
class PublishResult:
    record: dict[str, Any]
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    triton: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_compiled(version_dir: Path) -> tuple[Path, ModelVersion]:
    """The compiler's folder and the manifest entry of ``DIR/NAME/VERSION``."""
    version_dir = Path(version_dir)
    root = version_dir.parent.parent
    manifest_path = root / MANIFEST_FILE
    try:
        name, version = check_model_name(version_dir.parent.name), check_version(version_dir.name)
    except InvalidNameError:
        name = version = ""
    if not name or not version_dir.is_dir() or not manifest_path.is_file():
        raise LifecycleError(f"{version_dir} is not a compiled version: expected DIR/NAME/VERSION next to "
                             f"DIR/{MANIFEST_FILE} (tierserve compile ... --out DIR)")
    manifest = Manifest.loads(manifest_path.read_text())
    entry = manifest.models.get(name)
    mv = entry.versions.get(version) if entry else None
    if mv is None:
        raise LifecycleError(f"{manifest_path} has no {name} version {version}; compile it first")
    return root, mv


def _same_folder(objects: ObjectStore, root: Path) -> bool:
    return isinstance(objects, FolderObjects) and objects.root.resolve() == root.resolve()


def content_addressed(variant: Variant) -> Variant:
    """The variant as the store keeps it: ``_objects/<Variant.digest>/<file>``, external data beside it."""
    folder = f"{OBJECTS_PREFIX}/{variant.digest}"
    exts = tuple(dataclasses.replace(e, path=f"{folder}/{variant.location(e)}") for e in variant.external_data)
    return Variant(f"{folder}/{posixpath.basename(variant.path)}", variant.sha256, variant.size_bytes, exts)


def _upload(objects: ObjectStore, src: Path, key: str, sha256: str, result: PublishResult) -> None:
    if sha256_file(src) != sha256:
        raise LifecycleError(f"{src} does not match its sha256 in the compiler's manifest; recompile the version")
    if objects.sha256(key) == sha256:
        result.skipped.append(key)
        return
    objects.put_file(key, src, sha256)
    result.uploaded.append(key)


def publish_version(version_dir: Path, objects: ObjectStore, registry: Registry, *, promote: bool = False,
                    canary: float | None = None, why: str = "") -> PublishResult:
    root, mv = read_compiled(version_dir)
    current = registry.manifest().models.get(mv.name)
    existing = current.versions.get(mv.version) if current else None
    if existing is not None and _digests(existing) != _digests(mv):
        raise LifecycleError(f"{mv.name} version {mv.version} is already published in {objects.uri} with different "
                             "content; versions are immutable: compile a new version")
    result = PublishResult(record={})
    if _same_folder(objects, root):
        stored = mv
        result.notes.append(f"the store is the compiler's folder {root}: the artifacts are already in place")
    else:
        variants = {}
        for key, variant in mv.variants.items():
            target = content_addressed(variant)
            for src, dst in zip(variant.files(), target.files(), strict=True):
                _upload(objects, root / src.path, dst.path, src.sha256, result)
            variants[key] = target
        stored = dataclasses.replace(mv, variants=variants)
        if mv.serves_gpu:
            result.triton = _upload_triton(root, objects, mv, result)
    if mv.serves_gpu:
        result.notes.append(_sagemaker_archive(root, objects, mv, result))
    result.record = registry.publish(stored, promote=promote, canary=canary, why=why)
    if mv.serves_gpu:
        result.notes += sync_triton_config(objects, registry, mv.name)
    return result


def _upload_triton(root: Path, objects: ObjectStore, mv: ModelVersion, result: PublishResult) -> list[str]:
    src = root / TRITON_DIR / mv.name / mv.version
    if not (src / "model.onnx").is_file():
        raise LifecycleError(f"{mv.name} v{mv.version} targets the GPU tier but {src}/model.onnx is missing; "
                             "recompile it")
    if not (src / "config.pbtxt").is_file():
        raise LifecycleError(f"{src}/config.pbtxt (the version's own Triton config) is missing: this version was "
                             "compiled by an older tierserve; recompile it")
    keys = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        key = f"{TRITON_DIR}/{mv.name}/{mv.version}/{path.relative_to(src).as_posix()}"
        _upload(objects, path, key, sha256_file(path), result)
        keys.append(key)
    return keys


def _sagemaker_archive(root: Path, objects: ObjectStore, mv: ModelVersion, result: PublishResult) -> str:
    """Package the version for SageMaker (into the compiler's folder) and upload it beside the Triton repository."""
    from tierserve_compiler.sagemaker import SAGEMAKER_DIR, package

    pkg = package(root, mv.name, mv.version)
    key = f"{SAGEMAKER_DIR}/{pkg.path.name}"
    if not _same_folder(objects, root):
        _upload(objects, pkg.path, key, pkg.sha256, result)
    return (f"SageMaker model data ({pkg.variant} variant): {objects.uri.rstrip('/')}/{key} "
            f"(GpuTier=sagemaker: GpuModelDataUrl, GpuModelName={mv.name}, GpuModelVersion={mv.version})")


def sync_triton_config(objects: ObjectStore, registry: Registry, name: str, attempts: int = 20) -> list[str]:
    """Rewrite ``triton/NAME/config.pbtxt`` to serve the published GPU versions of ``name`` (conditional write;
    a config derived from a newer manifest revision is never overwritten by an older one). Returns notes."""
    for _ in range(attempts):
        manifest = registry.manifest()
        versions = gpu_versions(manifest, name)
        if not versions:
            return [f"{name}: no published GPU version; triton/{name}/config.pbtxt left as it is"]
        configs = {}
        for v in versions:
            got = objects.get(version_config_key(name, v))
            if got is None:
                raise ManifestError(f"{version_config_key(name, v)} is missing from {objects.uri}; publish "
                                    f"{name} v{v} again")
            configs[v] = got[0].decode()
        text, left_out = model_config_text(name, configs, manifest.revision)
        current = objects.get(model_config_key(name))
        if current is not None and config_revision(current[0].decode()) > manifest.revision:
            return []  # a writer with a newer manifest already wrote it
        try:
            if current is None:
                objects.put(model_config_key(name), text.encode(), if_none_match=True)
            elif current[0].decode() != text:
                objects.put(model_config_key(name), text.encode(), if_match=current[1])
        except ConflictError:
            continue
        notes = [f"triton/{name}/config.pbtxt serves versions {', '.join(versions)}"]
        if left_out:
            notes.append(f"left out of the GPU tier (other signature): {', '.join(left_out)}")
        return notes
    raise ConflictError(f"triton/{name}/config.pbtxt kept changing; run the command again")


def _digests(mv: ModelVersion) -> dict[str, str]:
    """Each variant's identity, all of its files (where the store keeps them does not change it)."""
    return {k: v.digest for k, v in mv.variants.items()}
