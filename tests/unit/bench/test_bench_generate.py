"""The generate suite's arithmetic and record, on fake numbers (the suite itself runs only in `tierserve bench`):
ITL, goodput against the stated SLO, tokens/s of a level, the figures in latest.json's schema and the plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

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


# --- the quick configuration, the gateway's environment and the batch figure (issue 19's acceptance) ----------


def test_quick_measures_a_smaller_model_cached_apart_from_the_full_one(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tierserve_tools.bench.harness import Context

    monkeypatch.setenv("TIERSERVE_BENCH_CACHE", str(tmp_path))
    quick, full = Context(tmp_path, tmp_path, quick=True), Context(tmp_path, tmp_path, quick=False)
    assert generate.shape_of(quick) == generate.QUICK and generate.shape_of(full) == generate.FULL
    assert generate.QUICK.layers < generate.FULL.layers
    # the builder's export matches transformers' at hidden 384 (at 256 the gate refuses it): keep the width
    assert generate.QUICK.hidden == generate.FULL.hidden == 384
    folders = generate.cache_folder(generate.QUICK), generate.cache_folder(generate.FULL)
    assert folders[0] != folders[1] and {f.parent for f in folders} == {tmp_path}
    assert [f"{s.layers}x{s.hidden}" in f.name for s, f in zip((generate.QUICK, generate.FULL), folders,
                                                                strict=True)] == [True, True]
    assert generate.cache_folder() == folders[1]  # the cost suite's default: the full model


def test_the_bench_model_is_compiled_fp32_only_with_the_fastest_preset(tmp_path: Path) -> None:
    from tierserve_compiler.config import PRESETS

    argv = generate.compile_command(tmp_path / "hf", tmp_path / "v.txt", tmp_path / "out")
    assert argv[3:5] == ["compile", str(tmp_path / "hf")] and argv[-1] == "--quiet"
    opts = dict(zip(argv[5:-1:2], argv[6:-1:2], strict=True))
    assert opts["--quantize"] == "none" and opts["--preset"] == "fast" and opts["--target"] == "cpu"
    fast, default = PRESETS["fast"]["profile"], PRESETS["thorough"]["profile"]
    assert fast.threads == (1,) and fast.iterations < default.iterations  # one thread count, a short profile


def test_the_gateway_admits_as_many_generations_as_the_sweeps_highest_concurrency(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the stack the suite starts, captured: the router fleet caps a model's concurrent generations at the
    # manifest's 4 (the cold run failed: "the gateway answered 429 ... its cap on concurrent generations (4)")
    import tierserve_tools.serve
    from tierserve_tools.bench.harness import Context

    seen: dict[str, Any] = {}

    class Stack:
        host, port = "127.0.0.1", 1

        def __init__(self, store: Path, **kw: Any) -> None:
            seen.update(kw)

        def start(self) -> Stack:
            return self

        def stop(self) -> None:
            seen["stopped"] = True

    monkeypatch.setattr(tierserve_tools.serve, "LocalStack", Stack)
    ctx = Context(tmp_path, tmp_path, quick=True)
    generate._start_gateway(ctx, tmp_path)
    ctx.notes.pop("close")()
    # Then every function may run 16 generations at once, and the CPU function keeps its one thread
    assert int(seen["env"]["GENERATION_MAX_CONCURRENCY"]) >= max(generate.LEVELS)
    assert seen["env"]["ORT_THREADS"] == str(generate.THREADS) and seen["stopped"]


def _fake_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quick: bool) -> Any:
    """The suite's run() with the model, the engine, the gateway and both paths faked: what it records."""
    monkeypatch.setenv("TIERSERVE_METRICS", "false")  # run() sets it for the bench process; restored after the test
    import tierserve.generation.engine
    import tierserve.store
    from tierserve_tools.bench.harness import Context

    class Version:
        cpu_artifact, generation = "fp32/model.onnx", None

    class Store:
        def __init__(self, uri: str, cache_dir: str) -> None:
            self.cache_dir = Path(cache_dir)

        def manifest(self) -> Any:
            return type("M", (), {"resolve": staticmethod(lambda name: Version())})()

        def fetch(self, artifact: str) -> Path:
            return self.cache_dir / "sha" / "model.onnx"

    calls: dict[str, Any] = {"batch": []}

    def measure(ctx: Context, folder: Path) -> tuple[float, float, dict[str, Any]]:
        calls["batch"].append((ctx.quick, folder, dict(ctx.notes["generate"])))
        return 90.0, 100.0, {"one_at_a_time_tokens_per_s": 30.0, "conditions": "fake batch", "runs": 2}

    monkeypatch.setenv("TIERSERVE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(generate, "model_store", lambda ctx: tmp_path / "store")
    monkeypatch.setattr(tierserve.store, "ModelStore", Store)
    monkeypatch.setattr(tierserve.generation.engine, "load", lambda folder, threads: type("L", (), {"model": 1}))
    monkeypatch.setattr(generate, "_start_gateway", lambda ctx, store: type("S", (), {"host": "h", "port": 1}))
    monkeypatch.setattr(generate, "_warm", lambda ctx, host, port: None)
    fake = generate.Run(ttft_ms=10.0, gaps_ms=[2.0, 3.0], tokens=3, total_ms=15.0)
    monkeypatch.setattr(generate, "raw_run", lambda model, prompt, new: fake)
    monkeypatch.setattr(generate, "gateway_run", lambda host, port, prompt, new: fake)
    monkeypatch.setattr(generate, "batch_bench", lambda: measure)
    ctx = Context(tmp_path, tmp_path / "work", quick=quick, out=open(os.devnull, "w"))  # noqa: SIM115
    try:
        generate.run(ctx)
    finally:
        ctx.out.close()
    return ctx, calls


@pytest.mark.parametrize("quick", [True, False])
def test_every_figure_the_issue_lists_is_measured_quick_or_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               quick: bool) -> None:
    ctx, calls = _fake_suite(tmp_path, monkeypatch, quick)
    kinds = [(f.extra.get("kind"), f.extra.get("prompt_tokens") or f.extra.get("concurrency")
              or f.extra.get("quantile") or f.extra.get("baseline")) for f in ctx.figures]
    assert sorted(kinds, key=str) == sorted(
        [("ttft", n) for n in (16, 128, 512)] + [("itl", 50), ("itl", 99)]
        + [(k, c) for k in ("tokens_per_s", "goodput") for c in (1, 4, 16)]
        + [("batch", "raw_batched"), ("batch", "one_at_a_time")], key=str)
    # each with its baseline and ratio; the goodput at a stated SLO; batch >= 0.85x raw batched is the goal
    assert all(f.baseline is not None and f.ratio is not None for f in ctx.figures)
    assert all("SLO: TTFT <= 1000 ms" in f.conditions for f in ctx.figures if f.extra["kind"] == "goodput")
    batch = {f.extra["baseline"]: f for f in ctx.figures if f.extra["kind"] == "batch"}
    assert batch["raw_batched"].ratio == 0.9 and batch["raw_batched"].goal == 0.85 and batch["raw_batched"].met
    assert batch["one_at_a_time"].ratio == 3.0
    # the batch bench got the suite's own model: the folder it loaded and the store it was compiled into
    [(was_quick, folder, notes)] = calls["batch"]
    assert was_quick is quick and folder == tmp_path / "work" / "genai-cache" / "sha"
    assert notes["store"] == str(tmp_path / "store") and notes["cache_dir"] == str(folder.parent)
    suite = ctx.notes["suite_notes"]["generate"]
    assert (suite["layers"], suite["hidden"]) == (generate.shape_of(ctx).layers, generate.shape_of(ctx).hidden)
    assert suite["batch"]["tokens_per_s"] == {"batch_part": 90.0, "raw_batched": 100.0, "one_at_a_time": 30.0}
    assert "skipped_figures" not in suite


def test_a_missing_batch_bench_fails_the_suite_instead_of_skipping_its_figure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierserve_tools.bench.harness import Context

    monkeypatch.setattr(generate, "BATCH_BENCH", "tierserve_tools.bench.batch_generate:no_such_function")
    ctx = Context(tmp_path, tmp_path, quick=True, out=open(os.devnull, "w"))  # noqa: SIM115
    notes: dict[str, Any] = {}
    try:
        with pytest.raises(RuntimeError, match="batch generation's bench function"):
            generate._batch(ctx, tmp_path, notes)
    finally:
        ctx.out.close()
    assert not ctx.figures and "skipped_figures" not in notes


def test_the_batch_bench_is_batch_generates_measure_taking_the_context_and_the_model_folder() -> None:
    import inspect

    from tierserve_tools.bench import batch_generate

    module, _, name = generate.BATCH_BENCH.partition(":")
    assert (module, name) == ("tierserve_tools.bench.batch_generate", "measure")
    assert list(inspect.signature(batch_generate.measure).parameters) == ["ctx", "folder"]


def test_the_gateway_path_asks_for_exactly_max_tokens_and_reads_the_stream_as_a_client_does() -> None:
    """Both paths of a level cost the same: the gateway's requests carry vLLM's ``ignore_eos`` (the random bench
    model ends some prompts early otherwise), as the raw loop sets ``min_length``; the SSE chunks' text times the
    tokens and the usage chunk counts them."""
    import http.server
    import threading

    seen: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            chunks = [{"choices": [{"text": t}]} for t in ("a", "b", "c")]
            chunks.append({"choices": [], "usage": {"completion_tokens": 3}})
            body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        run = generate.gateway_run("127.0.0.1", server.server_address[1], [5, 6, 7], 3)
    finally:
        server.shutdown()
        server.server_close()
    assert seen[0]["ignore_eos"] is True and seen[0]["max_tokens"] == 3 and seen[0]["temperature"] == 0
    assert seen[0]["prompt"] == [5, 6, 7] and seen[0]["stream"] is True
    assert run.tokens == 3 and len(run.gaps_ms) == 2 and run.ttft_ms <= run.total_ms


def test_the_raw_loop_generates_exactly_the_tokens_asked_for(tmp_path: Path) -> None:
    """``min_length``: an end-of-text token does not end the raw loop early (the gateway's ``ignore_eos``)."""
    import onnxruntime_genai as og

    from tests.support.genai_models import export

    lm = export(tmp_path, "llama")
    model = og.Model(str(lm.genai))
    # these prompts end early without min_length on the tests' tiny Llama (after 16, 37 and 66 tokens)
    for length, salt in ((4, 10), (4, 11), (16, 16)):
        run = generate.raw_run(model, generate.prompt_ids(length, salt), 100)
        assert run.tokens == 100 and len(run.gaps_ms) == 99
