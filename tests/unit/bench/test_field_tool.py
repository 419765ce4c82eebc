"""Reading guidellm's own JSON report (0.8.1) and setting its figures beside ours (issue 19). The report in
tests/support/guidellm_report.json is one guidellm really wrote against ``tierserve serve`` (3 requests at
concurrency 1, 128 + 64 tokens), cut down to the fields read here; guidellm itself never runs in ``make test``.
Our side of the comparison (the same request body, guidellm's definitions) runs against a fake SSE server here."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tierserve_tools.bench import field_tool

REPORT = json.loads((Path(__file__).resolve().parents[2] / "support" / "guidellm_report.json").read_text())


def test_a_guidellm_report_reads_as_its_levels_tokens_per_second_and_ttft() -> None:
    levels = field_tool.parse_report(REPORT)
    assert list(levels) == [1]
    level = levels[1]
    assert (level.streams, level.successful, level.errored, level.output_tokens) == (1, 3, 0, 192)
    assert (level.prompt_tokens_p50, level.output_tokens_p50) == (128.0, 64.0)  # the load asked for
    # output tokens/s: the successful requests' output tokens over the benchmark's duration, which is guidellm's
    # own output_tokens_per_second mean
    metrics = REPORT["benchmarks"][0]["metrics"]
    assert level.output_tokens_per_s == pytest.approx(192 / REPORT["benchmarks"][0]["duration"])
    assert level.output_tokens_per_s == pytest.approx(metrics["output_tokens_per_second"]["successful"]["mean"])
    assert level.ttft_p50_ms == metrics["time_to_first_token_ms"]["successful"]["median"]
    assert level.ttft_mean_ms == metrics["time_to_first_token_ms"]["successful"]["mean"]
    # a second level (another --profile streams=4 run) reads by its stream count
    four = copy.deepcopy(REPORT["benchmarks"][0])
    four["config"]["strategy"]["streams"] = 4
    assert sorted(field_tool.parse_report({"benchmarks": [REPORT["benchmarks"][0], four]})) == [1, 4]


@pytest.mark.parametrize(("doc", "says"), [
    ({"nothing": 1}, "no 'benchmarks' list"),
    ({"benchmarks": [{"config": {"strategy": {"type_": "synchronous"}}}]}, "reads concurrent ones"),
    ({"benchmarks": [{"config": {"strategy": {"type_": "concurrent", "streams": 1}}, "metrics": {}}]},
     "no metrics.output_token_count.successful"),
])
def test_what_is_not_a_guidellm_concurrent_report_is_refused_with_the_reason(doc, says) -> None:
    with pytest.raises(field_tool.FieldToolError, match=says):
        field_tool.parse_report(doc)


def test_agreement_is_within_15_percent_either_way() -> None:
    assert field_tool.agreement(100.0, 114.0) == (pytest.approx(1.14), True)
    assert field_tool.agreement(100.0, 86.0) == (pytest.approx(0.86), True)
    assert field_tool.agreement(100.0, 116.0)[1] is False and field_tool.agreement(100.0, 84.0)[1] is False
    assert field_tool.agreement(0.0, 5.0) == (None, False)


def test_the_command_is_guidellms_own_cli_against_the_gateway(tmp_path: Path) -> None:
    argv = field_tool.command("/v/bin/guidellm", "http://127.0.0.1:9", "bench-llama", tmp_path, 4, 16, 128, 64,
                              tmp_path / "r.json")
    assert argv[:2] == ["/v/bin/guidellm", "run"]
    opts = dict(zip(argv[2::2], argv[3::2], strict=False))
    # validate_backend left on (GET /health); greedy as ours through its own option for extra request fields
    assert opts["--backend"] == ("kind=openai_http,target=http://127.0.0.1:9,model=bench-llama,"
                                 "request_format=/v1/completions,extras.body.temperature=0")
    assert opts["--profile"] == "kind=concurrent,streams=4"
    assert opts["--constraint"] == "kind=max_requests,count=16"
    assert opts["--data"] == "kind=synthetic_text,prompt_tokens=128,output_tokens=64"
    assert opts["--tokenizer"] == f"kind=hf_auto,model={tmp_path}"
    assert opts["--output"] == f"kind=json,path={tmp_path / 'r.json'}"


# what guidellm 0.8.1 sent against tierserve serve (request_args of its report, prompt cut short)
SENT = ('{"method":null,"stream":true,"headers":null,"params":null,"body":{"model":"bench-llama","stream":true,'
        '"stream_options":{"include_usage":true,"continuous_usage_stats":true},"max_tokens":64,"ignore_eos":true,'
        '"temperature":0,"prompt":"1 0 m0 Finish medical want almost away until."},"files":null,"content":null}')


def test_our_request_is_the_body_guidellm_sends_but_for_the_prompt() -> None:
    doc = {"benchmarks": [{"requests": {"successful": [{"request_args": SENT}]}}]}
    [sent] = field_tool.sent_bodies(doc)
    ours = field_tool.request_body("bench-llama", [5, 6, 7], 64)
    assert {k: v for k, v in ours.items() if k != "prompt"} == {k: v for k, v in sent.items() if k != "prompt"}
    assert ours["prompt"] == [5, 6, 7]


def _timed(start: float, first: float, end: float, out: int = 64) -> field_tool.Timed:
    return field_tool.Timed(start, first, end, 128, out)


def test_ours_is_summarised_by_guidellms_definitions() -> None:
    # two streams: tokens over (last end - first start), not the sum of request times; TTFT median and mean
    runs = [_timed(10.0, 10.1, 11.0), _timed(10.5, 10.8, 12.0), _timed(11.0, 11.2, 14.0, out=32)]
    level = field_tool.summarise(runs, 2)
    assert level.duration_s == pytest.approx(4.0)
    assert level.output_tokens == 160
    assert level.output_tokens_per_s == pytest.approx(40.0)
    assert level.ttft_p50_ms == pytest.approx(200.0)
    assert level.ttft_mean_ms == pytest.approx(200.0)
    assert (level.prompt_tokens, level.output_tokens_each) == ([128], [32, 64])
    with pytest.raises(field_tool.FieldToolError, match="no request finished"):
        field_tool.summarise([], 1)


def _round(ours_tps: float, field_tps: float, ours_ttft: float, field_ttft: float) -> dict[str, Any]:
    return {"ours": {"output_tokens_per_s": ours_tps, "ttft_p50_ms": ours_ttft},
            "guidellm": {"output_tokens_per_s": field_tps, "ttft_p50_ms": field_ttft}}


def test_the_comparison_is_of_each_sides_median_over_its_rounds() -> None:
    # one wild round on either side moves neither median; each figure agrees (or not) on its own
    rounds = [_round(200, 190, 80, 80), _round(120, 195, 81, 130), _round(210, 205, 79, 82)]
    summary = field_tool.compare_rounds(rounds)
    assert summary["output_tokens_per_s"] == {"ours": 200, "guidellm": 195, "ratio": 0.975, "agree": True}
    assert summary["ttft_p50_ms"]["ours"] == 80 and summary["ttft_p50_ms"]["guidellm"] == 82
    assert summary["ttft_p50_ms"]["agree"] is True
    off = field_tool.compare_rounds([_round(200, 160, 80, 100)] * 3)
    assert (off["output_tokens_per_s"]["agree"], off["ttft_p50_ms"]["agree"]) == (False, False)
    assert off["output_tokens_per_s"]["ratio"] == 0.8 and off["ttft_p50_ms"]["ratio"] == 1.25


def test_same_tokens_holds_only_when_every_request_of_both_sides_had_128_in_and_64_out() -> None:
    good = {"ours": {"prompt_tokens": [128], "output_tokens_each": [64]},
            "guidellm": {"prompt_tokens_p50": 128.0, "output_tokens_p50": 64.0, "output_tokens": 640,
                         "successful": 10}}
    assert field_tool._same_tokens([good], 128, 64) is True
    early = copy.deepcopy(good)
    early["ours"]["output_tokens_each"] = [20, 64]  # an EOS before max_tokens: what ignore_eos prevents
    assert field_tool._same_tokens([good, early], 128, 64) is False
    short = copy.deepcopy(good)
    short["guidellm"]["output_tokens"] = 600
    assert field_tool._same_tokens([short], 128, 64) is False


class _FakeCompletions(BaseHTTPRequestHandler):
    """/v1/completions streamed as tierserve serve streams it: a chunk with empty text first (held-back bytes),
    then texts, continuous usage, a usage-only chunk and [DONE]."""

    bodies: list[dict[str, Any]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.lock:
            self.bodies.append(body)
        if body["model"] == "busy":
            self.send_response(429)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        n = int(body["max_tokens"])
        time.sleep(0.02)
        for i in range(n):
            text = "" if i == 0 else f"t{i}"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": i + 1}
            self.wfile.write(b"data: " + json.dumps({"choices": [{"text": text}], "usage": usage}).encode() + b"\n\n")
            self.wfile.flush()
            if i == 0:
                time.sleep(0.03)  # the first text arrives >= 50 ms after the send
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
        self.wfile.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[str, int]]:
    _FakeCompletions.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_our_client_streams_guidellms_body_from_one_queue_and_times_the_first_text(fake_server) -> None:
    host, port = fake_server
    prompts = [[3] * 128, [4] * 128]
    level = field_tool.ours_level(host, port, "bench-llama", 3, 7, prompts, 8)
    assert level.requests == 7 and len(_FakeCompletions.bodies) == 7  # each request once, whatever the streams
    assert all(b == field_tool.request_body("bench-llama", b["prompt"], 8) for b in _FakeCompletions.bodies)
    assert (level.prompt_tokens, level.output_tokens_each, level.output_tokens) == ([128], [8], 56)
    assert level.ttft_p50_ms >= 50.0  # the empty first chunk is not the first token
    assert level.output_tokens_per_s == pytest.approx(56 / level.duration_s)
    assert 0.0 < level.client_cpu_s < 5.0  # the client threads' own CPU, not the process's


def test_a_gateway_error_fails_the_level_with_its_answer(fake_server) -> None:
    host, port = fake_server
    with pytest.raises(field_tool.FieldToolError, match="answered 429"):
        field_tool.ours_level(host, port, "busy", 2, 4, [[1]], 8)


def _stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int) -> str:
    # /proc/PID/stat: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    return f"{pid} ({comm}) S {ppid} 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1 0\n"


def test_the_tools_cpu_is_its_whole_process_tree_from_proc(tmp_path: Path) -> None:
    tick = field_tool.os.sysconf("SC_CLK_TCK")
    procs = {10: ("guidellm", 1, 2 * tick, tick), 11: ("guidellm) worker", 10, tick, 0),  # a ")" in the name
             12: ("python", 11, tick, tick), 20: ("other", 1, 50 * tick, 0)}
    for pid, (comm, ppid, ut, st) in procs.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(_stat_line(pid, comm, ppid, ut, st))
    assert field_tool.tree_cpu_s(10, tmp_path) == pytest.approx(6.0)  # 3 + 1 + 2 s; not the unrelated 20
    assert field_tool.tree_cpu_s(12, tmp_path) == pytest.approx(2.0)


def test_the_cpu_inside_the_window_is_read_from_the_samples_in_it() -> None:
    sampler = field_tool.CpuSampler(0)
    sampler.samples = [(1.0, 0.5), (2.0, 1.0), (3.0, 1.4), (4.0, 2.5), (5.0, 9.0)]
    assert sampler.within(1.5, 4.5) == 1.5  # start-up before and the report's writing after are left out
    assert sampler.within(2.5, 3.5) is None


def test_the_field_tool_runs_at_every_level_of_the_suites_sweep_with_enough_requests_a_stream() -> None:
    """The closing note sets the field tool's numbers beside ours at each level of the sweep (1, 4 and 16); at 16
    streams a round of 32 requests would be two a stream, mostly ramp."""
    from tierserve_tools.bench import generate

    assert field_tool.LEVELS == generate.LEVELS
    assert [field_tool.requests_per_round(False, c) for c in field_tool.LEVELS] == [32, 32, 64]
    assert [field_tool.requests_per_round(True, c) for c in field_tool.LEVELS] == [8, 8, 32]
