"""Accuracy metrics of a variant against fp32, through an explicit registry (:data:`METRICS`).

Default metrics depend on the model's task (:data:`TASK_METRICS`): classifiers get label agreement
(plus accuracy when the validation file has ``_labels``), regressors max-abs and mean-relative
error, embedding models cosine similarity. ``--metric`` overrides the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tierserve.manifest import TensorSpec
from tierserve_compiler.config import Budget
from tierserve_compiler.errors import ConfigError

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Task:
    kind: str  # classifier | regressor | embedding
    label_output: str | None
    float_output: str | None  # the primary float output (probabilities, prediction, embedding)


def detect_task(outputs: list[TensorSpec], hint: str | None = None) -> Task:
    ints = [o.name for o in outputs if o.datatype.startswith(("INT", "UINT"))]
    floats = [o.name for o in outputs if o.datatype.startswith("FP")]
    emb = [n for n in floats if "embedding" in n.lower()]
    probs = [n for n in floats if n.lower().startswith("prob")]
    kind = hint or ("classifier" if ints and floats else "embedding" if emb else "regressor")
    if kind == "classifier":
        return Task(kind, ints[0] if ints else None, next(iter(probs or floats), None))
    if kind == "embedding":
        return Task(kind, None, next(iter(emb or floats[-1:]), None))
    return Task("regressor", None, next(iter(floats), None))


def _labels_of(out: Outputs, task: Task) -> np.ndarray:
    if task.label_output:
        return np.asarray(out[task.label_output]).reshape(-1)
    assert task.float_output is not None
    return np.asarray(out[task.float_output]).reshape(len(out[task.float_output]), -1).argmax(axis=1)


def _float(out: Outputs, task: Task) -> np.ndarray:
    if task.float_output is None:
        raise ConfigError("this metric needs a floating-point output, and the model has none; pick another --metric")
    return np.asarray(out[task.float_output], dtype=np.float64)


def label_agreement(ref: Outputs, got: Outputs, task: Task, labels: np.ndarray | None) -> float | None:
    return float(np.mean(_labels_of(ref, task) == _labels_of(got, task)))


def accuracy(ref: Outputs, got: Outputs, task: Task, labels: np.ndarray | None) -> float | None:
    if labels is None:
        return None
    return float(np.mean(_labels_of(got, task) == np.asarray(labels).reshape(-1)))


def max_abs(ref: Outputs, got: Outputs, task: Task, labels: np.ndarray | None) -> float | None:
    return float(np.max(np.abs(_float(got, task) - _float(ref, task))))


def mean_rel(ref: Outputs, got: Outputs, task: Task, labels: np.ndarray | None) -> float | None:
    r, g = _float(ref, task), _float(got, task)
    return float(np.mean(np.abs(g - r)) / max(float(np.mean(np.abs(r))), 1e-12))


def cosine(ref: Outputs, got: Outputs, task: Task, labels: np.ndarray | None) -> float | None:
    r, g = _float(ref, task), _float(got, task)
    r, g = r.reshape(len(r), -1), g.reshape(len(g), -1)
    num = np.sum(r * g, axis=1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


@dataclass(frozen=True)
class Metric:
    fn: Callable[[Outputs, Outputs, Task, np.ndarray | None], float | None]
    higher_is_better: bool
    #: (variant value, fp32 value, budget) -> (within budget, why); None = informational only
    check: Callable[[float, float, Budget], tuple[bool, str]] | None


def _check_agreement(v: float, f: float, b: Budget) -> tuple[bool, str]:
    return v >= b.min_label_agreement, f"label agreement {v:.2%} vs minimum {b.min_label_agreement:.2%}"


def _check_accuracy(v: float, f: float, b: Budget) -> tuple[bool, str]:
    drop = (f - v) / f if f > 0 else 0.0
    text = f"accuracy {v:.2%} vs fp32 {f:.2%} (relative drop {drop:.2%}, max {b.max_rel_drop:.0%})"
    return drop <= b.max_rel_drop, text


def _check_rel(v: float, f: float, b: Budget) -> tuple[bool, str]:
    return v <= b.max_rel_drop, f"mean relative error {v:.3%} vs max {b.max_rel_drop:.0%}"


def _check_cos(v: float, f: float, b: Budget) -> tuple[bool, str]:
    return v >= b.min_cosine, f"mean cosine {v:.4f} vs minimum {b.min_cosine}"


#: Metric name -> implementation and budget rule.
METRICS: dict[str, Metric] = {
    "label_agreement": Metric(label_agreement, True, _check_agreement),
    "accuracy": Metric(accuracy, True, _check_accuracy),
    "max_abs": Metric(max_abs, False, None),
    "mean_rel": Metric(mean_rel, False, _check_rel),
    "cosine": Metric(cosine, True, _check_cos),
}

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classifier": ("label_agreement", "accuracy"),
    "regressor": ("max_abs", "mean_rel"),
    "embedding": ("cosine", "max_abs"),
}


def choose_metrics(task: Task, override: tuple[str, ...] = ()) -> tuple[str, ...]:
    for m in override:
        if m not in METRICS:
            raise ConfigError(f"unknown --metric {m!r}; metrics: {', '.join(METRICS)}")
    return tuple(override) or TASK_METRICS[task.kind]


def evaluate_outputs(
    ref: Outputs, got: Outputs, task: Task, names: tuple[str, ...], labels: np.ndarray | None
) -> dict[str, float | None]:
    return {n: METRICS[n].fn(ref, got, task, labels) for n in names}


def within_budget(
    values: dict[str, float | None], fp32: dict[str, float | None], budget: Budget
) -> tuple[bool, list[str]]:
    ok, why = True, []
    for name, v in values.items():
        chk = METRICS[name].check
        if v is None or chk is None:
            continue
        good, text = chk(v, fp32.get(name) or v, budget)
        ok &= good
        why.append(("ok: " if good else "over budget: ") + text)
    return ok, why


def metric_summary(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, int | float))
