"""`tierserve bench`'s record: latest.json follows its schema, latest.md is built from it, a suite that
cannot run is recorded as skipped with the reason; and the cost simulation's invariants."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tierserve_tools.bench import cli, cost, report
from tierserve_tools.bench.harness import Figure, Series


def _store(root: Path) -> Path:
    """A store with one model on both tiers and the compiler's report.json (profiles only)."""
    profile = {"threads": {"1": {"batches": {"1": {"p50_ms": 10.0, "p95_ms": 14.0},
                                             "8": {"p50_ms": 50.0, "p95_ms": 70.0},
                                             "32": {"p50_ms": 180.0, "p95_ms": 240.0}}}}}
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "report.json").write_text(json.dumps({"name": "m", "version": "1", "variants": {
        "fp32": {"size_bytes": 4_000_000, "profile": profile, "metrics": {"cosine": 1.0}},
        "int8_dynamic": {"size_bytes": 1_000_000, "profile": profile, "metrics": {"cosine": 0.995},
                         "decision": "kept"}}}))
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "models": {"m": {
        "default_version": "1", "versions": {"1": {
            "targets": ["gpu", "cpu"], "selected_variant": "int8_dynamic", "cpu_variant": "int8_dynamic",
            "routing": {"gpu_min_rows": 12}, "cpu": {"memory_mb": 1769}, "variants": {}}}}}}))
    return root


def test_a_bench_run_writes_json_that_follows_the_schema_and_markdown_with_plots(tmp_path: Path) -> None:
    # Given a store with a report.json, and a perf_analyzer that cannot be found
    store = _store(tmp_path / "models")
    out = tmp_path / "results"
    # When the quant and gateway suites run (gateway needs the local Triton: it is skipped, with the reason)
    code = cli.main(["--quick", "--suite", "quant", "--suite", "gateway", "--models", str(store), "--out", str(out)])
    # Then the run succeeds and latest.json follows the schema
    assert code == 0
    doc = json.loads((out / "latest.json").read_text())
    jsonschema.validate(doc, report.JSON_SCHEMA)
    assert doc["suites"]["quant"]["status"] == "ok" and doc["suites"]["quant"]["figures"] == 4
    assert doc["suites"]["gateway"]["status"] == "skipped" and doc["suites"]["gateway"]["reason"]
    fig = next(f for f in doc["figures"] if f["name"] == "m v1 int8_dynamic batch 1: p50 vs fp32")
    assert fig["ratio"] == 1.0 and fig["measured"]["p95"] == 14.0 and fig["measured"]["samples"] == 1
    # And latest.md has a table per suite, the skip reason, and the variants' plot
    md = (out / "latest.md").read_text()
    assert "## quant" in md and "## gateway" in md and "skipped" in md
    assert "![quant](quant.png)" in md and (out / "quant.png").stat().st_size > 1000


def test_the_schema_refuses_a_figure_without_its_percentiles() -> None:
    good = Figure("s", "f", Series("m", [1.0, 2.0]), Series("b", [1.0]), conditions="c").to_json()
    doc = report.document({"s": {"status": "ok", "seconds": 0.1, "figures": 1}}, [], True, "t0", "t1", 0.1, [0.0])
    doc["figures"] = [good]
    jsonschema.validate(doc, report.JSON_SCHEMA)
    del doc["figures"][0]["measured"]["p95"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, report.JSON_SCHEMA)


def test_a_goal_on_the_difference_is_met_or_missed_by_the_difference() -> None:
    f = Figure("s", "import", Series("router", [160.0]), Series("pass", [20.0]), goal=150, goal_op="<=",
               goal_on="difference")
    assert f.difference == 140.0 and f.met is True
    f.measured = Series("router", [180.0])
    assert f.met is False


def test_the_cost_simulation_routes_by_size_and_bills_what_it_runs(tmp_path: Path) -> None:
    # Given the profile of a model on both tiers
    _, prof = cost.load_profile(_store(tmp_path / "models"), cold_ms=1000.0)
    # When 5 minutes of a steady 2 req/s trace are simulated
    result = cost.simulate(prof, "steady", 2.0, 300.0, seed=3)
    # Then every request is served by each configuration, and the costs follow the prices
    served = {v["requests"] for v in result.values()}
    assert len(served) == 1 and served.pop() > 500
    month = cost.HOURS_PER_MONTH * prof.prices["gpu_hourly_usd"]
    assert result["gpu"]["usd_per_month"] >= month * 0.99  # at least one instance, all month
    assert result["hybrid"]["usd_per_month"] > result["gpu"]["usd_per_month"] * 0.99  # one instance + Lambda
    assert 0 < result["cpu"]["usd_per_month"] < month
    # And the big requests (64 rows) make the CPU-only p95 slower than the hybrid's, which sends them to the GPU
    assert result["cpu"]["p95_ms"] > result["hybrid"]["p95_ms"]


def test_the_bursty_trace_has_the_mean_rate_and_its_bursts() -> None:
    reqs = cost.trace("bursty", 10.0, 3600.0, seed=1)
    in_bursts = sum(1 for t, _ in reqs if t % 600 >= 480)
    assert abs(len(reqs) / 3600 - 10.0) < 0.5 and abs(in_bursts / len(reqs) - 0.6) < 0.03


def _gateway_doc() -> dict:
    """The gateway suite's figures: gateway and direct Triton at concurrency 1, 8, 16, batching on and off."""
    figures = []
    for batching, slow in ((True, 1.0), (False, 3.0)):
        for c in (1, 8, 16):
            figures.append(Figure(
                "gateway", f"batching {batching}, concurrency {c}",
                Series("tierserve serve (gateway)", unit="infer/s", rate=100.0, count=10, p50_ms=c * slow + 1,
                       p95_ms=1.0, p99_ms=1.0),
                Series("direct Triton", unit="infer/s", rate=200.0, count=10, p50_ms=c * slow, p95_ms=1.0,
                       p99_ms=1.0),
                better="higher", conditions="c", extra={"concurrency": c, "dynamic_batching": batching}).to_json())
    return {"figures": figures, "suites": {}}


def test_the_latency_plot_keys_each_line_by_name_and_configuration(tmp_path: Path) -> None:
    # Given the gateway suite with dynamic batching on and off (the same series names in both)
    doc = _gateway_doc()
    # When its latency-against-concurrency series are gathered
    series = report.latency_series(doc["figures"], "gateway")
    # Then each name gets one line per configuration, each line with its 3 concurrency levels in order:
    # the "on" and "off" points are never joined into one zig-zag line
    assert sorted(series) == [("direct Triton", "dynamic batching off"), ("direct Triton", "dynamic batching on"),
                              ("tierserve serve (gateway)", "dynamic batching off"),
                              ("tierserve serve (gateway)", "dynamic batching on")]
    assert all([c for c, _ in pts] == [1, 8, 16] for pts in series.values())
    assert series[("direct Triton", "dynamic batching off")] == [(1, 3.0), (8, 24.0), (16, 48.0)]
    # And the rendered plot has 4 lines, each labelled with its name and configuration
    plots = report._plots(doc, tmp_path)
    assert plots["gateway"] == "gateway.png" and (tmp_path / "gateway.png").stat().st_size > 1000
    ax = report.latency_figure(series, "gateway").axes[0]
    assert len(ax.get_lines()) == 4
    assert ax.get_legend_handles_labels()[1] == [f"{name}, {config}" for name, config in sorted(series)]
