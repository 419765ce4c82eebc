"""``bench/results/latest.json`` and ``latest.md`` (with PNG plots) from one ``tierserve bench`` run.

The JSON is the record (its schema is checked by tests/unit/bench/test_bench_report.py); the Markdown is
generated from it alone: a table per suite, the goals, and the plots (latency against concurrency,
size and latency per variant, the cost simulation).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = "tierserve-bench/1"
PACKAGES = ("tierserve", "onnxruntime", "numpy", "orjson", "tritonclient", "aws-lambda-powertools", "pyarrow",
            "locust", "nvidia-pytriton", "boto3", "moto", "matplotlib")


_NUM = {"type": ["number", "null"]}
_SERIES = {"type": "object", "required": ["name", "unit", "value", "samples", "p50", "p95", "p99"],
           "properties": {"name": {"type": "string"}, "unit": {"type": "string"}, "value": {"type": "number"},
                          "samples": {"type": "integer", "minimum": 0}, "p50": _NUM, "p95": _NUM, "p99": _NUM}}
#: JSON Schema of latest.json (tests/unit/bench/test_bench_report.py validates every run's document against it)
JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema", "started_at", "finished_at", "seconds", "quick", "machine", "versions", "suites",
                 "figures"],
    "properties": {
        "schema": {"const": SCHEMA},
        "quick": {"type": "boolean"},
        "seconds": {"type": "number"},
        "machine": {"type": "object", "required": ["cpu_count", "cpu_model", "python", "platform", "load_average"]},
        "versions": {"type": "object", "required": ["tierserve", "onnxruntime", "numpy"]},
        "suites": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["status", "seconds", "figures"],
            "properties": {"status": {"enum": ["ok", "skipped", "failed"]}, "reason": {"type": "string"}}}},
        "figures": {"type": "array", "items": {
            "type": "object",
            "required": ["suite", "name", "measured", "baseline", "ratio", "better", "goal", "met", "conditions"],
            "properties": {"suite": {"type": "string"}, "name": {"type": "string"}, "measured": _SERIES,
                           "baseline": {"anyOf": [_SERIES, {"type": "null"}]}, "ratio": _NUM,
                           "better": {"enum": ["lower", "higher"]}, "met": {"type": ["boolean", "null"]},
                           "goal": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["on", "op", "value"]}]},
                           "conditions": {"type": "string"}}}},
    },
}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    with contextlib.suppress(ValueError, OSError):
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu, "memory_gb": mem_gb, "platform": platform.platform(),
            "python": platform.python_version(), "load_average": list(os.getloadavg())}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           check=False, cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        out["git_commit"] = None
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def write(doc: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write latest.json and latest.md (+ plots) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "latest.json"
    js.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    plots = _plots(doc, out_dir)
    md = out_dir / "latest.md"
    md.write_text(markdown(doc, plots))
    return js, md


def markdown(doc: dict[str, Any], plots: dict[str, str]) -> str:
    m = doc["machine"]
    lines = [f"# tierserve bench - {doc['finished_at']}", "",
             f"{'quick' if doc['quick'] else 'full'} run, {doc['seconds']:.0f} s; {m['cpu_count']} cores "
             f"({m['cpu_model']}), {m['memory_gb']} GB, Python {m['python']}; load average at the start "
             f"{', '.join(f'{x:.1f}' for x in doc['load_average_start'])}, at the end "
             f"{', '.join(f'{x:.1f}' for x in m['load_average'])}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v) + ".", "",
             "Every figure is measured against its baseline in the same run. `ratio` = measured / baseline.", ""]
    for suite, info in doc["suites"].items():
        lines += [f"## {suite}", ""]
        if info["status"] != "ok":
            lines += [f"**{info['status']}**: {info.get('reason', '')}", ""]
            continue
        lines += ["| figure | measured | baseline | ratio | goal | n | p50 | p95 | p99 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for f in (f for f in doc["figures"] if f["suite"] == suite):
            me, base = f["measured"], f["baseline"]
            goal = "" if not f["goal"] else (f"{f['goal']['on']} {f['goal']['op']} {f['goal']['value']} "
                                             f"{'✅' if f['met'] else '❌'}")
            lines.append(f"| {f['name']} | {_fmt(me['value'])} {me['unit']} | "
                         f"{_fmt(base['value']) + ' ' + base['unit'] if base else '-'} | {_fmt(f['ratio'])} | {goal} | "
                         f"{me['samples']}{'/' + str(base['samples']) if base else ''} | {_fmt(me['p50'])} | "
                         f"{_fmt(me['p95'])} | {_fmt(me['p99'])} |")
        conditions = sorted({f["conditions"] for f in doc["figures"] if f["suite"] == suite and f["conditions"]})
        lines += [""] + [f"- {c}" for c in conditions] + [""]
        if suite in plots:
            lines += [f"![{suite}]({plots[suite]})", ""]
        for key in sorted(k for k in plots if k.startswith(f"{suite}:")):  # a suite's further plots
            lines += [f"![{key}]({plots[key]})", ""]
        notes = info.get("notes")
        if notes:
            lines += ["```", json.dumps(notes, indent=1, default=str)[:4000], "```", ""]
    return "\n".join(lines) + "\n"


def _plots(doc: dict[str, Any], out_dir: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made: dict[str, str] = {}
    figs = doc["figures"]
    # latency against concurrency: gateway and load suites
    for suite in ("gateway", "load"):
        series = latency_series(figs, suite)
        if not series:
            continue
        fig = latency_figure(series, suite)
        name = f"{suite}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made[suite] = name
    quant = [f for f in figs if f["suite"] == "quant" and "size_mb" in f.get("extra", {})]
    if quant:
        fig, ax = plt.subplots(figsize=(7, 4))
        for f in quant:
            ax.scatter(f["extra"]["size_mb"], f["measured"]["value"], s=40)
            ax.annotate(f["extra"]["label"], (f["extra"]["size_mb"], f["measured"]["value"]), fontsize=7)
        ax.set_xlabel("size (MB)")
        ax.set_ylabel("p50 latency at batch 1, 1 thread (ms)")
        ax.set_title("quantization variants: size and latency (compiler's report.json)")
        fig.tight_layout()
        fig.savefig(out_dir / "quant.png", dpi=110)
        plt.close(fig)
        made["quant"] = "quant.png"
    cost = doc["suites"].get("cost", {}).get("notes", {}).get("plot")
    if cost:
        made["cost"] = cost
    gen_cost = (doc["suites"].get("cost", {}).get("notes", {}).get("generation") or {}).get("plot")
    if gen_cost:
        made["cost:generation"] = gen_cost
    if any(f["suite"] == "generate" for f in figs):
        fig = generate_figure(figs)
        fig.savefig(out_dir / "generate.png", dpi=110)
        plt.close(fig)
        made["generate"] = "generate.png"
    return made


def generate_figure(figs: list[dict[str, Any]]) -> Any:
    """The generate suite: time to first token by prompt length, and output tokens/s by concurrency, each for
    the gateway (measured) and the raw onnxruntime-genai loop (baseline)."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, key, ylabel in ((left, "ttft", "prompt_tokens", "p50 time to first token (ms)"),
                                  (right, "tokens_per_s", "concurrency", "output tokens/s")):
        rows = sorted((f["extra"][key], f) for f in figs
                      if f["suite"] == "generate" and (f.get("extra") or {}).get("kind") == kind)
        for side, style in (("measured", "o-"), ("baseline", "s--")):
            pts = [(x, f[side]["value"]) for x, f in rows if f[side]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=rows[0][1][side]["name"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel(key.replace("_", " "))
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    left.set_title("generate: time to first token by prompt length")
    right.set_title("generate: output tokens/s by concurrency")
    fig.tight_layout()
    return fig


def configuration(extra: dict[str, Any]) -> str:
    """What a figure was measured under, apart from its concurrency (``extra``'s other keys), as a label:
    e.g. "dynamic batching on". One line per series name *and* configuration: points of two configurations
    joined into one line would zig-zag between them."""
    parts = []
    for key, value in sorted(extra.items()):
        if key == "concurrency":
            continue
        words = key.replace("_", " ")
        parts.append(f"{words} {'on' if value else 'off'}" if isinstance(value, bool) else f"{words} {value}")
    return ", ".join(parts)


def latency_series(figs: list[dict[str, Any]], suite: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(series name, configuration) -> [(concurrency, p50 ms)] sorted by concurrency, for ``suite``'s figures
    that carry a concurrency."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for f in figs:
        extra = f.get("extra") or {}
        if f["suite"] != suite or "concurrency" not in extra:
            continue
        for side in ("measured", "baseline"):
            s = f[side]
            if s and s.get("p50") is not None:
                series.setdefault((s["name"], configuration(extra)), []).append((extra["concurrency"], s["p50"]))
    return {key: sorted(pts) for key, pts in sorted(series.items())}


def latency_figure(series: dict[tuple[str, str], list[tuple[int, float]]], suite: str) -> Any:
    """p50 latency against concurrency: a colour per series name, a line style per configuration."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = sorted({name for name, _ in series})
    configs = sorted({config for _, config in series})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    for (name, config), pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name}, {config}" if config else name,
                color=colours[names.index(name) % len(colours)], linestyle=styles[configs.index(config) % len(styles)])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"{suite}: latency against concurrency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def document(suites: dict[str, Any], figures: list[Any], quick: bool, started: str, finished: str, seconds: float,
             load_start: list[float]) -> dict[str, Any]:
    return {"schema": SCHEMA, "started_at": started, "finished_at": finished, "seconds": seconds, "quick": quick,
            "command": " ".join(sys.argv), "machine": machine(), "load_average_start": load_start,
            "versions": versions(), "suites": suites, "figures": [f.to_json() for f in figures]}
