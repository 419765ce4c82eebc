"""Reading guidellm's own JSON report (0.8.1) and setting its figures beside ours (issue 19). The report in
tests/support/guidellm_report.json is one guidellm really wrote against ``tierserve serve`` (3 requests at
concurrency 1, 128 + 64 tokens), cut down to the fields read here; guidellm itself never runs in ``make test``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

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
    with pytest.raises(RuntimeError, match=says):
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
    assert opts["--backend"] == ("kind=openai_http,target=http://127.0.0.1:9,model=bench-llama,"
                                 "request_format=/v1/completions")  # validate_backend left on: GET /health
    assert opts["--profile"] == "kind=concurrent,streams=4"
    assert opts["--constraint"] == "kind=max_requests,count=16"
    assert opts["--data"] == "kind=synthetic_text,prompt_tokens=128,output_tokens=64"
    assert opts["--tokenizer"] == f"kind=hf_auto,model={tmp_path}"
    assert opts["--output"] == f"kind=json,path={tmp_path / 'r.json'}"
