"""The cost suite's generation workload (issue 19): Lambda only, the GPU tier only and the token-aware hybrid,
priced per 1M output tokens from the tiers' figures. (The request workload's tests are in test_bench_report.py.)"""

from __future__ import annotations

import json

from tierserve.manifest import TierFigures
from tierserve_tools.bench import cost


def _inputs() -> cost.GenerationInputs:
    prices = json.loads(cost.PRICES.read_text())
    table = {"concurrency_gain": 6.6, "instance": "g5.xlarge"}
    cpu = TierFigures({16: 50.0, 128: 120.0, 512: 400.0}, 100.0, None, "fake")
    gpu = TierFigures({16: 1.0, 128: 5.0, 512: 20.0}, 2000.0, None, "fake")
    return cost.GenerationInputs(cpu, gpu, table, prices, None, "fake")


def test_each_configuration_bills_what_it_runs_and_says_what_meets_the_slo() -> None:
    g = _inputs()
    routes = {"short chat": "cpu", "long document": "gpu"}
    low = cost.generation_cost(g, 0.01, routes)
    # Lambda only: no instance, a price per token independent of the rate; the long documents miss the TTFT SLO
    # (4,096 tokens extrapolated from 400 ms at 512: ~2.9 s)
    assert low["lambda"]["gpu_instances"] == 0 and low["lambda"]["slo_met_share"] == 0.8
    high = cost.generation_cost(g, 10.0, routes)
    assert abs(high["lambda"]["usd_per_1m_output_tokens"] - low["lambda"]["usd_per_1m_output_tokens"]) < 1e-9
    # GPU only and the hybrid: at least one instance all month, so their price per token falls with the rate
    month = cost.HOURS_PER_MONTH * g.prices["gpu_hourly_usd"]
    for config in ("gpu", "hybrid"):
        assert low[config]["gpu_instances"] >= 1 and low[config]["gpu_usd"] >= month
        assert high[config]["usd_per_1m_output_tokens"] < low[config]["usd_per_1m_output_tokens"]
        assert low[config]["slo_met_share"] == 1.0
    # And the hybrid adds the chats' Lambda bill to the same instance
    assert low["hybrid"]["lambda_usd"] > 0 and low["hybrid"]["usd_per_month"] > low["gpu"]["usd_per_month"]


def test_the_gpu_fleet_grows_with_its_busy_time() -> None:
    g = _inputs()
    everything_on_gpu = {"short chat": "gpu", "long document": "gpu"}
    small = cost.generation_cost(g, 1.0, everything_on_gpu)["gpu"]["gpu_instances"]
    large = cost.generation_cost(g, 1000.0, everything_on_gpu)["gpu"]["gpu_instances"]
    assert small == 1 and large > small
