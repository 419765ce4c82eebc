"""``compile_model(config)``: export -> gate -> optimize -> quantize -> evaluate -> profile -> select ->
place -> publish.

Each step has one entry point here and ``compile_model`` runs them in order. What a variant is lives
in ``variants.VARIANTS`` (one record per variant), the accuracy gate in ``gate.py``, and every write
into the model store in ``publish.py``. Artifacts are built in a staging folder under DIR and
published into ``DIR/NAME/VERSION`` only when every step succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tierserve.manifest import TASK_INFERENCE, Manifest, ModelVersion
from tierserve_compiler.config import CompileConfig, load_prices
from tierserve_compiler.data import Dataset, load_npz, row_nbytes, synthetic_dataset
from tierserve_compiler.errors import CompilerError, VariantError
from tierserve_compiler.external_data import consolidate
from tierserve_compiler.gate import compare_outputs, gate, gate_datasets, run_onnx
from tierserve_compiler.metrics import Task, choose_metrics, detect_task, evaluate_outputs, within_budget
from tierserve_compiler.placement import Placement
from tierserve_compiler.placement import place as _place
from tierserve_compiler.profile import latency, profile_variant
from tierserve_compiler.publish import (
    checked_name_version,
    existing_version,
    now_utc,
    publish,
    read_manifest,
    variant_entries,
    write_manifest_entry,
)
from tierserve_compiler.report import build_report, write_report
from tierserve_compiler.sources import Exported
from tierserve_compiler.sources import export as _export
from tierserve_compiler.triton import write_triton_repo
from tierserve_compiler.variants import CPU, GPU, REFERENCE, VARIANTS, filename, mode_variants, serves


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


class Selection(NamedTuple):
    """``selected``: what ``--quantize`` chose (the manifest's ``selected_variant``); ``cpu``: what the
    CPU tier serves; ``triton``: what the GPU tier serves."""

    selected: str
    cpu: str
    triton: str


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

    @property
    def next_steps(self) -> str:
        """How to serve it: compiling lists a version but never makes it the default by itself."""
        vdir = self.out_dir / self.name / self.version
        entry = read_manifest(self.out_dir).models.get(self.name)
        if entry is not None and entry.default_version == self.version:
            return f"to serve it: tierserve models publish {vdir} --store URI (the model's default: its first version)"
        return (f"v{self.version} is listed, not the default; to serve it: tierserve models publish {vdir} "
                f"--store URI [--canary PERCENT | --promote], then tierserve models promote {self.name} "
                f"{self.version} (or tierserve models rollout)")


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


# --- steps ---------------------------------------------------------------------------------------


def export_step(cfg: CompileConfig, workdir: Path) -> tuple[Exported, Dataset | None]:
    """Export SOURCE to ONNX and run the accuracy gate on example + validation inputs."""
    exported = _export(cfg, workdir)
    validation = load_npz(cfg.validation, exported.inputs, "validation") if cfg.validation else None
    gate(exported, gate_datasets(exported, validation, cfg.seed), cfg.gate_tolerance)
    return exported, validation


def optimize(exported: Exported, cfg: CompileConfig, workdir: Path, data: Dataset) -> BuiltVariant:
    """Build fp32 ``model.onnx`` (offline ORT optimisation) and check it still matches the export."""
    dst = workdir / filename(REFERENCE)
    info = VARIANTS[REFERENCE].build(exported.onnx_path, dst, cfg, None)
    consolidate(dst)
    feed = data.take(64).inputs
    res = compare_outputs(run_onnx(dst, feed), run_onnx(exported.onnx_path, feed), feed, cfg.gate_tolerance)
    bad = {k: v["error"] for k, v in res.items() if not v["ok"]}
    if bad:
        raise VariantError(
            f"the optimised fp32 graph differs from the export on outputs {bad}; use optimization_level='basic'"
        )
    info["check_vs_export"] = {k: v["error"] for k, v in res.items()}
    return BuiltVariant(REFERENCE, dst, info)


def _skip_reason(key: str, cfg: CompileConfig, calibration: Dataset | None) -> str | None:
    """Why ``key`` is not built in this compile (``auto`` mode; explicit modes were checked up front)."""
    spec = VARIANTS[key]
    if spec.needs_calibration and calibration is None:
        return f"no --calibration data: {key} needs calibration"
    if cfg.target == GPU and not serves(key, GPU):
        return f"--target gpu serves no CPU-only variant ({spec.why_tiers})"
    if cfg.target == CPU and not serves(key, CPU):
        return f"{key} does not serve the CPU tier ({spec.why_tiers}); --target cpu"
    return None


def quantize(cfg: CompileConfig, fp32: Path, workdir: Path, calibration: Dataset | None) -> list[BuiltVariant]:
    """Build the variants the ``--quantize`` mode asks for (besides fp32)."""
    out: list[BuiltVariant] = []
    explicit = cfg.quantize != "auto"
    for key in mode_variants(cfg.quantize)[1:]:
        skip = _skip_reason(key, cfg, calibration)
        if skip is not None:
            out.append(BuiltVariant(key, None, decision="skipped", reason=skip))
            continue
        dst = workdir / filename(key)
        try:
            info = VARIANTS[key].build(fp32, dst, cfg, calibration)
            consolidate(dst)
            out.append(BuiltVariant(key, dst, info))
        except VariantError as exc:
            if explicit:
                raise
            reason = f"could not be built: {exc.message}"
            out.append(BuiltVariant(key, None, decision="rejected", reason=reason, error=exc.message))
    return out


def evaluate(
    variants: list[BuiltVariant], data: Dataset, task: Task, names: tuple[str, ...], cfg: CompileConfig
) -> None:
    """Metrics of every built variant against fp32 on the validation data, and each variant's budget."""
    fp32 = next(v for v in variants if v.key == REFERENCE)
    assert fp32.path is not None
    ref = run_onnx(fp32.path, data.inputs)
    for v in variants:
        if v.path is None:
            continue
        got = ref if v.key == REFERENCE else run_onnx(v.path, data.inputs)
        v.metrics = evaluate_outputs(ref, got, task, names, data.labels)
    for v in variants:
        if v.path is not None and v.key != REFERENCE:
            budget = cfg.budget or VARIANTS[v.key].budget
            v.within_budget, v.budget_reasons = within_budget(v.metrics, fp32.metrics, budget)


def profile(variants: list[BuiltVariant], data: Dataset, cfg: CompileConfig, workdir: Path) -> None:
    for v in variants:
        if v.path is not None:
            v.profile = profile_variant(v.path, data, cfg.profile, workdir)


def select(variants: list[BuiltVariant], cfg: CompileConfig, task: str = TASK_INFERENCE) -> Selection:
    """Pick the CPU variant and the GPU (Triton) variant; record why each variant was kept or rejected.

    ``auto``: the fastest (p50 at batch 1, 1 thread) CPU-tier variant within its accuracy budget that
    is also no slower than fp32 at the largest batch; never one slower than fp32. A variant that does
    not serve the CPU tier is only ever the GPU variant (the first such variant within budget, else
    fp32). Explicit modes select what was asked.

    A causal LM (``task`` text-generation) goes through the same rules: its profile's "latency" at batch 1 and 8
    is the time of one decode step (``profile.profile_generative``), so faster means more tokens/s.
    """
    by = {v.key: v for v in variants}
    fp32 = by.get(REFERENCE) or variants[0]  # a prebuilt causal LM has one variant, its own reference
    ref = fp32.key
    assert fp32.profile is not None
    b1, bmax = min(cfg.profile.batch_sizes), max(cfg.profile.batch_sizes)
    f1, fmax = latency(fp32.profile, b1, stat="p50_ms"), latency(fp32.profile, bmax, stat="p50_ms")
    fp32.decision, fp32.reason = "kept", f"reference; {_speed(fp32.profile, b1)}, {_speed(fp32.profile, bmax)}"
    candidates = [ref]
    for v in variants:
        if v.key == ref or v.path is None or v.profile is None:
            continue
        l1, lmax = latency(v.profile, b1, stat="p50_ms"), latency(v.profile, bmax, stat="p50_ms")
        speed = (f"{_speed(v.profile, b1)} vs {ref} {_speed(fp32.profile, b1)}; "
                 f"{_speed(v.profile, bmax)} vs {_speed(fp32.profile, bmax)}")
        budget = "; ".join(v.budget_reasons)
        if not serves(v.key, CPU, task):
            v.decision = "kept" if v.within_budget else "rejected"
            v.reason = f"GPU variant only ({'within' if v.within_budget else 'over'} budget: {budget})"
        elif not v.within_budget:
            v.decision, v.reason = "rejected", f"over the accuracy budget: {budget}"
        elif l1 > f1 or lmax > fmax:
            v.decision, v.reason = "rejected", f"slower than {ref} ({speed})"
        else:
            v.decision, v.reason = "kept", f"within budget ({budget}); {speed}"
            candidates.append(v.key)
    asked = [k for k in mode_variants(cfg.quantize, task)[1:] if k in by and by[k].path is not None]
    if cfg.quantize != "auto" and asked:
        selected = asked[0]
        if by[selected].decision == "rejected":
            by[selected].reason += f"; selected anyway because --quantize {cfg.quantize} was requested"
    else:
        selected = min(candidates, key=lambda k: latency(by[k].profile or {}, b1, stat="p50_ms"))
    by[selected].decision = "selected"
    gpu = [
        v.key
        for v in variants
        if v.key != ref and serves(v.key, GPU, task) and v.path is not None
        and (v.within_budget or v.key == selected)
    ]  # fmt: skip
    return Selection(selected, selected if serves(selected, CPU, task) else ref, gpu[0] if gpu else ref)


def _speed(prof: dict[str, Any], batch: int) -> str:
    """One speed figure for a reason: p50 latency per request, or decode tokens/s for a causal LM."""
    p50 = latency(prof, batch, stat="p50_ms")
    if prof.get("kind") == "text-generation":
        tok_s = next(iter(prof["threads"].values()))["batches"][str(batch)]["tokens_per_s"]
        return f"b{batch} {tok_s:,.1f} tokens/s ({p50:.3f} ms/step)"
    return f"p50 b{batch} {p50:.3f} ms"


def place(cpu_variant: BuiltVariant, data: Dataset, cfg: CompileConfig, prices: dict[str, Any]) -> Placement:
    assert cpu_variant.profile is not None and cpu_variant.path is not None
    return _place(
        size_bytes=cpu_variant.path.stat().st_size,
        profile=cpu_variant.profile,
        row_bytes=row_nbytes(data),
        cfg=cfg if cfg.target != "edge" else dataclasses.replace(cfg, target="auto"),  # edge: the cloud by rules
        prices=prices,
    )


def place_on_edge(placement: Placement, variants: list[BuiltVariant], cfg: CompileConfig) -> str | None:
    """Apply the edge rules (``tierserve_compiler.edge``) when asked; the variant a device serves, or None."""
    if cfg.target != "edge" and cfg.edge_profile is None:
        return None
    from tierserve_compiler.edge import Candidate, load_profile, place_edge

    candidates = [Candidate(v.key, _bytes(v.path), v.profile) for v in variants
                  if v.path is not None and v.profile is not None and serves(v.key, CPU)
                  and (v.key == REFERENCE or v.within_budget)]
    _, variant = place_edge(placement, candidates, load_profile(cfg.edge_profile), target=cfg.target,
                            explicit_profile=cfg.edge_profile is not None, slo_ms=cfg.slo_ms,
                            max_batch_size=cfg.max_batch_size)
    return variant


def _bytes(path: Path) -> int:
    """A variant's bytes on disk, its external data included."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def model_version(
    name: str, version: str, exported: Exported, variants: list[BuiltVariant], sel: Selection, placement: Placement,
    cfg: CompileConfig, edge_variant: str | None = None,
) -> ModelVersion:  # fmt: skip
    """The manifest entry, describing every built variant (rejected ones too: operators may switch)."""
    staged = {v.key: v.path for v in variants if v.path is not None}
    batched = bool(exported.inputs) and exported.inputs[0].shape[:1] == (-1,)
    return ModelVersion(
        name=name,
        version=version,
        inputs=tuple(exported.inputs),
        outputs=tuple(exported.outputs),
        variants=variant_entries(name, version, staged),
        selected_variant=sel.selected,
        targets=tuple(placement.targets),
        cpu_variant=sel.cpu if CPU in placement.targets else None,
        edge_variant=edge_variant,
        max_batch_size=cfg.max_batch_size if batched else 0,
        routing=placement.routing,
        cpu=placement.cpu,
        created_at=now_utc(),
    )


# --- the whole thing -----------------------------------------------------------------------------


def start_compile(cfg: CompileConfig) -> tuple[Path, Manifest, str, str, dict[str, Any], Progress]:
    """What every compile starts from (a classic model's and a causal LM's): the config validated, the output
    folder made, its manifest, the checked name and version, the prices and the progress printer."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir)
    name, version = checked_name_version(cfg, manifest)
    return out_dir, manifest, name, version, load_prices(cfg.prices), Progress(cfg.progress)


def compile_model(cfg: CompileConfig) -> CompileResult:
    """Run every step; returns the manifest entry and the report. Raises :class:`CompilerError`.

    A causal LM folder (task text-generation) goes through :func:`tierserve_compiler.causal_lm.compile_causal_lm`."""
    from tierserve_compiler.sources import source_task

    if source_task(cfg.source) != TASK_INFERENCE:
        from tierserve_compiler.causal_lm import compile_causal_lm

        return compile_causal_lm(cfg)
    out_dir, manifest, name, version, prices, prog = start_compile(cfg)
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
        identity = variant_entries(name, version, {REFERENCE: fp32.path})[REFERENCE]
        existing = existing_version(manifest, out_dir, name, version, identity, explicit=cfg.version is not None)
        if existing is not None:
            prog.note(f"{name} v{existing.version} already holds this model: nothing to do")
            return _unchanged(out_dir, existing)
        with prog.step(f"quantize ({cfg.quantize})"):
            variants = [fp32, *quantize(cfg, fp32.path, work, calibration)]
        with prog.step(f"evaluate {', '.join(metric_names)}"):
            evaluate(variants, data, task, metric_names, cfg)
        with prog.step("profile each variant in a subprocess"):
            profile(variants, data, cfg, work)
        sel = select(variants, cfg)
        by = {v.key: v for v in variants}
        with prog.step("place"):
            placement = place(by[sel.cpu], data, cfg, prices)
            edge_variant = place_on_edge(placement, variants, cfg)
        for r in placement.reasons:
            prog.note(f"{'ok ' if r.ok else 'NO '} {r.rule}: {r.detail}")
        mv = model_version(name, version, exported, variants, sel, placement, cfg, edge_variant)
        report = build_report(cfg, exported, task, metric_names, variants, sel.triton, placement, mv, data)
        with prog.step("publish"):
            vdir, triton_dir = publish(
                out_dir,
                mv,
                {v.key: v.path for v in variants if v.path is not None},
                report,
                sel.triton if GPU in placement.targets else None,
                tensorrt_fp16=cfg.tensorrt_fp16,
                warmup=cfg.model_warmup,
            )
    prog.note(f"{name} v{version}: selected {sel.selected}, targets {list(placement.targets)} -> {vdir}")
    result = CompileResult(name, version, out_dir, vdir, mv, report, triton_dir=triton_dir)
    prog.note(result.next_steps)
    return result


def _unchanged(out_dir: Path, mv: ModelVersion) -> CompileResult:
    vdir = out_dir / mv.name / mv.version
    rep = vdir / "report.json"
    report = json.loads(rep.read_text()) if rep.exists() else {}
    return CompileResult(mv.name, mv.version, out_dir, vdir, mv, report, noop=True)


__all__ = [
    "BuiltVariant",
    "CompileResult",
    "CompilerError",
    "Selection",
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
