"""The generate suite's arithmetic and record, on fake numbers (the suite itself runs only in `tierserve bench`):
ITL, goodput against the stated SLO, tokens/s of a level, the figures in latest.json's schema and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from tierserve_tools.bench import generate, report
from tierserve_tools.bench.harness import Figure, Series


def test_a_runs_itl_is_its_time_per_output_token_after_the_first() -> None:
    run = generate._run(0.0, [0.2, 0.25, 0.3, 0.45], tokens=4)
    assert run.ttft_ms == 200.0 and run.total_ms == 450.0
    assert [round(g, 6) for g in run.gaps_ms] == [50.0, 50.0, 150.0]
    assert round(run.itl_ms, 6) == round(250.0 / 3, 6)


def test_goodput_counts_only_requests_that_meet_both_targets() -> None:
    fast = generate.Run(ttft_ms=100.0, tokens=11, total_ms=100.0 + 10 * 50.0)  # ITL 50 ms
    slow_start = generate.Run(ttft_ms=generate.SLO_TTFT_MS + 1, tokens=11, total_ms=generate.SLO_TTFT_MS + 101)
    slow_tokens = generate.Run(ttft_ms=10.0, tokens=3, total_ms=10.0 + 2 * (generate.SLO_ITL_MS + 1))
    level = generate.Level([fast, slow_start, slow_tokens], seconds=2.0)
    assert [r.meets() for r in level.runs] == [True, False, False]
    assert level.goodput == 0.5 and level.tokens_per_s == (11 + 11 + 3) / 2.0


def test_concurrent_runs_every_request_and_raises_the_first_error() -> None:
    level = generate.concurrent(lambda i: generate.Run(ttft_ms=float(i), tokens=1, total_ms=float(i)), 4, 3)
    assert sorted(r.ttft_ms for r in level.runs) == [float(i) for i in range(12)]

    def boom(i: int) -> generate.Run:
        raise RuntimeError(f"request {i} failed")

    try:
        generate.concurrent(boom, 2, 1)
    except RuntimeError as exc:
        assert "failed" in str(exc)
    else:
        raise AssertionError("an error in a client thread must fail the level")


def test_the_suites_figures_follow_the_schema_and_are_plotted(tmp_path: Path) -> None:
    # Given the suite's figures on fake numbers: TTFT by prompt and tokens/s by concurrency, each with its baseline
    figs = []
    for n in generate.PROMPTS:
        figs.append(Figure("generate", f"ttft {n}", Series("gateway (streamed)", [n * 1.1, n * 1.2]),
                           Series("raw og.Generator", [float(n), n * 1.05]), conditions="fake",
                           extra={"prompt_tokens": n, "kind": "ttft"}))
    for c in generate.LEVELS:
        level = generate.Level([generate.Run(ttft_ms=50.0, tokens=64, total_ms=700.0)] * c, seconds=1.0)
        figs.append(Figure("generate", f"tokens/s {c}", generate._rate("gateway", level, "tokens/s", 60.0 * c),
                           generate._rate("raw og.Generator", level, "tokens/s", level.tokens_per_s),
                           better="higher", conditions="fake", extra={"concurrency": c, "kind": "tokens_per_s"}))
    doc = report.document({"generate": {"status": "ok", "seconds": 1.0, "figures": len(figs)}}, figs, True, "t0",
                          "t1", 1.0, [0.0])
    # Then latest.json's schema holds, each figure has its baseline and ratio
    jsonschema.validate(json.loads(json.dumps(doc, default=str)), report.JSON_SCHEMA)
    assert all(f["baseline"] is not None and f["ratio"] is not None for f in doc["figures"])
    # And the markdown shows the suite's plot, with both paths on each panel
    _js, md = report.write(doc, tmp_path)
    assert "![generate](generate.png)" in md.read_text() and (tmp_path / "generate.png").stat().st_size > 1000
    axes = report.generate_figure(doc["figures"]).axes
    assert [len(ax.get_lines()) for ax in axes] == [2, 2]


def test_the_suite_is_registered_before_cost_which_prices_its_figures() -> None:
    from tierserve_tools.bench import cli

    names = list(cli.SUITES)
    assert cli.SUITES["generate"] == "tierserve_tools.bench.generate"
    assert names.index("generate") < names.index("cost")
