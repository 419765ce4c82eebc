"""``compile_model(config)``: export -> optimize -> quantize -> evaluate -> profile -> place ->
write artifacts, Triton repository, reports and the manifest entry.

Each step has one entry point here; ``compile_model`` runs them in order. Artifacts are built in a
staging folder under DIR and moved into ``DIR/NAME/VERSION`` only when every step succeeded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.manifest import MANIFEST_FILE, Manifest, ModelVersion, Variant, check_model_name, check_version
from tierserve_compiler.config import CompileConfig, load_prices
from tierserve_compiler.data import Dataset, load_npz, row_nbytes, sha256_file, synthetic_dataset
from tierserve_compiler.errors import ArtifactExistsError, CompilerError, VariantError
from tierserve_compiler.metrics import Task, choose_metrics, detect_task, evaluate_outputs, within_budget
from tierserve_compiler.placement import Placement
from tierserve_compiler.placement import place as _place
from tierserve_compiler.profile import latency, profile_variant
from tierserve_compiler.report import write_report
from tierserve_compiler.sources import Exported, compare_outputs, gate, gate_datasets, run_onnx
from tierserve_compiler.sources import export as _export
from tierserve_compiler.triton import write_triton_repo
from tierserve_compiler.variants import MODE_VARIANTS, VARIANTS, filename


@dataclass
class BuiltVariant:
    key: str
    path: Path | None
    build: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    within_budget: bool = True
    budget_reasons: list[str] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    decision: str = "built"
    reason: str = ""


@dataclass
class CompileResult:
    name: str
    version: str
    out_dir: Path
    version_dir: Path
    model_version: ModelVersion
    report: dict[str, Any]
    noop: bool = False
    triton_dir: Path | None = None


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """Step-by-step progress on stderr with rich (silent when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self.console = None
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        if self.console is None:
            yield
            return
        t0 = time.perf_counter()
        with self.console.status(f"{text}..."):
            yield
        self.console.print(f"[green]✓[/green] {text} [dim]({time.perf_counter() - t0:.1f} s)[/dim]")

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(f"  {text}")


# --- manifest ------------------------------------------------------------------------------------


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
    """Add ``mv`` to ``DIR/manifest.json`` atomically (temp file + os.replace), keeping other models."""
    out_dir = Path(out_dir)
    with _manifest_lock(out_dir):
        manifest = read_manifest(out_dir).with_version(mv)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".manifest-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            fh.write(manifest.dumps())
        os.replace(tmp, out_dir / MANIFEST_FILE)
    return out_dir / MANIFEST_FILE


# --- steps ---------------------------------------------------------------------------------------


def export_step(cfg: CompileConfig, workdir: Path) -> tuple[Exported, Dataset | None]:
    """Export SOURCE to ONNX and run the accuracy gate on example + validation inputs."""
    exported = _export(cfg, workdir)
    validation = load_npz(cfg.validation, exported.inputs, "validation") if cfg.validation else None
    gate(exported, gate_datasets(exported, validation, cfg.seed), cfg.gate_tolerance)
    return exported, validation


def optimize(exported: Exported, cfg: CompileConfig, workdir: Path, data: Dataset) -> BuiltVariant:
    """Build fp32 ``model.onnx`` (offline ORT optimisation) and check it still matches the export."""
    dst = workdir / filename("fp32")
    info = VARIANTS["fp32"](exported.onnx_path, dst, cfg, None)
    feed = data.take(64).inputs
    res = compare_outputs(run_onnx(dst, feed), run_onnx(exported.onnx_path, feed), feed, cfg.gate_tolerance)
    bad = {k: v["error"] for k, v in res.items() if not v["ok"]}
    if bad:
        raise VariantError(
            f"the optimised fp32 graph differs from the export on outputs {bad}; use optimization_level='basic'"
        )
    info["check_vs_export"] = {k: v["error"] for k, v in res.items()}
    return BuiltVariant("fp32", dst, info)


def quantize(cfg: CompileConfig, fp32: Path, workdir: Path, calibration: Dataset | None) -> list[BuiltVariant]:
    """Build the variants the ``--quantize`` mode asks for (besides fp32)."""
    out: list[BuiltVariant] = []
    explicit = cfg.quantize != "auto"
    for key in MODE_VARIANTS[cfg.quantize][1:]:
        if key == "int8_static" and calibration is None:
            out.append(
                BuiltVariant(
                    key, None, decision="skipped", reason="no --calibration data: static int8 needs calibration"
                )
            )
            continue
        if key == "int8_dynamic" and cfg.target == "gpu":
            out.append(BuiltVariant(key, None, decision="skipped", reason="--target gpu serves no CPU variant"))
            continue
        if key == "fp16" and cfg.target == "cpu":
            out.append(BuiltVariant(key, None, decision="skipped", reason="fp16 is a GPU variant; --target cpu"))
            continue
        dst = workdir / filename(key)
        try:
            info = VARIANTS[key](fp32, dst, cfg, calibration)
            out.append(BuiltVariant(key, dst, info))
        except VariantError as exc:
            if explicit:
                raise
            out.append(
                BuiltVariant(
                    key, None, decision="rejected", reason=f"could not be built: {exc.message}", error=exc.message
                )
            )
    return out


def evaluate(
    variants: list[BuiltVariant], data: Dataset, task: Task, names: tuple[str, ...], cfg: CompileConfig
) -> None:
    """Metrics of every built variant against fp32 on the validation data."""
    fp32 = next(v for v in variants if v.key == "fp32")
    assert fp32.path is not None
    ref = run_onnx(fp32.path, data.inputs)
    for v in variants:
        if v.path is None:
            continue
        got = ref if v.key == "fp32" else run_onnx(v.path, data.inputs)
        v.metrics = evaluate_outputs(ref, got, task, names, data.labels)
    for v in variants:
        if v.path is not None and v.key != "fp32":
            v.within_budget, v.budget_reasons = within_budget(v.metrics, fp32.metrics, cfg.budget)


def profile(variants: list[BuiltVariant], data: Dataset, cfg: CompileConfig, workdir: Path) -> None:
    for v in variants:
        if v.path is not None:
            v.profile = profile_variant(v.path, data, cfg.profile, workdir)


def select(variants: list[BuiltVariant], cfg: CompileConfig) -> tuple[str, str]:
    """Pick the CPU variant and the GPU (Triton) variant; record why each variant was kept or rejected.

    ``auto``: the fastest (p50 at batch 1, 1 thread) CPU variant within the accuracy budget that is
    also no slower than fp32 at the largest batch; never an int8 slower than fp32. fp16 is only ever
    the GPU variant (onnxruntime's CPU kernels lack fp16). Explicit modes select what was asked.
    """
    by = {v.key: v for v in variants}
    fp32 = by["fp32"]
    assert fp32.profile is not None
    bmax = str(max(cfg.profile.batch_sizes))
    b1 = str(min(cfg.profile.batch_sizes))
    f1, fmax = latency(fp32.profile, int(b1), stat="p50_ms"), latency(fp32.profile, int(bmax), stat="p50_ms")
    fp32.decision, fp32.reason = "kept", f"reference; p50 b{b1} {f1:.3f} ms, b{bmax} {fmax:.3f} ms"
    candidates = ["fp32"]
    for v in variants:
        if v.key == "fp32" or v.path is None or v.profile is None:
            continue
        l1, lmax = latency(v.profile, int(b1), stat="p50_ms"), latency(v.profile, int(bmax), stat="p50_ms")
        speed = f"p50 b{b1} {l1:.3f} ms vs fp32 {f1:.3f}; b{bmax} {lmax:.3f} vs {fmax:.3f}"
        budget = "; ".join(v.budget_reasons)
        if v.key == "fp16":
            v.decision, v.reason = (
                "kept" if v.within_budget else "rejected",
                f"GPU variant only ({'within' if v.within_budget else 'over'} budget: {budget})",
            )
        elif not v.within_budget:
            v.decision, v.reason = "rejected", f"over the accuracy budget: {budget}"
        elif l1 > f1 or lmax > fmax:
            v.decision, v.reason = "rejected", f"slower than fp32 ({speed})"
        else:
            v.decision, v.reason = "kept", f"within budget ({budget}); {speed}"
            candidates.append(v.key)
    if cfg.quantize in ("dynamic", "static"):
        key = "int8_dynamic" if cfg.quantize == "dynamic" else "int8_static"
        if by[key].decision == "rejected":
            by[key].reason += f"; selected anyway because --quantize {cfg.quantize} was requested"
        by[key].decision = "selected"
        selected = key
    elif cfg.quantize == "fp16":
        selected = "fp16"
        by["fp16"].decision = "selected"
    else:
        selected = min(candidates, key=lambda k: latency(by[k].profile or {}, int(b1), stat="p50_ms"))
        by[selected].decision = "selected"
    f16 = by.get("fp16")
    triton = (
        "fp16" if f16 is not None and f16.path is not None and (f16.within_budget or cfg.quantize == "fp16") else "fp32"
    )
    return selected, triton


def place(cpu_variant: BuiltVariant, data: Dataset, cfg: CompileConfig, prices: dict[str, Any]) -> Placement:
    assert cpu_variant.profile is not None and cpu_variant.path is not None
    return _place(
        size_bytes=cpu_variant.path.stat().st_size,
        profile=cpu_variant.profile,
        row_bytes=row_nbytes(data),
        cfg=cfg,
        prices=prices,
    )


# --- the whole thing -----------------------------------------------------------------------------


def _existing_noop(
    manifest: Manifest, out_dir: Path, name: str, version: str, sha: str, explicit: bool
) -> ModelVersion | None:
    entry = manifest.models.get(name)
    mv = entry.versions.get(version) if entry else None
    if mv is None and not explicit and entry:
        latest = entry.versions[max(entry.versions, key=int)]
        return latest if latest.variants["fp32"].sha256 == sha else None
    if mv is None:
        vdir = out_dir / name / version
        if vdir.exists() and any(vdir.iterdir()):
            raise ArtifactExistsError(
                f"{vdir} exists but is not in the manifest (an interrupted compile?); "
                "artifacts are immutable: delete that folder or compile another --version"
            )
        return None
    if mv.variants["fp32"].sha256 == sha:
        return mv
    raise ArtifactExistsError(
        f"{name} version {version} already exists with different content (fp32 sha256 "
        f"{mv.variants['fp32'].sha256[:12]}... != {sha[:12]}...); artifacts are immutable: omit --version "
        f"to get version {next_version(manifest, name)}, or pick an unused --version"
    )


def compile_model(cfg: CompileConfig) -> CompileResult:
    """Run every step; returns the manifest entry and the report. Raises :class:`CompilerError`."""
    cfg.validate()
    name = check_model_name(cfg.name)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir)
    version = check_version(str(cfg.version)) if cfg.version else next_version(manifest, name)
    prices = load_prices(cfg.prices)
    prog = Progress(cfg.progress)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as td:
        work = Path(td)
        with prog.step(f"export {cfg.source}"):
            exported, validation = export_step(cfg, work)
        task = detect_task(exported.outputs, cfg.task or exported.task_hint)
        metric_names = choose_metrics(task, cfg.metrics)
        data = validation or exported.example or synthetic_dataset(exported.inputs, 64, cfg.seed)
        calibration = load_npz(cfg.calibration, exported.inputs, "calibration") if cfg.calibration else None
        with prog.step("optimize fp32"):
            fp32 = optimize(exported, cfg, work, data)
        assert fp32.path is not None
        sha = sha256_file(fp32.path)
        existing = _existing_noop(manifest, out_dir, name, version, sha, explicit=cfg.version is not None)
        if existing is not None:
            prog.note(f"{name} v{existing.version} already holds this model: nothing to do")
            vdir = out_dir / name / existing.version
            rep = vdir / "report.json"
            import json

            return CompileResult(
                name,
                existing.version,
                out_dir,
                vdir,
                existing,
                json.loads(rep.read_text()) if rep.exists() else {},
                noop=True,
            )
        with prog.step(f"quantize ({cfg.quantize})"):
            variants = [fp32, *quantize(cfg, fp32.path, work, calibration)]
        with prog.step(f"evaluate {', '.join(metric_names)}"):
            evaluate(variants, data, task, metric_names, cfg)
        with prog.step("profile each variant in a subprocess"):
            profile(variants, data, cfg, work)
        selected, triton_variant = select(variants, cfg)
        by = {v.key: v for v in variants}
        cpu_key = selected if selected != "fp16" else "fp32"
        with prog.step("place"):
            placement = place(by[cpu_key], data, cfg, prices)
        for r in placement.reasons:
            prog.note(f"{'ok ' if r.ok else 'NO '} {r.rule}: {r.detail}")

        # commit: move the artifacts into DIR/NAME/VERSION
        vdir = out_dir / name / version
        vdir.mkdir(parents=True, exist_ok=True)
        built = [v for v in variants if v.path is not None]  # rejected ones too: operators may switch
        entries: dict[str, Variant] = {}
        for v in built:
            assert v.path is not None
            final = vdir / v.path.name
            os.replace(v.path, final)
            v.path = final
            entries[v.key] = Variant(
                path=f"{name}/{version}/{final.name}", sha256=sha256_file(final), size_bytes=final.stat().st_size
            )
        max_batch = cfg.max_batch_size if exported.inputs and exported.inputs[0].shape[:1] == (-1,) else 0
        created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        mv = ModelVersion(
            name=name,
            version=version,
            inputs=tuple(exported.inputs),
            outputs=tuple(exported.outputs),
            variants=entries,
            selected_variant=selected,
            targets=tuple(placement.targets),
            cpu_variant=cpu_key if "cpu" in placement.targets else None,
            max_batch_size=max_batch,
            routing=placement.routing,
            cpu=placement.cpu,
            created_at=created,
        )
        triton_dir = None
        if "gpu" in placement.targets:
            tv = by[triton_variant]
            assert tv.path is not None
            triton_dir = write_triton_repo(
                out_dir,
                name,
                version,
                tv.path,
                list(exported.inputs),
                list(exported.outputs),
                max_batch,
                tensorrt_fp16=cfg.tensorrt_fp16,
                warmup=cfg.model_warmup,
            )
        report = build_report(
            cfg, exported, task, metric_names, variants, selected, triton_variant, placement, mv, data
        )
        with prog.step("write report"):
            write_report(vdir, report)
        write_manifest_entry(out_dir, mv)
    prog.note(f"{name} v{version}: selected {selected}, targets {list(placement.targets)} -> {vdir}")
    return CompileResult(name, version, out_dir, vdir, mv, report, triton_dir=triton_dir)


def build_report(
    cfg: CompileConfig,
    exported: Exported,
    task: Task,
    metric_names: tuple[str, ...],
    variants: list[BuiltVariant],
    selected: str,
    triton_variant: str,
    placement: Placement,
    mv: ModelVersion,
    data: Dataset,
) -> dict[str, Any]:
    import onnx
    import onnxruntime

    return {
        "name": mv.name,
        "version": mv.version,
        "created_at": mv.created_at,
        "source": cfg.source,
        "source_kind": exported.source_kind,
        "task": task.kind,
        "metrics": list(metric_names),
        "notes": exported.notes,
        "gate": exported.gate,
        "evaluation_data": {"source": data.source, "rows": data.rows, "labels": data.labels is not None},
        "selected_variant": selected,
        "cpu_variant": mv.cpu_variant,
        "triton_variant": triton_variant if "gpu" in placement.targets else None,
        "variants": {
            v.key: {
                "file": v.path.name if v.path else None,
                "size_bytes": v.path.stat().st_size if v.path and v.path.exists() else None,
                "build": v.build,
                "metrics": v.metrics,
                "within_budget": v.within_budget,
                "budget": v.budget_reasons,
                "profile": v.profile,
                "decision": v.decision,
                "reason": v.reason,
            }
            for v in variants
        },
        "placement": placement.to_json(),
        "config": {
            "quantize": cfg.quantize,
            "per_channel": cfg.per_channel,
            "calibration_method": cfg.calibration_method,
            "slo_ms": cfg.slo_ms,
            "target": cfg.target,
            "preset": cfg.preset,
            "gate_tolerance": cfg.gate_tolerance,
            "budget": vars(cfg.budget),
            "profile": vars(cfg.profile),
            "limits": vars(cfg.limits),
            "optimization_level": cfg.optimization_level,
        },
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
    }


__all__ = [
    "BuiltVariant",
    "CompileResult",
    "CompilerError",
    "compile_model",
    "evaluate",
    "export_step",
    "optimize",
    "place",
    "profile",
    "quantize",
    "read_manifest",
    "select",
    "write_manifest_entry",
    "write_report",
    "write_triton_repo",
]
