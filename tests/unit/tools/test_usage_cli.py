"""`tierserve usage` against a usage table on moto: usage per caller, model and tier since a day, each tier's
estimated cost per 1M tokens from prices.json and the manifest's tokens/s (the compiler's own figure for a model
it compiled), a caller's budget and its override; the table comes from --table, USAGE_TABLE or a stack's
UsageTableName output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from tests.support.genai_store import GENAI_MODEL, genai_store, genai_validation, tiny_llama_hf  # noqa: F401
from tierserve import usage
from tierserve_tools import usage_cli
from tierserve_tools.cli import main

TABLE = "tierserve-usage-cli-test"
PRICES = {"lambda_gb_s_usd": 0.0000133334, "lambda_request_usd": 0.0000002, "gpu_hourly_usd": 1.006,
          "gpu_utilisation": 0.5}


@pytest.fixture
def dynamodb(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_DYNAMODB", "AWS_PROFILE", "MODEL_STORE_URI",
                "TOKENS_PER_MINUTE", "TOKENS_PER_DAY"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ACCESS_KEY_ID", "testing"),
                       ("AWS_SECRET_ACCESS_KEY", "testing"), ("TIERSERVE_METRICS", "false"), ("USAGE_TABLE", TABLE)):
        monkeypatch.setenv(var, value)
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        usage_cli.create_table(client, TABLE)
        yield client


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["usage", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_usage_per_caller_model_and_tier_since_a_day(dynamodb, capsys) -> None:
    days = {"2027-01-10": 1_799_539_200.0, "2027-01-15": 1_799_971_200.0}
    for day, t in days.items():
        led = usage.Ledger(TABLE, client=dynamodb, clock=lambda t=t: t)
        assert usage.day_of(t) == day
        led.record("team-a", "llm", "1", "cpu", 10, 20)
        led.record("team-a", "llm", "1", "gpu", 100, 200)
        led.record("team-b", "llm", "1", "cpu", 1, 2)
    code, out, _ = run(capsys, "--since", "2027-01-01", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["since"] == "2027-01-01" and doc["table"] == TABLE
    got = {(r["caller"], r["tier"]): (r["requests"], r["prompt_tokens"], r["completion_tokens"], r["total_tokens"])
           for r in doc["rows"]}
    assert got == {("team-a", "cpu"): (2, 20, 40, 60), ("team-a", "gpu"): (2, 200, 400, 600),
                   ("team-b", "cpu"): (2, 2, 4, 6)}
    assert all(r["estimated_usd"] is None for r in doc["rows"]) and "no model store" in doc["note"]
    # one caller, from a later day, per day
    code, out, _ = run(capsys, "--caller", "team-a", "--since", "2027-01-12", "--by-day", "--json")
    doc = json.loads(out)
    assert [(r["day"], r["tier"], r["total_tokens"]) for r in doc["rows"]] == [("2027-01-15", "cpu", 30),
                                                                               ("2027-01-15", "gpu", 300)]
    assert doc["caller"]["budget"] == {"tokens_per_minute": 0, "tokens_per_day": 0, "source": "default"}
    # the table for people
    code, out, _ = run(capsys, "--since", "2027-01-01")
    assert code == 0 and "CALLER" in out and "TOTAL" in out and "666" in out and "(no generative model" in out


def test_budget_overrides_are_set_shown_and_cleared(dynamodb, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TOKENS_PER_MINUTE", "1000")
    code, out, _ = run(capsys, "--caller", "team-a", "--set-tokens-per-minute", "50000", "--json")
    assert code == 0 and json.loads(out)["budget"] == {"tokens_per_minute": 50000, "tokens_per_day": 0,
                                                       "source": "override"}
    code, out, _ = run(capsys, "--caller", "team-a")
    assert "50,000 tokens per minute, no limit per day (override)" in out
    code, out, _ = run(capsys, "--caller", "team-a", "--clear-budget")
    assert code == 0 and "1,000 tokens per minute, no limit per day (default)" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--set-tokens-per-day", "5"], "need --caller"),
    (["--caller", "a", "--set-tokens-per-day", "5", "--clear-budget"], "one or the other"),
    (["--since", "15/01/2027"], "YYYY-MM-DD"),
    (["--caller", "a", "--set-tokens-per-day", "-5"], "0 for no limit"),
])
def test_bad_arguments_are_clean_errors(dynamodb, capsys, argv: list[str], message: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


def test_no_table_says_how_to_name_one(monkeypatch, capsys) -> None:
    monkeypatch.delenv("USAGE_TABLE", raising=False)
    code, _, err = run(capsys)
    assert code == 2 and "--table NAME" in err and "--stack-name" in err


def test_a_stacks_output_names_the_table() -> None:
    class Cfn:
        def describe_stacks(self, StackName: str) -> dict:
            return {"Stacks": [{"Outputs": [{"OutputKey": "UsageTableName", "OutputValue": "t-123"}]}]}

    assert usage_cli.stack_table("s", Cfn()) == "t-123"


def test_cost_per_1m_tokens_is_the_placement_formula() -> None:
    gpu = {"concurrency_gain": 6.6}
    # Lambda: 1,769 MB at 20 tokens/s -> GB-s for 1M tokens, plus a request per 256-token completion
    cpu = usage_cli.cost_per_1m("cpu", 20.0, PRICES, gpu, memory_mb=1769, context_length=4096)
    assert cpu == pytest.approx(1769 / 1024 * 50_000 * 0.0000133334 + 0.0000002 * 1e6 / 256)
    assert usage_cli.cost_per_1m("gpu", 100.0, PRICES, gpu) == pytest.approx(1.006 / (100 * 6.6 * 0.5 * 3600) * 1e6)
    assert usage_cli.cost_per_1m("edge", 50.0, PRICES, gpu) is None


def test_costs_match_the_compilers_figures_for_a_compiled_model(dynamodb, capsys, genai_store: Path) -> None:  # noqa: F811
    """The figure the CLI estimates from prices.json and the manifest's tokens/s is the one the compiler wrote
    (cost_per_1m_tokens per tier), to its rounding (4 decimals) and that of tokens/s."""
    from tierserve_tools.usage_cli import load_manifest

    usage.Ledger(TABLE, client=dynamodb).record("team-a", GENAI_MODEL, "1", "cpu", 500_000, 500_000)
    code, out, _ = run(capsys, "--store", str(genai_store), "--json")
    doc = json.loads(out)
    assert code == 0
    mv = load_manifest(str(genai_store)).models[GENAI_MODEL].versions["1"]
    tiers = {t["tier"]: t for t in doc["tiers"] if t["model"] == GENAI_MODEL}
    for tier in ("cpu", "gpu"):
        written = mv.generation.tiers[tier].cost_per_1m_tokens
        assert tiers[tier]["usd_per_1m_tokens"] == pytest.approx(written, rel=2e-3, abs=5.1e-5), tier  # 4 decimals
        assert tiers[tier]["tokens_per_s"] == mv.generation.tiers[tier].tokens_per_s
    row = next(r for r in doc["rows"] if r["model"] == GENAI_MODEL)
    assert row["estimated_usd"] == pytest.approx(tiers["cpu"]["usd_per_1m_tokens"], abs=1e-6)  # 1M tokens, 6 decimals
    code, out, _ = run(capsys, "--store", str(genai_store))
    assert "USD / 1M TOKENS" in out and GENAI_MODEL in out
