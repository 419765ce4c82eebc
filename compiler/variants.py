"""Variants of a model, built from the fp32 graph through an explicit registry (:data:`VARIANTS`).

* ``fp32`` (``model.onnx``): the exported graph optimised offline by onnxruntime. The default
  level is ``basic`` (constant folding, redundant-node elimination): the result is plain ONNX that
  every execution provider (CPU, CUDA, TensorRT) accepts. ``extended`` adds onnxruntime contrib
  fusions, which load faster on CPU but are provider specific. Sessions still apply all
  optimisations at load time, so serving speed is the same either way.
* ``int8_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations
  quantised on the fly); per-channel weights unless ``per_channel=False`` (``--per-tensor``).
* ``int8_static``: ``quant_pre_process`` then ``quantize_static`` in QDQ format, calibrated on
  ``--calibration`` (MinMax by default, or Entropy / Percentile), with the recipe measured in
  :mod:`tierserve_compiler.static_int8` (uint8 activations, float MatMul outputs, the most
  sensitive MatMuls kept float).
* ``fp16``: float16 weights and compute with fp32 inputs/outputs (``keep_io_types``), via
  ``onnxconverter_common`` when installed, else ``onnxruntime.transformers.float16`` (ships with
  onnxruntime); numerically sensitive ops and ``ai.onnx.ml`` ops stay fp32.

Causal language models (``task`` text-generation, issue 17) have their own variants, each an
onnxruntime-genai folder (``model.onnx`` + ``model.onnx.data`` + ``genai_config.json`` + tokenizer files)
written by onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder -p PRECISION
-e cpu``, :func:`tierserve_compiler.causal_lm.run_builder`) and measured in tokens/s and time to first token:

* ``fp32`` (``fp32/model.onnx``): the reference; its greedy continuations must equal transformers'.
* ``int4`` (``int4/model.onnx``): ``MatMulNBits`` 4-bit weights (block 32, RTN, accuracy level 4 on CPU:
  the builder's defaults for ``-p int4 -e cpu``).
* ``int8`` (``int8/model.onnx``): ``MatMulNBits`` 8-bit weights: the builder lists "INT8 CPU" among its
  valid combinations (``-p int8 -e cpu``), so no extra option is needed.

fp16 of a causal LM is not built here: the builder's fp16 targets CUDA/DML only (not ``-e cpu``), and the
GPU tier serves a generative model with vLLM from its Hugging Face weights (issue 18).

Each variant is ONE :class:`VariantSpec` record in :data:`VARIANTS` (builder, file name, the tiers
it serves, its ``--quantize`` mode, whether it needs calibration, its default accuracy budget, the task it
applies to and the unit its speed is measured in). The ``--quantize`` modes, :data:`MODE_VARIANTS`, the
option checks and the pipeline's skip and selection rules read the records, so adding a variant means
adding a builder and a record here, nothing else. A registry key is the manifest's variant key for the
``inference`` task, and ``TASK:KEY`` for another task (:func:`registry_key`): a causal LM's reference is
called ``fp32`` in its manifest entry too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierserve.manifest import TASK_INFERENCE, TASK_TEXT_GENERATION
from tierserve_compiler.config import Budget, CompileConfig
from tierserve_compiler.errors import ConfigError, VariantError, require

if TYPE_CHECKING:
    from tierserve_compiler.data import Dataset

VariantBuilder = Callable[[Path, Path, CompileConfig, "Dataset | None"], dict[str, Any]]

QUANT_OPS = {
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QAttention",
    "MatMulIntegerToFloat",
}
FP16_EXTRA_BLOCK = [
    "Range",
    "CumSum",
    "TopK",
    "NonMaxSuppression",
    "RandomNormalLike",
    "Resize",
    "Pow",
    "ReduceMean",
    "Softmax",
    "LayerNormalization",
    "Erf",
]


def _count_ops(path: Path) -> dict[str, int]:
    onnx = require("onnx", "compiler")
    counts: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _require_quantized(path: Path, what: str) -> int:
    n = sum(c for op, c in _count_ops(path).items() if op in QUANT_OPS)
    if n == 0:
        raise VariantError(
            f"{what}: nothing was quantized (the graph has no MatMul/Gemm/Conv weights that "
            "onnxruntime can quantize, e.g. scikit-learn ai.onnx.ml ops); use --quantize none"
        )
    return n


def build_fp32(src: Path, dst: Path, cfg: CompileConfig, data: Dataset | None) -> dict[str, Any]:
    ort = require("onnxruntime", "compiler")
    so = ort.SessionOptions()
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }
    so.graph_optimization_level = levels[cfg.optimization_level]
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VariantError(f"onnxruntime cannot load the exported graph: {exc}; check the model's opset") from exc
    return {"method": f"onnxruntime offline optimisation, level {cfg.optimization_level}"}


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """onnxruntime.quantization logs advice on the root logger; keep the CLI output readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def build_int8_dynamic(src: Path, dst: Path, cfg: CompileConfig, data: Dataset | None) -> dict[str, Any]:
    require("onnxruntime", "compiler")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with quiet_logs():
            quantize_dynamic(str(src), str(dst), per_channel=cfg.per_channel is not False, weight_type=QuantType.QInt8)
    except Exception as exc:
        raise VariantError(f"int8_dynamic: quantize_dynamic failed ({exc}); try --quantize static or none") from exc
    n = _require_quantized(dst, "int8_dynamic")
    return {
        "method": "quantize_dynamic, QInt8 weights",
        "per_channel": cfg.per_channel is not False,
        "quantized_nodes": n,
    }


def build_int8_static(src: Path, dst: Path, cfg: CompileConfig, data: Dataset | None) -> dict[str, Any]:
    """Calibrated int8 with the measured recipe of :mod:`tierserve_compiler.static_int8`."""
    from tierserve_compiler.static_int8 import quantize_static_recipe, recipe_for

    if data is None:
        raise VariantError("int8_static needs calibration data: pass --calibration or use --quantize dynamic")
    budget = cfg.budget or VARIANTS["int8_static"].budget
    recipe = recipe_for(cfg.per_channel, cfg.calibration_method, budget.min_cosine)
    info = quantize_static_recipe(src, dst, data, recipe)
    info["quantized_nodes"] = _require_quantized(dst, "int8_static")
    return {"method": "quant_pre_process + quantize_static (QDQ, uint8 activations, int8 weights)", **info}


def build_fp16(src: Path, dst: Path, cfg: CompileConfig, data: Dataset | None) -> dict[str, Any]:
    onnx = require("onnx", "compiler")
    try:
        from onnxconverter_common import float16 as f16  # type: ignore[import-not-found]

        lib = "onnxconverter_common.float16"
    except ImportError:
        require("onnxruntime", "compiler")
        from onnxruntime.transformers import float16 as f16  # type: ignore[no-redef]

        lib = "onnxruntime.transformers.float16"
    model = onnx.load(str(src))
    ml_ops = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    block = sorted(set(f16.DEFAULT_OP_BLOCK_LIST) | set(FP16_EXTRA_BLOCK) | set(ml_ops))
    if all(n.op_type in block for n in model.graph.node):
        raise VariantError(
            "fp16: every op of this graph must stay fp32 (e.g. scikit-learn ai.onnx.ml ops), so an "
            "fp16 variant would equal fp32; use --quantize none"
        )
    try:
        m16 = f16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    except Exception as exc:
        raise VariantError(f"fp16 conversion failed ({exc}); use --quantize none or dynamic") from exc
    onnx.save(m16, str(dst))
    return {"method": f"{lib}.convert_float_to_float16(keep_io_types=True)", "op_block_list": block}


def _genai_builder(precision: str) -> VariantBuilder:
    """A builder for one precision of a causal LM: ``src`` is the Hugging Face folder, ``dst`` the variant's
    ``model.onnx`` (its folder receives every file the builder writes)."""

    def build(src: Path, dst: Path, cfg: CompileConfig, data: Dataset | None) -> dict[str, Any]:
        from tierserve_compiler.causal_lm import run_builder

        return run_builder(src, dst.parent, precision)

    build.__name__ = f"build_genai_{precision}"
    return build


# --- the registry ---------------------------------------------------------------------------------

CPU, GPU = "cpu", "gpu"


@dataclass(frozen=True)
class VariantSpec:
    """Everything the pipeline knows about one variant. ``quantize``, ``select``, the option checks
    and ``MODE_VARIANTS`` read these fields; none of them names a variant."""

    build: VariantBuilder
    filename: str  # inside NAME/VERSION/
    tiers: tuple[str, ...]  # which tiers may serve it: "cpu" (Lambda, onnxruntime) and/or "gpu" (Triton)
    mode: str  # the --quantize mode that asks for exactly this variant (``auto`` builds every variant)
    needs_calibration: bool = False  # built from --calibration data
    per_channel: bool = False  # honours --per-channel / --per-tensor
    budget: Budget = field(default_factory=Budget)  # default accuracy budget against fp32 (``cfg.budget`` wins)
    why_tiers: str = ""  # one line: why it serves only ``tiers`` (shown when an option contradicts them)
    task: str = TASK_INFERENCE  # the kind of model it applies to: inference | text-generation
    unit: str = "ms"  # how its speed is measured: "ms" per request, or "tokens/s" (+ time to first token)


#: The fp32 variant: the reference the others are measured against, and the GPU tier's fallback.
REFERENCE = "fp32"

#: Variant key -> its record. Keys are exactly the manifest's variant keys; order is build order.
VARIANTS: dict[str, VariantSpec] = {
    REFERENCE: VariantSpec(build_fp32, "model.onnx", (CPU, GPU), "none"),
    "int8_dynamic": VariantSpec(
        build_int8_dynamic,
        "int8_dynamic.onnx",
        (CPU,),
        "dynamic",
        per_channel=True,
        why_tiers="dynamic int8 (MatMulInteger) only speeds up CPUs and the GPU tier serves float variants",
    ),
    "int8_static": VariantSpec(
        build_int8_static,
        "int8_static.onnx",
        (CPU,),
        "static",
        needs_calibration=True,
        per_channel=True,
        why_tiers="static QDQ int8 is tuned and measured for onnxruntime on CPU; the GPU tier serves float variants",
    ),
    "fp16": VariantSpec(
        build_fp16,
        "fp16.onnx",
        (GPU,),
        "fp16",
        why_tiers="onnxruntime's CPU kernels mostly lack fp16 and insert casts, so fp16 is slower on CPU",
    ),
    # Causal LMs (task text-generation): onnxruntime-genai folders, measured in tokens/s and TTFT.
    f"{TASK_TEXT_GENERATION}:{REFERENCE}": VariantSpec(
        _genai_builder("fp32"), "fp32/model.onnx", (CPU,), "none", task=TASK_TEXT_GENERATION, unit="tokens/s",
        budget=Budget(min_top1_agreement=1.0, max_perplexity_ratio=1.001, min_greedy_match=1.0),
        why_tiers="the GPU tier serves a causal LM with vLLM from its Hugging Face weights (issue 18)",
    ),
    f"{TASK_TEXT_GENERATION}:int4": VariantSpec(
        _genai_builder("int4"), "int4/model.onnx", (CPU,), "int4", task=TASK_TEXT_GENERATION, unit="tokens/s",
        budget=Budget(min_top1_agreement=0.90, max_perplexity_ratio=1.10, min_greedy_match=0.25),
        why_tiers="MatMulNBits int4 is built for onnxruntime-genai on CPU; the GPU tier runs vLLM (issue 18)",
    ),
    f"{TASK_TEXT_GENERATION}:int8": VariantSpec(
        _genai_builder("int8"), "int8/model.onnx", (CPU,), "int8", task=TASK_TEXT_GENERATION, unit="tokens/s",
        budget=Budget(min_top1_agreement=0.97, max_perplexity_ratio=1.02, min_greedy_match=0.5),
        why_tiers="MatMulNBits int8 is built for onnxruntime-genai on CPU; the GPU tier runs vLLM (issue 18)",
    ),
}


def registry_key(key: str, task: str = TASK_INFERENCE) -> str:
    """The :data:`VARIANTS` key of the manifest variant ``key`` of a ``task`` model."""
    return key if task == TASK_INFERENCE else f"{task}:{key}"


def variants_for(task: str = TASK_INFERENCE) -> dict[str, VariantSpec]:
    """Manifest variant key -> record, for the variants of ``task`` models, in build order."""
    return {k.split(":", 1)[-1] if s.task != TASK_INFERENCE else k: s for k, s in VARIANTS.items() if s.task == task}


def spec(key: str, task: str = TASK_INFERENCE) -> VariantSpec:
    return VARIANTS[registry_key(key, task)]


def quantize_modes(task: str | None = None) -> tuple[str, ...]:
    """``auto`` plus the mode of every registered variant (``none`` = fp32 only), of ``task`` or of every task."""
    specs = VARIANTS.values() if task is None else variants_for(task).values()
    return ("auto", *dict.fromkeys(s.mode for s in specs))


def mode_variants(mode: str, task: str = TASK_INFERENCE) -> tuple[str, ...]:
    """The variants a ``--quantize`` mode builds: fp32 first, then the mode's own (all for ``auto``)."""
    others = [k for k, s in variants_for(task).items() if k != REFERENCE and (mode == "auto" or s.mode == mode)]
    return (REFERENCE, *others)


#: ``--quantize`` modes (the CLI's choices: every task's), derived from the registry at import.
QUANTIZE_MODES: tuple[str, ...] = quantize_modes()
#: Which variants each ``--quantize`` mode builds for a model of the ``inference`` task (fp32 first), derived
#: from the registry at import; the pipeline calls :func:`mode_variants`, so a variant registered later (a
#: plug-in, a test) is seen too.
MODE_VARIANTS: dict[str, tuple[str, ...]] = {m: mode_variants(m) for m in quantize_modes(TASK_INFERENCE)}


def filename(key: str, task: str = TASK_INFERENCE) -> str:
    return spec(key, task).filename


def serves(key: str, tier: str, task: str = TASK_INFERENCE) -> bool:
    return tier in spec(key, task).tiers


def _modes(pred: Callable[[VariantSpec], bool], task: str = TASK_INFERENCE) -> str:
    """``a|b``: the --quantize modes of the (non-reference) variants for which ``pred`` holds."""
    return "|".join(dict.fromkeys(s.mode for k, s in variants_for(task).items() if k != REFERENCE and pred(s)))


def _check_explicit(key: str, spec: VariantSpec, cfg: CompileConfig) -> None:
    """An explicitly asked variant needs its calibration data and a --target among its tiers."""
    mode = f"--quantize {cfg.quantize}"
    if cfg.target in (CPU, GPU) and cfg.target not in spec.tiers:
        raise ConfigError(
            f"{mode} with --target {cfg.target}: {spec.why_tiers}; use --quantize "
            f"{_modes(lambda s: cfg.target in s.tiers)} for {cfg.target.upper()} or --target "
            f"{'|'.join((*spec.tiers, 'both'))}"
        )
    if spec.needs_calibration and cfg.calibration is None:
        alt = _modes(lambda s: not s.needs_calibration and bool(set(spec.tiers) & set(s.tiers)))
        raise ConfigError(
            f"{mode} builds {key}, which needs calibration data: pass --calibration or use --quantize {alt} "
            "(--calibration takes an .npz of model inputs keyed by input name)"
        )


def check_options(cfg: CompileConfig, task: str = TASK_INFERENCE) -> None:
    """Refuse option combinations that contradict the asked variants' records (before any work)."""
    modes = quantize_modes(task)
    if cfg.quantize not in modes:
        other = [t for t in (TASK_INFERENCE, TASK_TEXT_GENERATION) if t != task and cfg.quantize in quantize_modes(t)]
        kind = "a causal LM (text-generation)" if task == TASK_TEXT_GENERATION else "this model (inference)"
        hint = f" (it applies to {other[0]} models)" if other else ""
        if task == TASK_TEXT_GENERATION and cfg.quantize == "fp16":
            hint = (" (onnxruntime-genai's builder writes fp16 for CUDA/DML only, and the GPU tier serves a causal "
                    "LM with vLLM from its Hugging Face weights, issue 18)")
        raise ConfigError(f"--quantize {cfg.quantize!r} does not apply to {kind}{hint}; use one of {', '.join(modes)}")
    if task != TASK_INFERENCE:
        return  # the causal-LM options are checked in tierserve_compiler.causal_lm.check_options
    asked = {k: VARIANTS[k] for k in mode_variants(cfg.quantize) if k != REFERENCE}
    mode = f"--quantize {cfg.quantize}"
    for key, spec in asked.items() if cfg.quantize != "auto" else ():
        _check_explicit(key, spec, cfg)
    if cfg.per_channel is True and not any(s.per_channel for s in asked.values()):
        keys = ", ".join(k for k, s in VARIANTS.items() if s.per_channel)
        raise ConfigError(
            f"--per-channel applies to variants with quantized weights ({keys}), not {mode}; "
            f"drop --per-channel or use --quantize {_modes(lambda s: s.per_channel)}|auto"
        )
    if cfg.calibration_method is not None and not any(s.needs_calibration for s in asked.values()):
        keys = ", ".join(k for k, s in VARIANTS.items() if s.needs_calibration)
        raise ConfigError(
            f"--calibration-method only applies to calibrated variants ({keys}), not {mode}; drop it or use "
            f"--quantize {_modes(lambda s: s.needs_calibration)}|auto with --calibration FILE.npz"
        )
