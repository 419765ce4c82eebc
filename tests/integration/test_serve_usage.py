"""`tierserve serve` counts tokens per caller and enforces budgets as the deployed router does (issue 18): its
moto_server holds the usage table, RouterFunction gets USAGE_TABLE and template.yaml's default budgets, a caller
over its budget gets 429 with Retry-After in OpenAI's shape, and `tierserve usage --stack` reads what was served.

Why through the stack: without USAGE_TABLE the router meters nothing (``usage.run_metered`` is a no-op), so a
local stack silently served every caller without a budget and ``tierserve usage --stack`` found no table."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.genai_models import export, write_genai_store
from tierserve_tools.serve import LocalStack

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
#: A budget of tokens per minute that one completion fits and a second one exceeds (prompt + max_tokens reserved).
PER_MINUTE = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("serve-usage")
    write_genai_store(root / "store", "tiny", export(root / "lm", "llama"), context_length=256, max_tokens_cap=64)
    with LocalStack(root / "store", port=0, triton=False, batch=False, s3=False, workdir=root / "serve",
                    env={"TOKENS_PER_MINUTE": str(PER_MINUTE)}) as local:
        yield local


def complete(stack: LocalStack, max_tokens: int) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection(stack.host, stack.port, timeout=120)
    body = {"model": "tiny", "prompt": "The with statement", "max_tokens": max_tokens, "temperature": 0}
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), json.loads(resp.read())
    conn.close()
    return out


def test_the_router_meters_usage_and_enforces_the_budget_locally(stack: LocalStack) -> None:
    env = json.loads((stack.workdir / "env.json").read_text())
    router = env["RouterFunction"]
    assert (router["USAGE_TABLE"], router["TOKENS_PER_MINUTE"], router["TOKENS_PER_DAY"]) == (
        "tierserve-usage", str(PER_MINUTE), "2000000")  # --env overrides the template's TokensPerMinute
    assert "USAGE_TABLE" not in env["CpuInferenceFunction"]  # a relayed generation is counted once, by the router
    # a completion within the budget is served and recorded
    status, _, first = complete(stack, 20)
    assert status == 200, first
    served = first["usage"]
    # the next one would take the minute past its budget: 429 before any work, with Retry-After
    status, headers, refused = complete(stack, 40)
    assert status == 429, refused
    assert refused["error"]["code"] == "rate_limit_exceeded"
    assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) >= 1
    # and `tierserve usage --stack` reads what was served
    out = subprocess.run([sys.executable, "-m", "tierserve_tools.cli", "usage", "--stack", str(stack.workdir),
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(served["prompt_tokens"]) in out.stdout and str(served["completion_tokens"]) in out.stdout
    assert "anonymous" in out.stdout
