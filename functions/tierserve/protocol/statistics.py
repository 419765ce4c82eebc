"""Inference statistics in Triton's format, from this execution environment's own counters.

Why here and in this shape: perf_analyzer and ``tritonclient.get_inference_statistics`` read
``GET /v2/models[/NAME[/versions/V]]/stats`` the way Triton answers it, so the gateway answers the
same document. The counters belong to one execution environment (one Lambda instance, one worker
process): they are built by the composition root (``tierserve.app.build_runtime``) and live as long
as its ``Runtime``, never in module globals, so a test's runtime starts from zero and concurrent
Lambda instances each report their own, as Triton's instances do per server.

What each field means here (durations are cumulative nanoseconds):

* ``success`` / ``fail``: requests answered / refused after the model was found, end to end;
* ``queue``: one per answered request, 0 ns: the gateway keeps no queue of its own;
* ``compute_input``: reading the request's header and checking it against the manifest;
* ``compute_infer``: the tier dispatcher's call (the CPU function or Triton, fallback included);
* ``compute_output``: encoding the reply;
* ``inference_count``: rows served (Triton counts each batch element); ``execution_count``: requests;
* ``batch_stats``: the same three compute figures per batch size.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

_PHASES = ("compute_input", "compute_infer", "compute_output")


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, ns)

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class _Counters:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    phases: dict[str, _Duration] = field(default_factory=lambda: {p: _Duration() for p in _PHASES})
    batches: dict[int, dict[str, _Duration]] = field(default_factory=dict)


def _empty() -> dict[str, int]:
    return {"count": 0, "ns": 0}


class InferenceStats:
    """Thread-safe per-(model, version) counters; ``to_triton`` renders Triton's statistics JSON."""

    def __init__(self, clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], _Counters] = {}

    def _counters(self, name: str, version: str) -> _Counters:
        key = (name, version)
        c = self._models.get(key)
        if c is None:
            c = self._models[key] = _Counters()
        return c

    def success(self, name: str, version: str, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One request answered: ``rows`` inferences in one execution, timed per phase."""
        with self._lock:
            c = self._counters(name, version)
            c.last_inference_ms = self._clock_ms()
            c.inference_count += rows
            c.execution_count += 1
            c.success.add(input_ns + infer_ns + output_ns)
            batch = c.batches.setdefault(rows, {p: _Duration() for p in _PHASES})
            for phase, ns in zip(_PHASES, (input_ns, infer_ns, output_ns), strict=True):
                c.phases[phase].add(ns)
                batch[phase].add(ns)

    def failure(self, name: str, version: str, ns: int) -> None:
        """One request refused or failed after its model was found."""
        with self._lock:
            c = self._counters(name, version)
            c.last_inference_ms = self._clock_ms()
            c.fail.add(ns)

    def to_triton(self, versions: Iterable[tuple[str, str]]) -> dict[str, Any]:
        """``{"model_stats": [...]}`` for each (name, version), zeros for one never called."""
        with self._lock:
            return {"model_stats": [self._model_json(n, v) for n, v in versions]}

    def _model_json(self, name: str, version: str) -> dict[str, Any]:
        c = self._models.get((name, version)) or _Counters()
        return {
            "name": name,
            "version": version,
            "last_inference": c.last_inference_ms,
            "inference_count": c.inference_count,
            "execution_count": c.execution_count,
            "inference_stats": {
                "success": c.success.to_json(),
                "fail": c.fail.to_json(),
                "queue": {"count": c.success.count, "ns": 0},
                **{p: c.phases[p].to_json() for p in _PHASES},
                "cache_hit": _empty(),
                "cache_miss": _empty(),
            },
            "response_stats": {},
            "batch_stats": [
                {"batch_size": size, **{p: d.to_json() for p, d in phases.items()}}
                for size, phases in sorted(c.batches.items())
            ],
            "memory_usage": [],
        }
