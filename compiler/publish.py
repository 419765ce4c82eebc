"""Publishing a compiled version: the only code that writes into the model store.

Order matters, so that a reader of the store never sees a half-written version: the artifacts
move from the staging folder into ``DIR/NAME/VERSION``, then the Triton repository and the reports
are written, and the manifest entry comes last (under a lock, temp file + ``os.replace``). A
version is immutable: :func:`existing_version` answers "already there" for the same content and
refuses different content.

Compiling does not change what is served: a new version of an existing model is listed in the manifest
but is not made its default (the first version of a model is its default, there being no other). Publishing
to a store and promoting are `tierserve models publish` / `promote` (``tierserve.lifecycle``). A GPU-placed
version keeps its own Triton config in ``triton/NAME/VERSION/config.pbtxt``; the model's config lists the
listed GPU versions (``version_policy: specific``, ``tierserve.lifecycle.triton_repo``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tierserve.errors import InvalidNameError
from tierserve.lifecycle.triton_repo import gpu_versions, model_config_text
from tierserve.manifest import (
    MANIFEST_FILE,
    ExternalFile,
    Manifest,
    ModelVersion,
    Variant,
    check_model_name,
    check_version,
)
from tierserve_compiler.config import CompileConfig
from tierserve_compiler.data import sha256_file
from tierserve_compiler.errors import ArtifactExistsError, ConfigError
from tierserve_compiler.external_data import locations
from tierserve_compiler.report import write_report
from tierserve_compiler.triton import write_triton_repo
from tierserve_compiler.variants import REFERENCE


def read_manifest(out_dir: Path) -> Manifest:
    p = Path(out_dir) / MANIFEST_FILE
    return Manifest.loads(p.read_text()) if p.exists() else Manifest.empty()


def next_version(manifest: Manifest, name: str) -> str:
    entry = manifest.models.get(name)
    return str(max((int(v) for v in entry.versions), default=0) + 1) if entry else "1"


@contextlib.contextmanager
def _manifest_lock(out_dir: Path) -> Iterator[None]:
    with open(Path(out_dir) / ".manifest.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_manifest_entry(out_dir: Path, mv: ModelVersion) -> Path:
    """Add ``mv`` to ``DIR/manifest.json`` atomically (temp file + os.replace), keeping other models; a new
    version of an existing model is listed, not made the default."""
    out_dir = Path(out_dir)
    with _manifest_lock(out_dir):
        manifest = read_manifest(out_dir).with_version(mv, make_default=False)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".manifest-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            fh.write(manifest.dumps())
        os.replace(tmp, out_dir / MANIFEST_FILE)
    return out_dir / MANIFEST_FILE


def checked_name_version(cfg: CompileConfig, manifest: Manifest) -> tuple[str, str]:
    """NAME and VERSION through the runtime's own allowlists (a trailing newline included), or the next
    version after the highest one; a bad one is a :class:`ConfigError` before any work."""
    try:
        name = check_model_name(cfg.name)
        return name, check_version(str(cfg.version)) if cfg.version else next_version(manifest, name)
    except InvalidNameError as exc:
        raise ConfigError(f"{exc.message} (--name / --version)") from exc


def _content(v: Variant) -> str:
    """What identifies a variant's content: ``Variant.digest``, each file's sha256 at its location beside the
    model (the version folder it sits in does not change it)."""
    return v.digest


def existing_version(
    manifest: Manifest, out_dir: Path, name: str, version: str, fp32: Variant, explicit: bool,
    reference: str = REFERENCE,
) -> ModelVersion | None:
    """The version that already holds this fp32 content, external data included (a no-op compile), or
    None to write a new one.

    Raises :class:`ArtifactExistsError` when the version exists with other content, or when its
    folder exists without a manifest entry (an interrupted compile).
    """
    entry = manifest.models.get(name)
    mv = entry.versions.get(version) if entry else None
    if mv is None and not explicit and entry:
        latest = entry.versions[max(entry.versions, key=int)]
        same = reference in latest.variants and _content(latest.variants[reference]) == _content(fp32)
        return latest if same else None
    if mv is None:
        vdir = out_dir / name / version
        if vdir.exists() and any(vdir.iterdir()):
            raise ArtifactExistsError(
                f"{vdir} exists but is not in the manifest (an interrupted compile?); "
                "artifacts are immutable: delete that folder or compile another --version"
            )
        return None
    if reference in mv.variants and _content(mv.variants[reference]) == _content(fp32):
        return mv
    held = mv.variants.get(reference)
    raise ArtifactExistsError(
        f"{name} version {version} already exists with different content ({reference} sha256 "
        f"{held.sha256[:12] if held else 'absent'}... != {fp32.sha256[:12]}..., or other external data); "
        "artifacts are immutable: omit --version "
        f"to get version {next_version(manifest, name)}, or pick an unused --version"
    )


def _record(path: Path, store_path: str) -> ExternalFile:
    return ExternalFile(store_path, sha256_file(path), path.stat().st_size)


def is_genai_folder(model: Path) -> bool:
    """A causal LM's variant: an onnxruntime-genai folder (``model.onnx`` beside its ``genai_config.json``)."""
    return (model.parent / "genai_config.json").is_file()


def companions(model: Path) -> list[str]:
    """The files a variant needs besides its model, relative to the model's folder: its external data, and for
    an onnxruntime-genai folder every other file in it (genai_config.json, tokenizer files, chat template)."""
    if is_genai_folder(model):
        return sorted(p.name for p in model.parent.iterdir() if p.is_file() and p != model)
    return locations(model)


def _prefix(model: Path) -> str:
    """Where a variant sits in its version folder: ``KEY/`` for an onnxruntime-genai folder, else at the root."""
    return f"{model.parent.name}/" if is_genai_folder(model) else ""


def variant_entries(name: str, version: str, staged: dict[str, Path]) -> dict[str, Variant]:
    """Manifest records for the staged variant files and their external data (sha256 and size of each),
    with the paths they will have in the store; an onnxruntime-genai variant lists every file of its folder."""
    out = {}
    for key, p in staged.items():
        base = f"{name}/{version}/{_prefix(p)}"
        model = _record(p, f"{base}{p.name}")
        ext = tuple(_record(p.parent / loc, f"{base}{loc}") for loc in companions(p))
        out[key] = Variant(model.path, model.sha256, model.size_bytes, ext)
    return out


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def publish(
    out_dir: Path,
    mv: ModelVersion,
    staged: dict[str, Path],
    report: dict[str, Any],
    triton_variant: str | None,
    *,
    tensorrt_fp16: bool = True,
    warmup: bool = True,
) -> tuple[Path, Path | None]:
    """Move the ``staged`` variant files into ``DIR/NAME/VERSION``; write the Triton repository for
    ``triton_variant`` (None: the model does not serve the GPU tier) and the reports; add the manifest
    entry last. Returns the version folder and the Triton model folder."""
    vdir = Path(out_dir) / mv.name / mv.version
    vdir.mkdir(parents=True, exist_ok=True)
    final = {key: vdir / _prefix(p) / p.name for key, p in staged.items()}
    for key, p in staged.items():
        dest = final[key].parent
        for loc in companions(p):  # external data (and a genai folder's files) first: never a model without them
            (dest / loc).parent.mkdir(parents=True, exist_ok=True)
            os.replace(p.parent / loc, dest / loc)
        os.replace(p, final[key])
    triton_dir = None
    if triton_variant is not None:
        triton_dir = write_triton_repo(
            out_dir,
            mv.name,
            mv.version,
            final[triton_variant],
            list(mv.inputs),
            list(mv.outputs),
            mv.max_batch_size,
            tensorrt_fp16=tensorrt_fp16,
            warmup=warmup,
        )
        shutil.copyfile(triton_dir / "config.pbtxt", triton_dir / mv.version / "config.pbtxt")  # its own config
    write_report(vdir, report)
    write_manifest_entry(out_dir, mv)
    if triton_dir is not None:
        write_triton_model_config(out_dir, mv.name)
    return vdir, triton_dir


def write_triton_model_config(out_dir: Path, name: str) -> list[str]:
    """``DIR/triton/NAME/config.pbtxt`` serving the model's listed GPU versions, from their own configs;
    returns the versions left out (another signature than the newest's)."""
    root = Path(out_dir) / "triton" / name
    configs = {v: (root / v / "config.pbtxt").read_text() for v in gpu_versions(read_manifest(out_dir), name)
               if (root / v / "config.pbtxt").is_file()}
    if not configs:
        return []
    text, left_out = model_config_text(name, configs, read_manifest(out_dir).revision)
    tmp = root / ".config.pbtxt.tmp"
    tmp.write_text(text)
    os.replace(tmp, root / "config.pbtxt")
    return left_out
