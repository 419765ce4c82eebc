"""report.json (everything), report.md (for people) and report.png (size, latency, accuracy per variant)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tierserve.manifest import ModelVersion
    from tierserve_compiler.config import CompileConfig
    from tierserve_compiler.data import Dataset
    from tierserve_compiler.metrics import Task
    from tierserve_compiler.pipeline import BuiltVariant
    from tierserve_compiler.placement import Placement
    from tierserve_compiler.sources import Exported


def _identity(mv: ModelVersion, cfg: CompileConfig, exported: Exported) -> dict[str, Any]:
    """The head of every report (a classic model's and a causal LM's): which model, from what."""
    return {"name": mv.name, "version": mv.version, "created_at": mv.created_at, "source": cfg.source,
            "source_kind": exported.source_kind}


def build_report(
    cfg: CompileConfig,
    exported: Exported,
    task: Task,
    metric_names: tuple[str, ...],
    variants: list[BuiltVariant],
    triton_variant: str,
    placement: Placement,
    mv: ModelVersion,
    data: Dataset,
) -> dict[str, Any]:
    """Everything a compile decided and measured, for report.json (and the markdown and chart)."""
    import numpy as np
    import onnx
    import onnxruntime

    from tierserve_compiler.variants import VARIANTS

    return {
        **_identity(mv, cfg, exported),
        "task": task.kind,
        "metrics": list(metric_names),
        "notes": exported.notes,
        "gate": exported.gate,
        "evaluation_data": {"source": data.source, "rows": data.rows, "labels": data.labels is not None},
        "selected_variant": mv.selected_variant,
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
                "budget_limits": vars(cfg.budget or VARIANTS[v.key].budget),
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
            "budget": vars(cfg.budget) if cfg.budget else "each variant's default (variants.*.budget_limits)",
            "profile": vars(cfg.profile),
            "limits": vars(cfg.limits),
            "optimization_level": cfg.optimization_level,
        },
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
    }


#: Selection colours (size and accuracy panels) and the batch sizes' colours (latency panel) never overlap: each
#: colour on the chart has one meaning.
SELECTED, OTHER = "tab:orange", "0.65"
#: Metrics that equal 1 when a variant computes what fp32 does: plotted as 1 - value on a log axis, where
#: 0.993 and 0.99999 are decades apart (on a 0-1 axis they are two bars of the same height).
SIMILARITIES = ("cosine", "label_agreement", "top1_agreement", "greedy_match")
#: Where a distance of exactly 0 (the variant equals fp32) is drawn on a log axis.
LOG_FLOOR = 1e-7


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = chart_figure(report)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chart_figure(report: dict[str, Any]) -> Any:
    """report.png's figure: size, p50 latency per batch size, and the first metric against fp32, per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    vs = {k: v for k, v in report["variants"].items() if v.get("profile")}
    keys = list(vs)
    selected = report["selected_variant"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = [SELECTED if k == selected else OTHER for k in keys]
    selection_legend = [Patch(color=SELECTED, label=f"selected ({selected})"), Patch(color=OTHER, label="other")]
    axes[0].bar(keys, [vs[k]["size_bytes"] / 2**20 for k in keys], color=colors)
    axes[0].set_title("size on disk (MB)")
    axes[0].set_ylim(0, axes[0].get_ylim()[1] * 1.25)
    axes[0].legend(handles=selection_legend, fontsize=7, loc="upper right")
    batches = list(next(iter(vs[keys[0]]["profile"]["threads"].values()))["batches"]) if keys else []
    width = 0.8 / max(1, len(batches))
    shades = plt.get_cmap("Blues")
    for i, b in enumerate(batches):
        vals = [next(iter(vs[k]["profile"]["threads"].values()))["batches"][b]["p50_ms"] for k in keys]
        axes[1].bar([j + i * width for j in range(len(keys))], vals, width, label=f"batch {b}",
                    color=shades(0.35 + 0.6 * i / max(1, len(batches) - 1)))
    axes[1].set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(keys))], keys)
    axes[1].set_title("p50 decode step (ms), 1 thread" if report.get("task") == "text-generation"
                      else "p50 latency (ms), 1 thread")
    axes[1].set_ylim(0, axes[1].get_ylim()[1] * 1.3)  # room for the legend above the bars
    axes[1].legend(fontsize=7, loc="upper left", ncols=max(1, len(batches)))
    metric = report["metrics"][0] if report["metrics"] else None
    if metric:
        _metric_panel(axes[2], metric, keys, [vs[k]["metrics"].get(metric) for k in keys], colors)
        axes[2].legend(handles=selection_legend, fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{report['name']} v{report['version']}")
    fig.tight_layout()
    return fig


def _metric_panel(ax: Any, metric: str, keys: list[str], values: list[float | None], colors: list[str]) -> None:
    """The metric against fp32, on an axis zoomed to the data: ``1 - value`` on a log axis for a similarity, a
    log axis for an error, each bar labelled with its value."""
    known = [v for v in values if v is not None]
    if not known:  # nothing was compared (e.g. a prebuilt causal LM, its own reference)
        ax.set_title(f"{metric}: not compared")
        ax.bar(keys, [0.0] * len(keys), color=colors)
        return
    if metric in SIMILARITIES:
        heights = [max(1.0 - v, LOG_FLOOR) if v is not None else 0.0 for v in values]
        ax.set_yscale("log")
        ax.set_ylabel(f"1 - {metric} (log; lower = closer to fp32)", fontsize=8)
        ax.set_title(f"{metric} vs fp32")
    elif known and min(known) > 0:
        heights = [v if v is not None else 0.0 for v in values]
        ax.set_yscale("log")
        ax.set_ylabel(f"{metric} (log)", fontsize=8)
        ax.set_title(f"{metric} vs fp32")
    else:
        heights = [v if v is not None else 0.0 for v in values]
        ax.set_title(f"{metric} vs fp32")
    bars = ax.bar(keys, heights, color=colors)
    ax.bar_label(bars, labels=["-" if v is None else f"{v:.6g}" for v in values], fontsize=7)
    if ax.get_yscale() == "log" and known:
        low = min(h for h in heights if h > 0)
        ax.set_ylim(low / 3, max(heights) * 300)  # room for the labels and the legend above the bars


def _edge_line(p: dict[str, Any], generation: bool = False) -> list[str]:
    """The placement's edge line: a classic model's p95, memory and rows, or (``generation``) a causal LM's
    tokens/s and memory."""
    e = p.get("edge") or {}
    if not e:
        return []
    where = "on the edge" if e.get("placed") else "not on the edge"
    if generation:
        figures = f"estimated {e['tokens_per_s_estimate']:,.1f} tokens/s, ~{e['memory_mb_estimate']:,.0f} MB"
    else:
        figures = (f"estimated p95 {e['p95_ms_estimate']:.2f} ms, ~{e['memory_mb_estimate']:.0f} MB, "
                   f"batches up to {e['max_rows']} rows")
    return [f"- edge: {where}; {e['variant']} on {e['profile']['name']}, {figures}"]


def _markdown(r: dict[str, Any]) -> str:
    if r.get("task") == "text-generation":
        return _markdown_generation(r)
    p = r["placement"]
    out = [
        f"# {r['name']} version {r['version']}",
        "",
        f"- source: `{r['source']}` ({r['source_kind']}), task: **{r['task']}**",
        f"- selected variant (CPU tier): **{r['selected_variant']}**; GPU (Triton) variant: "
        f"**{r.get('triton_variant') or '-'}**",
        f"- targets: **{', '.join(p['targets'])}**" + (" (forced by --target)" if p["forced"] else ""),
        f"- Lambda: {p['cpu']['memory_mb']:,} MB, {p['cpu']['threads']} thread(s), {p['deployment']} deployment",
        f"- routing: GPU from {p['routing']['gpu_min_rows']} rows or {p['routing']['gpu_min_bytes']:,} bytes",
        *_edge_line(p),
        f"- created: {r['created_at']}",
        "",
        "![report](report.png)",
        "",
        "## Export accuracy gate",
        "",
    ]
    g = r["gate"]
    if g.get("checked"):
        out.append(f"Tolerance {g['tolerance']:g} on {g['rows']} rows:")
        out += [f"- `{k}`: error {v['error']:.3g} ({v['detail']})" for k, v in g["outputs"].items()]
    else:
        out.append(f"Not compared: {g.get('reason')}")
    out += [
        "",
        "## Variants",
        "",
        "| variant | size (MB) | load (s) | p50/p95 b1 (ms) | p50 b32 (ms) | metrics | decision |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, v in r["variants"].items():
        prof = v.get("profile")
        if prof:
            th = next(iter(prof["threads"].values()))["batches"]
            bl = list(th)
            lat = f"{th[bl[0]]['p50_ms']:.3f} / {th[bl[0]]['p95_ms']:.3f}"
            lat32 = f"{th[bl[-1]]['p50_ms']:.3f}"
            load = f"{prof['load_s']:.3f}"
        else:
            lat = lat32 = load = "-"
        mets = ", ".join(f"{m}={x:.4g}" for m, x in (v.get("metrics") or {}).items() if x is not None)
        size = f"{v['size_bytes'] / 2**20:.3f}" if v.get("size_bytes") else "-"
        out.append(f"| {k} | {size} | {load} | {lat} | {lat32} | {mets or '-'} | {v['decision']}: {v['reason']} |")
    out += ["", "## Placement rules", ""]
    out += [f"- {'✅' if x['ok'] else '❌'} **{x['rule']}**: {x['detail']}" for x in p["reasons"]]
    out += [
        "",
        "Latencies were measured on the build machine, one fresh process per variant; Lambda figures",
        "scale them to the vCPUs of the memory size (1,769 MB = 1 vCPU). See report.json for every number.",
        "",
    ]
    return "\n".join(out)


def build_generation_report(cfg: CompileConfig, exported: Exported, variants: list[BuiltVariant],
                            placement: Placement, mv: ModelVersion, gate: dict[str, Any]) -> dict[str, Any]:
    """A causal LM's report: the same document as every model's (variants with their decision and reason,
    placement with its rules), with the gate on token predictions and the profile in tokens."""
    import onnxruntime
    import onnxruntime_genai

    from tierserve_compiler.variants import spec

    assert mv.generation is not None
    return {
        **_identity(mv, cfg, exported),
        "task": "text-generation",
        "metrics": ["top1_agreement", "perplexity_ratio", "greedy_match"],
        "notes": exported.notes,
        "gate": gate,
        "evaluation_data": {"source": gate.get("validation"), "rows": gate.get("prompts"), "labels": False},
        "selected_variant": mv.selected_variant,
        "cpu_variant": mv.cpu_variant,
        "edge_variant": mv.edge_variant,
        "triton_variant": None,
        "generation": mv.generation.to_json(),
        "variants": {
            v.key: {
                "file": f"{v.path.parent.name}/{v.path.name}" if v.path else None,
                "size_bytes": (v.profile or {}).get("size_bytes"),
                "build": v.build,
                "metrics": v.metrics,
                "gate": (gate.get("variants") or {}).get(v.key),
                "within_budget": v.within_budget,
                "budget": v.budget_reasons,
                "budget_limits": vars(cfg.budget or spec(v.key, "text-generation").budget),
                "profile": v.profile,
                "decision": v.decision,
                "reason": v.reason,
            }
            for v in variants
        },
        "placement": placement.to_json(),
        "config": {"quantize": cfg.quantize, "target": cfg.target, "slo_ttft_ms": cfg.slo_ttft_ms,
                   "slo_tokens_per_s": cfg.slo_tokens_per_s, "preset": cfg.preset,
                   "budget": vars(cfg.budget) if cfg.budget else "each variant's default (variants.*.budget_limits)",
                   "limits": vars(cfg.limits)},
        "versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": onnxruntime_genai.__version__},
    }


def _markdown_generation(r: dict[str, Any]) -> str:
    p, g = r["placement"], r["gate"]
    gen = r["generation"]
    out = [
        f"# {r['name']} version {r['version']} (text-generation)",
        "",
        f"- source: `{r['source']}` ({r['source_kind']}); " + "; ".join(r["notes"]),
        f"- selected variant (CPU tier): **{r['selected_variant']}**; edge: **{r.get('edge_variant') or '-'}**",
        f"- targets: **{', '.join(p['targets'])}**" + (" (forced by --target)" if p["forced"] else ""),
        f"- Lambda: {p['cpu']['memory_mb']:,} MB, {p['cpu']['threads']} thread(s), up to "
        f"{p['cpu'].get('max_concurrency', 1)} concurrent generation(s) per environment",
        f"- context {gen['context_length']:,} tokens, EOS {gen['eos_token_ids']}, KV cache "
        f"{gen['kv_bytes_per_token']:,} bytes/token, chat template: {'yes' if gen['chat_template'] else 'no'}",
        *_edge_line(p, generation=True),
        f"- created: {r['created_at']}",
        "",
        "![report](report.png)",
        "",
        "## Accuracy gate against the source model",
        "",
        f"Validation text: {g.get('validation')} ({g.get('prompts')} prompts).",
    ]
    if g.get("checked"):
        out.append(f"Reference: {g['reference']}; {g['positions']} positions; greedy continuations of "
                   f"{g['greedy_tokens']} tokens; reference perplexity {g['reference_perplexity']:.3f}.")
    else:
        out.append(f"Not compared: {g.get('reason')}")
    chat = g.get("chat_template") or {}
    out.append("Chat template: " + (("token ids equal transformers' apply_chat_template on "
                                     f"{chat.get('conversations')} conversations ({chat.get('renderer')})")
                                    if chat.get("equal") else f"not checked: {chat.get('reason')}"))
    out += ["", "## Variants", "",
            "| variant | size (MB) | top-1 | ppl ratio | greedy | tokens/s b1 (1 thr / all) | tokens/s b8 | "
            "TTFT 16/128/512 (ms, 1 thr) | decision |",
            "|---|---|---|---|---|---|---|---|---|"]
    for k, v in r["variants"].items():
        prof, m = v.get("profile"), v.get("metrics") or {}
        if prof:
            th = prof["threads"]
            one, many = th["1"], th[str(max(int(t) for t in th))]
            b1 = f"{one['batches']['1']['tokens_per_s']:,.1f} / {many['batches']['1']['tokens_per_s']:,.1f}"
            b8 = f"{one['batches']['8']['tokens_per_s']:,.1f}"
            ttft = " / ".join(f"{x:,.1f}" for x in one["ttft_ms"].values())
        else:
            b1 = b8 = ttft = "-"
        size = f"{v['size_bytes'] / 2**20:.3f}" if v.get("size_bytes") else "-"

        def fmt(x: Any) -> str:
            return "-" if x is None else f"{x:.4f}"

        out.append(f"| {k} | {size} | {fmt(m.get('top1_agreement'))} | {fmt(m.get('perplexity_ratio'))} | "
                   f"{fmt(m.get('greedy_match'))} | {b1} | {b8} | {ttft} | {v['decision']}: {v['reason']} |")
    out += ["", "## Placement rules", ""]
    out += [f"- {'✅' if x['ok'] else '❌'} **{x['rule']}**: {x['detail']}" for x in p["reasons"]]
    out += ["", "## Tier figures (manifest)", ""]
    for tier, f in (gen.get("tiers") or {}).items():
        cost = f" ${f['cost_per_1m_tokens']:,.4f} per 1M tokens;" if f.get("cost_per_1m_tokens") is not None else ""
        out.append(f"- {tier}: {f['tokens_per_s']:,.1f} tokens/s; TTFT {f['ttft_ms']} ms;{cost} {f.get('source', '')}")
    out += ["", "Every figure was measured on the build machine, one fresh process per variant (see report.json).", ""]
    return "\n".join(out)


def write_report(version_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md and report.png into ``version_dir``."""
    version_dir = Path(version_dir)
    paths = {"json": version_dir / "report.json", "md": version_dir / "report.md", "png": version_dir / "report.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, paths["json"])
    _chart(report, paths["png"])
    paths["md"].write_text(_markdown(report))
    return paths
