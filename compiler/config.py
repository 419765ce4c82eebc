"""Configuration dataclasses and named presets for ``compile_model``.

Everything a compile step needs is in :class:`CompileConfig`; the CLI only builds one.
Presets are plain dicts of field overrides (see :data:`PRESETS`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierserve.memory_classes import CLASSES_MB
from tierserve_compiler.errors import ConfigError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("auto", "cpu", "gpu", "both", "edge")

PRICES_FILE = Path(__file__).with_name("prices.json")

MB = 1024 * 1024


@dataclass(frozen=True)
class LambdaLimits:
    """The CPU tier's functions as ``template.yaml`` deploys them, within Lambda's quotas.

    Why not Lambda's quota maxima (10,240 MB, 10 GB, 900 s): a model placed on the CPU runs in one of the
    template's memory-class functions (``tierserve.memory_classes``), with the ``/tmp`` that
    ``CpuEphemeralStorageMb`` gives it (``tierserve deploy-config`` raises it to what the models need, up to
    10,240 MB), their timeout (900 s, for streamed generation) and API Gateway's 29 s for a synchronous
inference; a model that passed the quota maxima could still fail once deployed.
    Models are fetched from S3 into ``/tmp``, never packaged, so the zip package is the runtime alone and
    the project builds no container images. ``tests/unit/compiler/test_config.py`` checks these values
    against ``template.yaml``; tests pass smaller ones to exercise the rules cheaply.
    """

    package_unzipped_mb: float = 250.0  # zip deployment: code + layers, unzipped (the runtime alone)
    memory_classes_mb: tuple[int, ...] = CLASSES_MB  # one CPU function each (CpuInferenceFunction[NNNN])
    max_memory_mb: int = CLASSES_MB[-1]  # the largest class
    min_memory_mb: int = 128
    mb_per_vcpu: int = 1_769  # Lambda allocates 1 vCPU per 1,769 MB
    max_vcpus: int = 6
    sync_payload_mb: float = 6.0  # synchronous invoke request/response
    timeout_s: float = 900.0  # the class functions' Timeout (15 minutes: a streamed generation can last that long)
    sync_request_s: float = 29.0  # a synchronous inference through API Gateway's HTTP API (30 s integration)
    tmp_mb: float = 10 * 1024.0  # the most /tmp CpuEphemeralStorageMb gives a class function (Lambda's maximum)
    tmp_headroom: float = 1.25  # /tmp kept besides a model while the store verifies it (as deploy-config counts)
    # Unzipped size of the runtime the CPU function ships besides the model: onnxruntime 1.32 +
    # numpy 2.x manylinux_2_28 aarch64 wheels + powertools + handler code, as measured by the
    # project's `make package` for the CPU function (121 MB unzipped).
    runtime_deps_mb: float = 121.0
    # Session memory overhead over the model file size (weights are loaded once, plus arena).
    memory_overhead_mb: float = 160.0
    snapstart_tmp_mb: float = 512.0  # with SnapStart, a function's /tmp is at most 512 MB


@dataclass(frozen=True)
class ProfileConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    iterations: int = 30
    warmup: int = 3
    threads: tuple[int, ...] = (1, 2)  # intra-op threads measured; 1 thread models 1 vCPU
    timeout_s: float = 300.0


@dataclass(frozen=True)
class Budget:
    """What "within the accuracy budget" means for ``--quantize auto``.

    Each variant's record (``variants.VARIANTS``) carries its default budget; ``CompileConfig.budget``
    overrides it for every variant."""

    max_rel_drop: float = 0.01  # <= 1 % relative drop of accuracy / relative error of regressors
    min_cosine: float = 0.99
    min_label_agreement: float = 0.995
    # Causal LMs, against the source model (transformers on PyTorch) on the validation text:
    min_top1_agreement: float = 0.90  # next-token top-1 agreement over every position
    max_perplexity_ratio: float = 1.10  # the variant's perplexity / the source model's
    min_greedy_match: float = 0.25  # share of greedy continuations equal token for token


@dataclass
class CompileConfig:
    source: str
    name: str
    version: str | None = None
    out_dir: Path = Path("build/models")
    validation: Path | None = None
    calibration: Path | None = None
    example_inputs: Path | None = None
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    quantize: str = "auto"
    # None = per-channel int8 weights (measured: all-MiniLM-L6-v2 int8_dynamic keeps cosine 0.993 per-channel
    # vs 0.965 per-tensor, at the same size); False = per-tensor; True = explicitly asked for.
    per_channel: bool | None = None
    calibration_method: str | None = None  # None = minmax, and "not given" for combo checks
    metrics: tuple[str, ...] = ()
    slo_ms: float | None = None
    slo_ttft_ms: float | None = None  # causal LMs: time to first token at a 128-token prompt
    slo_tokens_per_s: float | None = None  # causal LMs: decode tokens/s at batch 1
    slo_total_ms: float | None = None  # causal LMs: time to complete (routing: first token + max_tokens)
    target: str = "auto"
    edge_profile: str | None = None  # a device profile (tierserve_compiler.edge.PROFILES) or a JSON file
    prices: Path | None = None
    preset: str = "default"
    gate_tolerance: float = 1e-4
    optimization_level: str = "basic"  # offline ORT level for model.onnx: basic|extended
    max_batch_size: int = 64
    task: str | None = None  # classifier|regressor|embedding; None = detect from the outputs
    budget: Budget | None = None  # None = each variant's own default budget (variants.VARIANTS)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    limits: LambdaLimits = field(default_factory=LambdaLimits)
    tensorrt_fp16: bool = True
    model_warmup: bool = True
    seed: int = 0
    progress: bool = True

    def validate(self) -> CompileConfig:
        """Refuse impossible combinations, with a message that says what to do instead."""
        from tierserve_compiler.sources import source_task
        from tierserve_compiler.variants import check_options  # the variant rules live with the variants

        task = source_task(self.source)

        if self.target not in TARGETS:
            raise ConfigError(f"--target {self.target!r} is unknown; use one of cpu, gpu, both, edge (or omit it)")
        if self.edge_profile is not None:
            from tierserve_compiler.edge import load_profile

            load_profile(self.edge_profile)  # a bad profile is refused before any work
        if self.calibration_method is not None and self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"--calibration-method {self.calibration_method!r} is unknown; use one of "
                f"{', '.join(CALIBRATION_METHODS)}"
            )
        check_options(self, task)
        for flag, value in (("--slo-ms", self.slo_ms), ("--slo-ttft-ms", self.slo_ttft_ms),
                            ("--slo-tokens-per-s", self.slo_tokens_per_s), ("--slo-total-ms", self.slo_total_ms)):
            if value is not None and value <= 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        if task == "text-generation":
            from tierserve_compiler.causal_lm import check_options as check_causal_lm

            check_causal_lm(self)
        elif self.slo_ttft_ms is not None or self.slo_tokens_per_s is not None or self.slo_total_ms is not None:
            raise ConfigError("--slo-ttft-ms, --slo-tokens-per-s and --slo-total-ms apply to causal LMs (a Hugging "
                              "Face folder with a *ForCausalLM config.json, or an onnxruntime-genai folder); use "
                              "--slo-ms for this model")
        if self.optimization_level not in ("basic", "extended"):
            raise ConfigError("optimization_level must be 'basic' or 'extended'")
        if self.max_batch_size < 0:
            raise ConfigError("max_batch_size must be >= 0")
        for name, path in (
            ("--validation", self.validation if task != "text-generation" else None),
            ("--calibration", self.calibration),
            ("--example-inputs", self.example_inputs),
            ("--prices", self.prices),
        ):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name} {path}: no such file; check the path")
        return self


#: Named presets: field overrides applied before the user's own options.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Quick look: few profiling iterations, one thread count.
    "fast": {"profile": ProfileConfig(iterations=8, warmup=1, threads=(1,))},
    # Unit tests: tiny, deterministic work; no progress bars.
    "test": {"profile": ProfileConfig(batch_sizes=(1, 8, 32), iterations=3, warmup=1, threads=(1,)), "progress": False},
    # Transformers / embeddings: cosine budget, seq axis dynamic.
    "embedding": {
        "task": "embedding",
        "dynamic_axes": {"input_ids": [1], "attention_mask": [1]},
        "gate_tolerance": 1e-3,
    },
    # Published latency-critical models: more iterations for stable p95.
    "thorough": {"profile": ProfileConfig(iterations=100, warmup=10, threads=(1, 2))},
}


def make_config(source: str, name: str, preset: str = "default", **overrides: Any) -> CompileConfig:
    """A :class:`CompileConfig` from a named preset plus explicit overrides (overrides win)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(sorted(PRESETS))}")
    values: dict[str, Any] = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(CompileConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config fields {sorted(unknown)}; known: {sorted(known)}")
    return CompileConfig(source=source, name=name, preset=preset, **values)


def load_prices(path: Path | None = None) -> dict[str, Any]:
    """Prices for the cost model: ``compiler/prices.json`` unless a file is given."""
    p = Path(path) if path else PRICES_FILE
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read prices file {p}: {exc}; fix the JSON or omit --prices") from exc
    defaults = json.loads(PRICES_FILE.read_text())
    merged = {**defaults, **data}
    for key in ("lambda_gb_s_usd", "lambda_request_usd", "gpu_hourly_usd", "gpu_utilisation"):
        if not isinstance(merged.get(key), int | float) or merged[key] < 0:
            raise ConfigError(f"prices file {p}: {key!r} must be a non-negative number")
    return merged
