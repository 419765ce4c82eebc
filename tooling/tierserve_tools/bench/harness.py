"""What every benchmark suite shares: figures with their baseline, percentiles, progress and skips.

A ``Figure`` is one measured path against its baseline *in the same run* (interleaved where the suite
can), with both sample sets, so that the ratio survives a shared, noisy machine: the noise hits both.
``Context`` is what a suite gets: where the models are, whether ``--quick``, a scratch folder, a
progress line printer and the list the figures go to. A suite that cannot run here raises ``Skip``
with the reason (the run goes on; the reason is written down).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Skip(Exception):
    """The suite (or one figure) cannot run here; the message says why."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default), without numpy."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class Series:
    """A measured path: its samples (or a single rate), in ``unit``."""

    name: str
    samples: list[float] = field(default_factory=list)
    unit: str = "ms"
    #: a rate measured over a window (rows/s, infer/s) rather than per-sample values; ``count`` says over what
    rate: float | None = None
    count: int | None = None
    p50_ms: float | None = None  # latency percentiles of a rate series, when the tool reports them
    p95_ms: float | None = None
    p99_ms: float | None = None

    @property
    def value(self) -> float:
        if self.rate is not None:
            return self.rate
        return percentile(self.samples, 50)

    def to_json(self) -> dict[str, Any]:
        if self.rate is not None:
            return {"name": self.name, "unit": self.unit, "value": self.rate, "samples": self.count or 0,
                    "p50": self.p50_ms, "p95": self.p95_ms, "p99": self.p99_ms}
        return {"name": self.name, "unit": self.unit, "value": self.value, "samples": len(self.samples),
                "p50": percentile(self.samples, 50),
                "p95": self.p95_ms if self.p95_ms is not None else percentile(self.samples, 95),
                "p99": self.p99_ms if self.p99_ms is not None else percentile(self.samples, 99),
                "mean": statistics.fmean(self.samples) if self.samples else math.nan}


@dataclass
class Figure:
    """One result: ``measured`` against ``baseline``; ratio = measured / baseline of their values.

    ``better``: "lower" for times, "higher" for rates. ``goal``: the ratio the issue asks for, if any
    (``goal_op`` "<=" or ">="); ``met`` follows."""

    suite: str
    name: str
    measured: Series
    baseline: Series | None
    better: str = "lower"
    goal: float | None = None
    goal_op: str = ">="
    #: what the goal is on: "ratio" (measured / baseline), "difference" (measured - baseline, in the unit),
    #: or "value" (measured alone)
    goal_on: str = "ratio"
    conditions: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline.value:
            return None
        return self.measured.value / self.baseline.value

    @property
    def difference(self) -> float | None:
        return None if self.baseline is None else self.measured.value - self.baseline.value

    @property
    def met(self) -> bool | None:
        r = {"ratio": self.ratio, "difference": self.difference, "value": self.measured.value}[self.goal_on]
        if self.goal is None or r is None or math.isnan(r):
            return None
        return r >= self.goal if self.goal_op == ">=" else r <= self.goal

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "name": self.name, "measured": self.measured.to_json(),
                "baseline": None if self.baseline is None else self.baseline.to_json(), "ratio": self.ratio,
                "difference": self.difference, "better": self.better,
                "goal": None if self.goal is None else {"on": self.goal_on, "op": self.goal_op, "value": self.goal},
                "met": self.met, "conditions": self.conditions, **({"extra": self.extra} if self.extra else {})}


@dataclass
class Context:
    models: Path
    workdir: Path
    quick: bool = False
    figures: list[Figure] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    out: Any = sys.stderr
    suite: str = ""
    _t0: float = field(default_factory=time.monotonic)

    def progress(self, message: str) -> None:
        """One progress line on stderr: elapsed time, suite, message."""
        print(f"[{time.monotonic() - self._t0:6.1f}s] {self.suite}: {message}", file=self.out, flush=True)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        r = figure.ratio
        shown = f"ratio {r:.3f}" if r is not None else f"{figure.measured.value:.3f} {figure.measured.unit}"
        if figure.goal_on == "difference" and figure.difference is not None:
            shown += f", +{figure.difference:.1f} {figure.measured.unit}"
        goal = "" if figure.goal is None else f" (goal {figure.goal_op} {figure.goal}: " \
                                              f"{'met' if figure.met else 'missed'})"
        self.progress(f"{figure.name}: {shown}{goal}")
        return figure

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def interleave(paths: dict[str, Callable[[], Any]], n: int, warmup: int = 3) -> dict[str, list[float]]:
    """Time each path ``n`` times, round-robin (a, b, a, b, ...), after ``warmup`` untimed rounds; ms."""
    out: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(n + warmup):
        for k, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                out[k].append(dt)
    return out


def suite_main(suite: str, run: Callable[[Context], None], doc: str | None,
               extra: Callable[[Any], dict[str, Any]] | None = None,
               options: Callable[[Any], None] | None = None) -> int:
    """``python -m benchmarks.NAME [--models DIR] [--quick]``: run one suite in a scratch folder and print
    its figures as JSON. ``options`` adds the suite's own flags; ``extra`` turns them into ``Context.notes``."""
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=Path("build/models"))
    ap.add_argument("--quick", action="store_true")
    if options is not None:
        options(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix=f"bench-{suite}-") as tmp:
        ctx = Context(args.models, Path(tmp), args.quick, suite=suite, notes=extra(args) if extra else {})
        run(ctx)
    print(json.dumps([f.to_json() for f in ctx.figures], indent=1, default=str))
    return 0
