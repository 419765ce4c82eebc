"""Model sources -> ONNX, through an explicit registry (:data:`SOURCES`). The accuracy gate that
checks the result against the source framework is :mod:`tierserve_compiler.gate`.

A SOURCE is a path to an ``.onnx`` file, or ``package.module:attr`` where ``attr`` is a fitted
scikit-learn estimator/pipeline, a ``torch.nn.Module``, or a zero-argument callable returning one.
A folder is a causal language model (task text-generation, :mod:`tierserve_compiler.causal_lm`): in
Hugging Face's layout (``config.json`` naming a ``*ForCausalLM`` architecture, safetensors, tokenizer
files), or already built for onnxruntime-genai (``genai_config.json``).
"""

from __future__ import annotations

import importlib
import inspect
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierserve.manifest import TensorSpec
from tierserve_compiler.config import CompileConfig
from tierserve_compiler.data import Dataset, make_dataset, specs_from_onnx, synthetic_dataset
from tierserve_compiler.errors import ExportError, SourceError, require
from tierserve_compiler.external_data import check_source, save_external
from tierserve_compiler.gate import compare_outputs, run_onnx

Reference = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Exported:
    """An ONNX graph that passed the accuracy gate, with what is known about its source."""

    onnx_path: Path
    source_kind: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    reference: Reference | None = None
    example: Dataset | None = None
    task_hint: str | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    causal: Any = None  # a causal LM's tierserve_compiler.causal_lm.CausalSource (task text-generation)


# --- source kinds -------------------------------------------------------------------------------


def _is_sklearn(obj: Any) -> bool:
    return any(c.__module__.startswith("sklearn.") for c in type(obj).__mro__) and hasattr(obj, "predict")


def _is_torch(obj: Any) -> bool:
    return any(c.__module__.startswith("torch.nn") for c in type(obj).__mro__)


def _is_onnx_path(obj: Any) -> bool:
    return isinstance(obj, Path)


def export_onnx_file(path: Path, cfg: CompileConfig, workdir: Path) -> Exported:
    """Check an ``.onnx`` file (checker, shape inference, safe external data inside its folder)."""
    onnx = require("onnx", "compiler")
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"ONNX file {path} does not exist; check the SOURCE path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise SourceError(f"{path} is not a readable ONNX model ({exc}); re-export it") from exc
    external = check_source(path)
    try:
        onnx.checker.check_model(str(path), full_check=False)
        full = onnx.load(str(path))  # with its external data
        onnx.shape_inference.infer_shapes(full, strict_mode=True)
    except Exception as exc:
        raise SourceError(f"{path} fails onnx.checker/shape inference: {exc}; fix or re-export the model") from exc
    copy = workdir / "exported.onnx"
    if external:  # re-saved, with one external file of our own naming
        save_external(full, copy)
    else:
        shutil.copyfile(path, copy)
    inputs, outputs = specs_from_onnx(model)
    return Exported(
        copy,
        "onnx",
        inputs,
        outputs,
        notes=["ONNX file: checked with onnx.checker and strict shape inference; it is its own reference"],
    )


def export_sklearn(est: Any, cfg: CompileConfig, workdir: Path) -> Exported:
    """scikit-learn -> ONNX with skl2onnx; classifiers without ZipMap (``label`` + ``probabilities``)."""
    skl2onnx = require("skl2onnx", "compiler")
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.base import is_classifier

    n = getattr(est, "n_features_in_", None)
    if n is None:
        raise SourceError(
            f"{type(est).__name__} is not fitted (no n_features_in_); pass a fitted estimator "
            "or a zero-argument function that returns one"
        )
    final = est.steps[-1][1] if hasattr(est, "steps") else est
    classifier = is_classifier(est)
    options: dict[int, dict[str, Any]] = {id(final): {"zipmap": False}} if classifier else {}
    for _, step in getattr(est, "steps", []):
        if type(step).__name__ == "StandardScaler":
            options[id(step)] = {"div": "div"}  # Sub/Div instead of ai.onnx.ml Scaler
    try:
        onx = skl2onnx.to_onnx(est, initial_types=[("input", FloatTensorType([None, int(n)]))], options=options or None)
    except Exception as exc:
        raise ExportError(
            f"skl2onnx cannot convert {type(est).__name__}: {exc}; check the skl2onnx "
            "supported-converters list or register a custom converter"
        ) from exc
    from tierserve_compiler.sklearn_ops import rewrite_linear_ml_ops

    plain = type(onx)()
    plain.CopyFrom(onx)
    plain, rewritten = rewrite_linear_ml_ops(plain)
    path = workdir / "exported.onnx"
    path.write_bytes(plain.SerializeToString())
    inputs, outputs = specs_from_onnx(onx)

    def reference(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feed["input"]
        if classifier:
            out = {}
            for o in outputs:
                out[o.name] = (
                    np.asarray(est.predict(x))
                    if o.datatype in ("INT64", "BYTES")
                    else np.asarray(est.predict_proba(x), dtype=np.float64)
                )
            return out
        y = np.asarray(est.predict(x), dtype=np.float64)
        return {outputs[0].name: y.reshape(len(x), -1) if len(outputs[0].shape) == 2 else y}

    notes = [f"scikit-learn {type(est).__name__} converted with skl2onnx (zipmap=False)"]
    if rewritten:
        notes.append(f"{rewritten} ai.onnx.ml linear node(s) rewritten to standard ONNX ops so they can be quantized")
        try:  # the rewrite must be exact; otherwise keep skl2onnx's graph
            probe = synthetic_dataset(inputs, 32, cfg.seed).inputs
            res = compare_outputs(run_onnx(path, probe), reference(probe), probe, cfg.gate_tolerance)
            if not all(v["ok"] for v in res.values()):
                raise ValueError(res)
        except Exception:
            path.write_bytes(onx.SerializeToString())
            notes[-1] = "kept skl2onnx's ai.onnx.ml graph (the standard-op rewrite did not match)"
    return Exported(
        path,
        "sklearn",
        inputs,
        outputs,
        reference=reference,
        task_hint="classifier" if classifier else "regressor",
        notes=notes,
    )


def export_torch(module: Any, cfg: CompileConfig, workdir: Path) -> Exported:
    """torch -> ONNX with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``).

    The dynamo exporter is torch 2.13's supported path (the TorchScript exporter is deprecated);
    it traces with ``torch.export`` and writes a graph whose dynamic axes are real symbolic dims.
    """
    torch = require("torch", "torch")
    require("onnxscript", "torch")
    module = module.eval()
    arg_names = [p for p in inspect.signature(module.forward).parameters if p not in ("self",)]
    if cfg.example_inputs is not None:
        with np.load(cfg.example_inputs, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "_labels"}
        if len(arrays) == 1 and len(arg_names) >= 1 and arg_names[0] not in arrays:
            arrays = {arg_names[0]: next(iter(arrays.values()))}
    elif hasattr(module, "example_inputs"):
        ex = module.example_inputs
        arrays = dict(ex() if callable(ex) else ex)
    else:
        raise SourceError(
            "exporting a torch module needs example inputs: pass --example-inputs FILE.npz "
            f"keyed by the forward() argument names {arg_names}"
        )
    names = [n for n in arg_names if n in arrays]
    extra = set(arrays) - set(names)
    if extra:
        raise SourceError(
            f"--example-inputs has arrays {sorted(extra)} that are not forward() arguments {arg_names}; rename them"
        )
    for ax_name in cfg.dynamic_axes:
        if ax_name not in names:
            raise SourceError(f"--dynamic-axis names input {ax_name!r}, but the inputs are {names}")
    # A batch of 1 would be specialised to a constant by torch.export: export with >= 2 rows.
    rows = len(next(iter(arrays.values())))
    ex_np = {n: np.concatenate([arrays[n]] * 2) if rows < 2 else arrays[n] for n in names}
    args = tuple(torch.from_numpy(np.ascontiguousarray(ex_np[n])) for n in names)
    output_names = list(getattr(module, "output_names", []) or [])
    with torch.no_grad():
        probe = module(*args)
    flat = (
        list(probe.values()) if isinstance(probe, dict) else list(probe) if isinstance(probe, tuple | list) else [probe]
    )
    if isinstance(probe, dict) and not output_names:
        output_names = list(probe.keys())
    if not output_names:
        output_names = ["output"] if len(flat) == 1 else [f"output_{i}" for i in range(len(flat))]
    batch = torch.export.Dim("batch")
    dynamic_shapes = {
        n: {0: batch, **{int(a): torch.export.Dim.AUTO for a in cfg.dynamic_axes.get(n, [])}} for n in names
    }
    path = workdir / "exported.onnx"
    try:
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            input_names=names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export(dynamo=True) failed: {str(exc)[:1500]}; make forward() "
            "traceable by torch.export (no data-dependent Python control flow)"
        ) from exc
    onnx = require("onnx", "compiler")
    model = onnx.load(str(path))
    inputs, outputs = specs_from_onnx(model)
    for s in inputs:
        wanted = [0, *cfg.dynamic_axes.get(s.name, [])]
        static = [a for a in wanted if a < len(s.shape) and s.shape[a] != -1]
        if static:
            raise ExportError(
                f"input {s.name!r} axes {static} came out static in the exported graph although "
                "they were asked to be dynamic; the model specialises on them (check reshapes)"
            )

    def reference(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            res = module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names))
        vals = list(res.values()) if isinstance(res, dict) else list(res) if isinstance(res, tuple | list) else [res]
        return {o: v.detach().numpy() for o, v in zip(output_names, vals, strict=True)}

    example = make_dataset(arrays, inputs, what="example inputs")
    return Exported(
        path,
        "torch",
        inputs,
        outputs,
        reference=reference,
        example=example,
        task_hint=getattr(module, "task", None),
        notes=[f"torch {type(module).__name__} exported with torch.onnx.export(dynamo=True)"],
    )


def _is_hf_causal_lm(obj: Any) -> bool:
    return isinstance(obj, Path) and obj.is_dir() and (obj / "config.json").is_file() \
        and not (obj / "genai_config.json").is_file()


def _is_genai_folder(obj: Any) -> bool:
    return isinstance(obj, Path) and obj.is_dir() and (obj / "genai_config.json").is_file()


def export_causal_lm(folder: Path, cfg: CompileConfig, workdir: Path) -> Exported:
    """A causal LM folder, inspected (architecture, family, shape, tokenizer, chat template); its variants are
    built by onnxruntime-genai's model builder (``variants.VARIANTS``, task text-generation)."""
    from tierserve_compiler.causal_lm import describe, inspect_source

    src = inspect_source(folder)
    return Exported(src.model_file, src.kind, list(src.inputs), list(src.outputs), task_hint="text-generation",
                    notes=describe(src), causal=src)


@dataclass(frozen=True)
class SourceKind:
    accepts: Callable[[Any], bool]
    export: Callable[[Any, CompileConfig, Path], Exported]


#: Source kinds, tried in order on the loaded object.
SOURCES: dict[str, SourceKind] = {
    "hf-causal-lm": SourceKind(_is_hf_causal_lm, export_causal_lm),
    "onnxruntime-genai": SourceKind(_is_genai_folder, export_causal_lm),
    "onnx": SourceKind(_is_onnx_path, export_onnx_file),
    "sklearn": SourceKind(_is_sklearn, export_sklearn),
    "torch": SourceKind(_is_torch, export_torch),
}


#: The kinds whose models are causal LMs (task text-generation).
CAUSAL_LM_KINDS = ("hf-causal-lm", "onnxruntime-genai")


def source_task(source: str) -> str:
    """``text-generation`` for a causal LM folder, else ``inference``; cheap (looks at file names only)."""
    if ":" not in source and Path(source).is_dir():
        return "text-generation"
    return "inference"


def load_source(source: str) -> tuple[str, Any]:
    """Resolve SOURCE to ``(kind, object)``; zero-argument factories are called."""
    if ":" not in source and Path(source).is_dir():
        folder = Path(source)
        for kind in CAUSAL_LM_KINDS:
            if SOURCES[kind].accepts(folder):
                return kind, folder
        raise SourceError(f"SOURCE {source!r} is a folder without config.json or genai_config.json; a folder is a "
                          "causal LM in Hugging Face's layout (config.json, safetensors, tokenizer.json) or one built "
                          "for onnxruntime-genai (genai_config.json)")
    if source.endswith(".onnx") or (":" not in source and Path(source).exists()):
        return "onnx", Path(source)
    if ":" not in source:
        raise SourceError(f"SOURCE {source!r} is neither an .onnx file nor 'package.module:attr'")
    mod_name, _, attr = source.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SourceError(
            f"cannot import module {mod_name!r} for SOURCE {source!r}: {exc}; "
            "check the module path and that its package is installed"
        ) from exc
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SourceError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    for _ in range(2):
        for kind, sk in SOURCES.items():
            if sk.accepts(obj):
                return kind, obj
        if callable(obj) and not isinstance(obj, type):
            try:
                obj = obj()
            except TypeError as exc:
                raise SourceError(
                    f"{source} is a callable that needs arguments ({exc}); point SOURCE at a "
                    "zero-argument factory or a fitted model"
                ) from exc
            continue
        break
    raise SourceError(
        f"{source} is a {type(obj).__name__}; supported: .onnx files, fitted scikit-learn "
        "estimators/pipelines, torch.nn.Module, or zero-argument factories returning one"
    )


def export(cfg: CompileConfig, workdir: Path) -> Exported:
    """Step 1: load SOURCE, convert it to ONNX (not yet gated)."""
    kind, obj = load_source(cfg.source)
    return SOURCES[kind].export(obj, cfg, workdir)
