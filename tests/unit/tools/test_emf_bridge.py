"""EMF lines -> PutMetricData datums and Prometheus text, as CloudWatch Logs and a scraper would see them."""

from __future__ import annotations

import json

from tierserve import telemetry
from tierserve_tools.emf_bridge import EmfBridge, MetricsRegistry, metric_data, parse_line


def emitted(capsys, fn) -> list[dict]:
    fn()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_request_lands_in_the_function_version_and_tier_sets(capsys, monkeypatch):
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "RouterFunction")
    (doc,) = emitted(capsys, lambda: telemetry.request("m", "2", tier="gpu", latency_ms=12.5, rows=3, fallback=True))
    assert doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [
        ["service", "function"], ["service", "function", "model", "version"], ["service", "function", "model", "tier"]]
    datums = metric_data(doc)["tierserve"]
    latency = [d for d in datums if d["MetricName"] == "Latency"]
    assert [sorted(x["Name"] for x in d["Dimensions"]) for d in latency] == [
        ["function", "service"], ["function", "model", "service", "version"], ["function", "model", "service", "tier"]]
    assert {d["MetricName"]: d["Value"] for d in datums} == {"Requests": 1, "Errors": 0, "ClientErrors": 0,
                                                            "Fallbacks": 1, "Rows": 3, "Latency": 12.5}


def test_a_failed_request_counts_an_error_and_no_latency(capsys):
    (doc,) = emitted(capsys, lambda: telemetry.request("m", "1", tier=None, latency_ms=3, status=500))
    assert doc["Errors"] == 1 and "Latency" not in doc and len(doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"]) == 2


def test_metrics_can_be_turned_off(capsys, monkeypatch):
    monkeypatch.setenv("TIERSERVE_METRICS", "false")
    assert emitted(capsys, lambda: telemetry.error_code("x")) == []


def test_other_log_lines_are_not_documents():
    assert parse_line('{"level": "INFO", "message": "routed"}') is None
    assert parse_line("not json {") is None
    assert parse_line('{"_aws": {"CloudWatchMetrics": [{"Namespace": "n", "Dimensions": [], "Metrics": []}]}}')


def test_the_bridge_follows_log_files_into_cloudwatch_and_prometheus(tmp_path, capsys, monkeypatch):
    # Given a function log with a request, an error and an unrelated line, and a bridge started before them
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "RouterFunction")
    log = tmp_path / "RouterFunction.log"
    log.write_text("old line\n")

    class CloudWatch:
        def __init__(self):
            self.calls = []

        def put_metric_data(self, **kw):
            self.calls.append(kw)

    cw, registry = CloudWatch(), MetricsRegistry()
    bridge = EmfBridge([log], registry, cw).start()
    docs = emitted(capsys, lambda: (telemetry.request("m", "1", tier="cpu", latency_ms=4.0, rows=1),
                                   telemetry.request("m", "1", tier="cpu", latency_ms=40.0, rows=1),
                                   telemetry.error_code("model_not_found")))
    with open(log, "a") as fh:
        fh.write(json.dumps(docs[0]) + "\n" + '{"level":"INFO"}\n' + json.dumps(docs[1]) + "\n")
        fh.write(json.dumps(docs[2])[:20])  # a line still being written
    bridge.poll()
    with open(log, "a") as fh:
        fh.write(json.dumps(docs[2])[20:] + "\n")
    bridge.stop()
    # Then every document reached CloudWatch once, and the registry counts and buckets them
    assert bridge.documents == 3
    names = [d["MetricName"] for call in cw.calls for d in call["MetricData"]]
    assert names.count("Requests") == 6 and names.count("ErrorsByCode") == 1  # 2 requests x 3 dimension sets
    assert registry.value("Requests", model="m", version="1") == 2
    text = registry.render()
    series = 'function="RouterFunction",model="m",service="tierserve",tier="cpu",version="1"'
    assert f"tierserve_requests_total{{{series}}} 2" in text
    assert 'tierserve_latency_ms_bucket{function="RouterFunction",model="m",service="tierserve",tier="cpu",' \
           'version="1",le="5"} 1' in text
    assert 'tierserve_latency_ms_count{' in text and 'tierserve_errors_by_code_total{code="model_not_found"' in text


def test_a_generations_metrics_on_the_page_a_rate_as_a_summary_never_a_summed_counter(capsys, monkeypatch):
    # Given two generations of m v2 on the CPU tier (issue 17's metrics: TTFT, ITL, tokens, tokens/s)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "CpuInferenceFunction")
    registry = MetricsRegistry()
    for ttft, rate in ((40.0, 100.0), (60.0, 50.0)):
        (doc,) = emitted(capsys, lambda t=ttft, r=rate: telemetry.generation(
            "m", "2", "cpu", ttft_ms=t, itl_ms=10.0, prompt_tokens=7, completion_tokens=5, tokens_per_s=r))
        registry.add(doc)
    text = registry.render()
    labels = '{function="CpuInferenceFunction",model="m",service="tierserve",tier="cpu",version="2"}'
    # Then the tokens are counters, the latencies histograms, labelled with the document's dimensions only
    assert f"tierserve_prompt_tokens_total{labels} 14" in text
    assert f"tierserve_completion_tokens_total{labels} 10" in text
    assert f"tierserve_time_to_first_token_ms_count{labels} 2" in text
    assert f"tierserve_time_to_first_token_ms_sum{labels} 100" in text
    assert f"tierserve_inter_token_latency_ms_count{labels} 2" in text
    # And tokens/s, a rate, is a summary whose sum over its count is the mean (150 tokens/s is no figure)
    assert "# TYPE tierserve_tokens_per_second summary" in text
    assert f"tierserve_tokens_per_second_sum{labels} 150" in text
    assert f"tierserve_tokens_per_second_count{labels} 2" in text
    assert "tierserve_tokens_per_second_total" not in text
    assert registry.value("PromptTokens", model="m", version="2") == 14
