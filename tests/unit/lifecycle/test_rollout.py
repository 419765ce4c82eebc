"""The rollout state machine on a folder store with scripted metrics: promote, roll back (errors, p99,
fallbacks), hold without traffic, resume after a driver died, and stop when someone else steps in. A
text-generation version is also judged on its TTFT p99 and tokens/s against the default's (issue 18), read from
moto's CloudWatch (with moto_ext's percentiles) as the telemetry writes them."""

from __future__ import annotations

import dataclasses

import pytest

from tests.support.lifecycle import version
from tierserve.errors import LifecycleError
from tierserve.lifecycle.objects import FolderObjects
from tierserve.lifecycle.registry import Registry
from tierserve.lifecycle.rollout import (
    ABORTED,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    Figures,
    RolloutState,
    Thresholds,
    breaches,
    new_rollout,
    tick,
)


class Scripted:
    """Metrics as a function of the version: ``canary`` and ``default`` Figures per second of window."""

    def __init__(self, canary: Figures, default: Figures) -> None:
        self.per_s = {"2": canary, "1": default}
        self.calls: list[tuple[float, float]] = []

    def figures(self, model, versions, start, end, *, generative=False):
        self.calls.append((start, end))
        self.generative = generative
        span = end - start
        return {v: dataclasses.replace(f, requests=f.requests * span, errors=f.errors * span,
                                       fallbacks=f.fallbacks * span, client_errors=f.client_errors * span)
                for v, f in self.per_s.items() if v in versions}


GOOD = Figures(requests=10, errors=0, fallbacks=0, p99_ms=5.0)
BASE = Figures(requests=90, errors=0, fallbacks=0, p99_ms=5.0)


@pytest.fixture
def reg(tmp_path) -> Registry:
    r = Registry(FolderObjects(tmp_path / "store"), actor="rollout-test")
    r.publish(version("m", "1"))
    r.publish(version("m", "2"))
    return r


def run(state: RolloutState, reg: Registry, metrics, start: float, until: float, every: float = 1.0) -> RolloutState:
    t = start
    while t <= until and state.status == RUNNING:
        state = tick(state, reg, metrics, t)
        t += every
    return state


def rollout(reg, **thresholds) -> RolloutState:
    return new_rollout(reg, "m", "2", [10, 50, 100], 5.0, Thresholds(**{"max_error_rate": 0.01, **thresholds}), 0.0)


def test_a_good_version_goes_through_every_step_and_is_promoted(reg):
    state = run(rollout(reg, max_p99_ms=50), reg, Scripted(GOOD, BASE), 0.0, 60.0)
    assert state.status == PROMOTED
    assert [e["event"] for e in state.events] == ["step_started", "step_passed", "step_started", "step_passed",
                                                  "promoted"]
    assert [e.get("percent") for e in state.events if e["event"] == "step_started"] == [10, 50]
    entry = reg.entry("m")
    assert (entry.default_version, entry.canary) == ("2", None)
    actions = [(h["action"], h["why"]) for h in reg.history("m")][2:]
    assert actions == [("canary", "rollout step 1/3"), ("canary", "rollout step 2/3"),
                       ("promote", "rollout passed every step (10,50,100%)")]
    assert reg.history("m")[-1]["details"]["figures"]["canary"]["requests"] >= 20


def test_a_version_failing_5_percent_is_rolled_back_within_one_interval(reg):
    failing = dataclasses.replace(GOOD, errors=0.5)  # 5% of its requests
    state = run(rollout(reg), reg, Scripted(failing, BASE), 0.0, 60.0)
    assert state.status == ROLLED_BACK and "error rate 5.00% > 1.00%" in state.reason
    rolled = next(e for e in state.events if e["event"] == "rolled_back")
    assert rolled["at"] - state.events[0]["at"] <= state.interval_s  # within the first interval
    entry = reg.entry("m")
    assert (entry.default_version, entry.canary) == ("1", None)
    last = reg.history("m")[-1]
    assert last["action"] == "rollback" and last["why"].startswith("automatic rollback at 10%")
    assert last["details"]["figures"]["canary"]["error_rate"] == 0.05


def test_a_3x_slower_version_is_rolled_back_on_p99(reg):
    slow = dataclasses.replace(GOOD, p99_ms=15.0)
    state = run(rollout(reg, max_p99_ms=10), reg, Scripted(slow, BASE), 0.0, 60.0)
    assert state.status == ROLLED_BACK and "p99 15.0 ms > 10 ms (default: 5.0 ms)" in state.reason


def test_fallbacks_count_only_when_worse_than_the_default(reg):
    t = Thresholds(max_fallback_rate=0.05, min_requests=1)
    both = Figures(requests=100, fallbacks=50)
    assert breaches(both, both, t) == []  # the GPU tier is down for everyone: not the canary's fault
    assert breaches(both, Figures(requests=100), t) == ["fallback rate 50.00% > 5.00% (default: 0.00%)"]
    assert breaches(Figures(requests=5, errors=5), Figures(), Thresholds(min_requests=20)) == []  # too few to judge


def test_without_enough_traffic_the_step_is_held(reg):
    quiet = Figures(requests=1, p99_ms=5.0)
    state = run(rollout(reg), reg, Scripted(quiet, BASE), 0.0, 12.0)
    assert state.status == RUNNING and state.step == 0 and state.events[-1]["event"] == "held"
    assert reg.entry("m").canary == {"version": "2", "percent": 10}


def test_an_interrupted_rollout_resumes_where_it_was(reg):
    # Given a rollout saved after its first step passed, whose driver died right after it applied step 2's
    # share (the saved state still says step 1)
    metrics = Scripted(GOOD, BASE)
    state = run(rollout(reg), reg, metrics, 0.0, 6.0)
    assert state.step == 1 and reg.entry("m").canary["percent"] == 50
    saved = dataclasses.replace(state, step=0, step_started_at=1.0)
    # When another driver picks it up, Then it restarts the saved step and carries on to the promotion
    resumed = run(saved, reg, metrics, 7.0, 60.0)
    assert resumed.status == PROMOTED and reg.entry("m").default_version == "2"


def test_someone_else_stepping_in_stops_the_rollout(reg):
    state = run(rollout(reg), reg, Scripted(GOOD, BASE), 0.0, 1.0)
    reg.rollback("m", why="by hand")
    state = tick(state, reg, Scripted(GOOD, BASE), 2.0)
    assert state.status == ABORTED and "changed by someone else" in state.reason


def test_bad_rollouts_are_refused(reg):
    with pytest.raises(LifecycleError, match="end at 100"):
        new_rollout(reg, "m", "2", [10, 50], 5, Thresholds(), 0)
    with pytest.raises(LifecycleError, match="already the default"):
        new_rollout(reg, "m", "1", [100], 5, Thresholds(), 0)
    with pytest.raises(LifecycleError, match="no published version 7"):
        new_rollout(reg, "m", "7", [100], 5, Thresholds(), 0)


def test_the_state_round_trips_through_json_and_dynamodb_values(reg):
    from tierserve.dynamo import to_dynamo

    state = rollout(reg, max_p99_ms=12.5)
    assert RolloutState.from_json(to_dynamo(state.to_json())) == state


# --- text-generation versions: TTFT p99 and tokens/s (issue 18) -----------------------------------------------


def generative(name: str, v: str):
    from tests.support.genai_models import GENAI_INPUTS, GENAI_OUTPUTS
    from tierserve.manifest import ExternalFile, GenerationSpec

    mv = version(name, v)
    variant = dataclasses.replace(mv.variants["fp32"], path=f"{name}/{v}/fp32/model.onnx", external_data=(
        ExternalFile(f"{name}/{v}/fp32/genai_config.json", "0" * 64, 1),))
    return dataclasses.replace(mv, inputs=GENAI_INPUTS, outputs=GENAI_OUTPUTS, task="text-generation",
                               variants={"fp32": variant}, generation=GenerationSpec(context_length=64,
                                                                                    eos_token_ids=(2,)))


@pytest.fixture
def gen_reg(tmp_path) -> Registry:
    r = Registry(FolderObjects(tmp_path / "store"), actor="rollout-test")
    r.publish(generative("g", "1"))
    r.publish(generative("g", "2"))
    return r


def gen_rollout(reg, **thresholds) -> RolloutState:
    return new_rollout(reg, "g", "2", [10, 50, 100], 5.0, Thresholds(**thresholds), 0.0)


GEN_GOOD = dataclasses.replace(GOOD, p99_ms=None, ttft_p99_ms=300.0, tokens_per_s=50.0)
GEN_BASE = dataclasses.replace(BASE, p99_ms=None, ttft_p99_ms=300.0, tokens_per_s=50.0)


def test_a_generative_version_as_fast_as_the_default_is_promoted_and_its_figures_recorded(gen_reg):
    metrics = Scripted(GEN_GOOD, GEN_BASE)
    state = run(gen_rollout(gen_reg), gen_reg, metrics, 0.0, 60.0)
    assert state.status == PROMOTED and metrics.generative is True
    figures = gen_reg.history("g")[-1]["details"]["figures"]
    assert (figures["canary"]["ttft_p99_ms"], figures["canary"]["tokens_per_s"]) == (300.0, 50.0)


def test_a_generative_canary_over_the_ttft_p99_bound_is_rolled_back(gen_reg):
    slow_start = dataclasses.replace(GEN_GOOD, ttft_p99_ms=2500.0)
    state = run(gen_rollout(gen_reg), gen_reg, Scripted(slow_start, GEN_BASE), 0.0, 60.0)
    assert state.status == ROLLED_BACK and "TTFT p99 2500.0 ms > 2000 ms (default: 300.0 ms)" in state.reason
    assert gen_reg.entry("g").canary is None and gen_reg.entry("g").default_version == "1"
    state = run(gen_rollout(gen_reg, max_ttft_p99_ms=250), gen_reg, Scripted(GEN_GOOD, GEN_BASE), 60.0, 120.0)
    assert state.status == PROMOTED  # over 250 ms, but no slower than the default: not the canary's fault


def test_a_generative_canary_decoding_slower_than_the_ratio_is_rolled_back(gen_reg):
    slow = dataclasses.replace(GEN_GOOD, tokens_per_s=30.0)  # 0.6x the default's 50
    state = run(gen_rollout(gen_reg), gen_reg, Scripted(slow, GEN_BASE), 0.0, 60.0)
    assert state.status == ROLLED_BACK
    assert "tokens/s 30.0 < 0.8 x the default's 50.0 (0.60x)" in state.reason
    t = Thresholds(min_requests=1)
    assert breaches(dataclasses.replace(slow, tokens_per_s=41.0), GEN_BASE, t) == []  # 0.82x: within the ratio
    assert breaches(slow, GEN_BASE, dataclasses.replace(t, min_tokens_per_s_ratio=0.5)) == []
    assert breaches(slow, GEN_BASE, dataclasses.replace(t, min_tokens_per_s_ratio=0)) == []  # 0: not judged
    assert breaches(slow, dataclasses.replace(GEN_BASE, tokens_per_s=None), t) == []  # no default figure yet


def test_a_generative_canary_is_still_judged_on_its_error_rate(gen_reg):
    failing = dataclasses.replace(GEN_GOOD, errors=0.5)
    state = run(gen_rollout(gen_reg), gen_reg, Scripted(failing, GEN_BASE), 0.0, 60.0)
    assert state.status == ROLLED_BACK and "error rate 5.00% > 1.00%" in state.reason


def test_other_models_are_judged_as_before(reg):
    metrics = Scripted(GOOD, BASE)
    state = run(rollout(reg), reg, metrics, 0.0, 60.0)
    assert state.status == PROMOTED and metrics.generative is False
    assert "ttft_p99_ms" not in reg.history("m")[-1]["details"]["figures"]["canary"]


def test_bad_generation_thresholds_are_refused(gen_reg):
    with pytest.raises(LifecycleError, match=r"tokens/s ratio .* within \[0, 1\].* got 1.5"):
        gen_rollout(gen_reg, min_tokens_per_s_ratio=1.5)
    with pytest.raises(LifecycleError, match="TTFT p99 bound must be positive, got -1"):
        gen_rollout(gen_reg, max_ttft_p99_ms=-1)


def test_a_state_saved_before_the_generation_thresholds_loads_with_their_defaults(reg):
    from tierserve.dynamo import to_dynamo

    doc = rollout(reg).to_json()
    for key in ("max_ttft_p99_ms", "min_tokens_per_s_ratio"):
        del doc["thresholds"][key]
    loaded = RolloutState.from_json(to_dynamo(doc))
    assert (loaded.thresholds.max_ttft_p99_ms, loaded.thresholds.min_tokens_per_s_ratio) == (2000.0, 0.8)


# --- CloudWatchMetrics on moto: the figures as the telemetry writes them ---------------------------------------


@pytest.fixture
def cloudwatch(runtime_env):
    import boto3
    from moto import mock_aws

    from tierserve_tools.moto_ext import patch

    patch()
    with mock_aws():
        yield boto3.client("cloudwatch", region_name="us-east-1")


def put_emf(client, doc: dict) -> None:
    """One EMF document as CloudWatch Logs extracts it: each metric in each of its dimension sets."""
    import datetime as dt

    directive = doc["_aws"]["CloudWatchMetrics"][0]
    when = dt.datetime.fromtimestamp(doc["_aws"]["Timestamp"] / 1000, dt.UTC)
    data = [{"MetricName": m["Name"], "Unit": m["Unit"], "Value": float(doc[m["Name"]]), "Timestamp": when,
             "Dimensions": [{"Name": d, "Value": str(doc[d])} for d in dims]}
            for dims in directive["Dimensions"] for m in directive["Metrics"]]
    client.put_metric_data(Namespace=directive["Namespace"], MetricData=data)


def emitted(capsys) -> list[dict]:
    import json

    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cloudwatch_figures_of_a_generative_version_are_its_ttft_p99_and_mean_tokens_per_s(
        cloudwatch, runtime_env, capsys):
    import time

    from tierserve import telemetry
    from tierserve.lifecycle.rollout import CloudWatchMetrics

    runtime_env.setenv("TIERSERVE_METRICS", "true")
    start = time.time() - 1
    # Given generations as the functions emit them: the router counts each (RouterFunction), the CPU function
    # runs the engine (its own function name) and emits TTFT and tokens/s
    runtime_env.setenv("AWS_LAMBDA_FUNCTION_NAME", "router-fn")
    for v, n, failed in (("1", 40, 0), ("2", 20, 2)):
        for k in range(n):
            telemetry.generation_request("g", v, tier="cpu", status=500 if k < failed else 200)
    runtime_env.setenv("AWS_LAMBDA_FUNCTION_NAME", "cpu-fn")
    for k in range(100):
        telemetry.generation("g", "1", "cpu", ttft_ms=100.0 + k, itl_ms=20.0, prompt_tokens=10, completion_tokens=8,
                             tokens_per_s=50.0)
        telemetry.generation("g", "2", "cpu", ttft_ms=1000.0 + 10 * k, itl_ms=40.0, prompt_tokens=10,
                             completion_tokens=8, tokens_per_s=20.0 + (k % 2) * 10)
    for doc in emitted(capsys):
        put_emf(cloudwatch, doc)
    # When the rollout reads both versions' figures
    metrics = CloudWatchMetrics("tierserve", "router-fn", client=cloudwatch)
    got = metrics.figures("g", ["2", "1"], start, time.time() + 1, generative=True)
    # Then the requests and errors are the router's, TTFT p99 and the mean tokens/s the engine's
    assert (got["2"].requests, got["2"].errors, got["1"].requests, got["1"].errors) == (20, 2, 40, 0)
    assert (got["2"].ttft_p99_ms, got["1"].ttft_p99_ms) == (1980.0, 198.0)  # nearest rank of 100 values
    assert (got["2"].tokens_per_s, got["1"].tokens_per_s) == (25.0, 50.0)
    assert got["2"].p99_ms is None  # a generation has no Latency
    t = Thresholds(max_error_rate=0.2, max_ttft_p99_ms=1500)
    assert breaches(got["2"], got["1"], t) == ["TTFT p99 1980.0 ms > 1500 ms (default: 198.0 ms)",
                                               "tokens/s 25.0 < 0.8 x the default's 50.0 (0.50x)"]
    # and a model that does not generate is asked what it always was
    plain = metrics.queries("m", ["2", "1"], 60)
    assert {q["MetricStat"]["Metric"]["MetricName"] for q in plain} == {
        "Requests", "Errors", "ClientErrors", "Fallbacks", "Latency"}
    assert metrics.figures("m", ["2"], start, time.time() + 1)["2"].ttft_p99_ms is None
