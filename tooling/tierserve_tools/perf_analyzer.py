"""NVIDIA's perf_analyzer, found and run the same way by the tests and by ``tierserve bench``.

Where it comes from, in order (the first that exists; then it must run):

1. ``$PERF_ANALYZER``: a perf_analyzer binary or a wrapper taking the same flags;
2. ``perf_analyzer`` on ``PATH``;
3. ``shared/tools/perf-analyzer`` in a folder above the repository (this project's developer machines
   keep it in ``../shared``; it installs perf_analyzer 2.60 on first use, see ENVIRONMENT.md).

A clean clone on a CI machine has none of them: ``find()`` then says so, and the callers skip with
that reason rather than fail. ``run()`` returns perf_analyzer's CSV rows (one per concurrency).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "PERF_ANALYZER"
ROOT = Path(__file__).resolve().parents[2]  # the checkout (tooling/tierserve_tools/ is two below it)
SHARED_TOOL = Path("shared/tools/perf-analyzer")


@dataclass(frozen=True)
class Found:
    command: list[str] | None
    reason: str  # where it came from, or why there is none


def _candidates() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    env = os.environ.get(ENV_VAR)
    if env:
        out.append((env, f"${ENV_VAR}"))
    on_path = shutil.which("perf_analyzer")
    if on_path:
        out.append((on_path, "PATH"))
    for parent in ROOT.parents:
        tool = parent / SHARED_TOOL
        if tool.is_file():
            out.append((str(tool), str(tool)))
            break
    return out


def find(timeout_s: float = 120.0) -> Found:
    """The perf_analyzer command to run, or None with the reason there is none that runs here."""
    tried = []
    for path, source in _candidates():
        if not os.access(path, os.X_OK):
            tried.append(f"{path} ({source}) is not executable")
            continue
        try:
            # --version exits 0 once the binary and its loader work (the shared wrapper installs it first).
            proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{path} ({source}) does not run: {exc}")
            continue
        if proc.returncode == 0:
            return Found([path], source)
        tried.append(f"{path} ({source}) does not run: exit {proc.returncode}: "
                     f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    if not tried:
        return Found(None, f"perf_analyzer not found: set ${ENV_VAR}, put perf_analyzer on PATH, or keep "
                           f"{SHARED_TOOL} in a folder above {ROOT}")
    return Found(None, "; ".join(tried))


@dataclass(frozen=True)
class Row:
    """One concurrency level of a perf_analyzer run (latencies in ms)."""

    concurrency: int
    throughput: float  # inferences/s
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    count: int  # requests measured in the reported windows


def run(command: list[str], url: str, model: str, concurrency: list[int], csv_path: Path, *,
        window_ms: int = 2000, shapes: dict[str, list[int]] | None = None, input_data: str = "zero",
        extra: list[str] | None = None, timeout_s: float = 300.0,
        stability_pct: int = 50, max_trials: int = 4) -> tuple[list[Row], str]:
    """Run perf_analyzer over HTTP against ``url`` (host:port), once per concurrency level.

    ``stability_pct``: how far the last windows may differ (perf_analyzer's default 10 rarely holds on
    a shared 2-core machine; a figure reported from a looser window says so in its conditions).

    Returns the rows and perf_analyzer's output; RuntimeError with that output when it fails."""
    base = [*command, "-i", "http", "-u", url, "-m", model, "--input-data", input_data,
            "--measurement-interval", str(window_ms), "--stability-percentage", str(stability_pct),
            "--max-trials", str(max_trials), *(extra or [])]
    for name, shape in (shapes or {}).items():
        base += ["--shape", f"{name}:{','.join(str(d) for d in shape)}"]
    rows: list[Row] = []
    outputs = []
    for c in concurrency:
        level_csv = csv_path.with_name(f"{csv_path.stem}-c{c}{csv_path.suffix}")
        args = [*base, "--concurrency-range", f"{c}:{c}", "-f", str(level_csv)]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
        outputs.append(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed (exit {proc.returncode}): {' '.join(args)}\n"
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        rows += parse_csv(level_csv, request_counts(proc.stdout))
    return rows, "\n".join(outputs)


def parse_csv(path: Path, counts: list[int] | None = None) -> list[Row]:
    """perf_analyzer's ``-f`` CSV: one row per concurrency (latencies there are in microseconds)."""
    rows = []
    with open(path, newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            def ms(key: str, row: dict[str, str] = r) -> float:
                return float(row.get(key) or 0) / 1000

            count = counts[i] if counts and i < len(counts) else 0
            rows.append(Row(int(r["Concurrency"]), float(r["Inferences/Second"]), ms("p50 latency"),
                            ms("p90 latency"), ms("p95 latency"), ms("p99 latency"), count))
    return rows


def request_counts(stdout: str) -> list[int]:
    """The "Request count: N" of each concurrency level in perf_analyzer's report."""
    return [int(m.group(1)) for m in re.finditer(r"Request count: (\d+)", stdout)]
