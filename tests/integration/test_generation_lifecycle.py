"""The lifecycle of a generative model through `tierserve serve` (issue 17's acceptance): greedy output through the
router to the CPU function equals transformers', a version promoted in the store with ``tierserve models publish
--promote`` is served within the manifest's TTL without a failed request, a rollback and a canary work for a
text-generation model as for the others (``model: NAME`` on the /v1 routes gets the canary's share), and
``GET /metrics`` shows the generation metrics per model and version, the token counts equal to the answers' usage.

Why a test of its own: the versions are told apart by their text. ``tiny`` v1 and v2 are the tiny Llama built with
two seeds (tests/support/causal_lm.py), so their greedy continuations of one prompt differ; each is checked against
transformers' greedy output of its own weights, so "served by v2" means v2's weights ran. The store is moto's S3
(``MANIFEST_TTL_S`` 1 s); the path is the streaming REST API -> RouterFunction -> InvokeWithResponseStream ->
CpuInferenceFunction, each in its own environment under the streaming runtime loop.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.genai_models import TinyLM, write_genai_store
from tierserve_tools.serve import LocalStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
TTL_S = 1.0
PROMPT = "The with statement is used to wrap the execution"
NEW_TOKENS = 12
#: completion tokens per (model, version) answered in this module: what /metrics must count.
USAGE: dict[str, dict[str, int]] = {}


def _export(root: Path, seed: int) -> TinyLM:
    from tests.support.causal_lm import build_causal_lm

    hf = build_causal_lm(root / f"llama-{seed}-hf", "llama", seed=seed)
    out = root / f"llama-{seed}-genai"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                    "-p", "fp32", "-e", "cpu"], cwd=root, check=True, capture_output=True)
    return TinyLM("llama", hf, out)


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyLM]:
    root = tmp_path_factory.mktemp("lifecycle-lms")
    return {"1": _export(root, 0), "2": _export(root, 1), "3": _export(root, 2)}


@pytest.fixture(scope="module")
def expected(lms: dict[str, TinyLM]) -> dict[str, str]:
    """transformers' greedy continuation of PROMPT (NEW_TOKENS tokens, up to EOS) for each version's weights."""
    from transformers import AutoTokenizer

    from tests.support.causal_lm import hf_greedy

    out = {}
    for version, lm in lms.items():
        tok = AutoTokenizer.from_pretrained(lm.hf)
        ids = hf_greedy(lm.hf, tok(PROMPT)["input_ids"], NEW_TOKENS)
        if lm.eos_id in ids:
            ids = ids[:ids.index(lm.eos_id)]
        out[version] = tok.decode(ids)
    assert len(set(out.values())) == len(out), "each seed must continue the prompt differently"
    return out


@pytest.fixture(scope="module")
def stack(lms: dict[str, TinyLM], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    build, candidates = tmp_path_factory.mktemp("gen-build"), tmp_path_factory.mktemp("gen-candidates")
    write_genai_store(build, "tiny", lms["1"], "1", context_length=256, max_concurrency=4)
    write_genai_store(candidates, "tiny", lms["2"], "2", context_length=256, max_concurrency=4)
    write_genai_store(candidates, "tiny", lms["3"], "3", context_length=256, max_concurrency=4)
    with LocalStack(build, port=0, batch=False, triton=False, workdir=tmp_path_factory.mktemp("gen-serve"),
                    env={"MANIFEST_TTL_S": str(TTL_S)}) as local:
        local.candidates = candidates  # type: ignore[attr-defined]
        yield local


def complete(stack: LocalStack, model: str = "tiny", stream: bool = False) -> tuple[int, str, dict[str, Any]]:
    """One greedy completion of PROMPT through the streaming REST API: (status, text, usage or error)."""
    conn = http.client.HTTPConnection(stack.host, stack.port, timeout=120)
    body = {"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200:
        return resp.status, "", json.loads(data)
    if stream:
        docs = [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: {")]
        text = "".join(c["choices"][0]["text"] for c in docs if c["choices"])
        usage = docs[-1]["usage"]
    else:
        doc = json.loads(data)
        text, usage = doc["choices"][0]["text"], doc["usage"]
    return resp.status, text, usage


def served_version(text: str, expected: dict[str, str]) -> str:
    matches = [v for v, t in expected.items() if t == text]
    assert len(matches) == 1, f"the text {text!r} is neither version's greedy output {expected}"
    return matches[0]


def tally(version: str, usage: dict[str, Any]) -> None:
    counts = USAGE.setdefault(version, {"prompt": 0, "completion": 0, "requests": 0})
    counts["prompt"] += usage["prompt_tokens"]
    counts["completion"] += usage["completion_tokens"]
    counts["requests"] += 1


def models_cli(stack: LocalStack, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "tierserve_tools.cli", "models", "--stack", str(stack.workdir),
                           "--by", "test", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


class Traffic:
    """Greedy completions of ``model: tiny`` from one thread until stopped: (start, end, status, version)."""

    def __init__(self, stack: LocalStack, expected: dict[str, str]) -> None:
        self.stack, self.expected = stack, expected
        self.results: list[tuple[float, float, int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.time()
            status, text, usage = complete(self.stack)
            version = served_version(text, self.expected) if status == 200 else None
            if version is not None:
                tally(version, usage)
            self.results.append((t0, time.time(), status, version))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def wait_for(traffic: Traffic, since: float, version: str, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and not any(t0 > since + TTL_S and v == version for t0, _, _, v in traffic.results):
        time.sleep(0.05)
    time.sleep(0.3)


def test_greedy_through_the_router_and_the_cpu_function_equals_transformers(stack, expected, lms) -> None:
    from transformers import AutoTokenizer

    for stream in (False, True):
        status, text, usage = complete(stack, "tiny", stream=stream)
        assert status == 200, usage
        assert text == expected["1"]
        assert usage["prompt_tokens"] == len(AutoTokenizer.from_pretrained(lms["1"].hf)(PROMPT)["input_ids"])
        tally("1", usage)


def test_a_version_promoted_in_the_store_is_served_within_the_manifests_ttl(stack, expected) -> None:
    with Traffic(stack, expected) as traffic:
        time.sleep(1.0)
        out = models_cli(stack, "publish", str(stack.candidates / "tiny" / "2"), "--promote", "--why", "test")
        promoted_at = time.time()
        wait_for(traffic, promoted_at, "2")
    assert "tiny" in out
    # every request that began a TTL after the promote returned got v2; none failed on the way
    after = [v for t0, _, _, v in traffic.results if t0 > promoted_at + TTL_S]
    assert after and set(after) == {"2"}, traffic.results
    assert {s for _, _, s, _ in traffic.results} == {200}
    assert any(v == "1" for *_, v in traffic.results), "traffic ran before the promote"
    # and both versions stay addressable by name
    for version in ("1", "2"):
        status, text, usage = complete(stack, f"tiny:{version}")
        assert status == 200 and served_version(text, expected) == version
        tally(version, usage)


def test_a_rollback_returns_to_the_previous_default_within_the_ttl(stack, expected) -> None:
    with Traffic(stack, expected) as traffic:
        time.sleep(0.5)
        models_cli(stack, "rollback", "tiny", "--why", "test")
        rolled_at = time.time()
        wait_for(traffic, rolled_at, "1")
    after = [v for t0, _, _, v in traffic.results if t0 > rolled_at + TTL_S]
    assert after and set(after) == {"1"}, traffic.results
    assert {s for _, _, s, _ in traffic.results} == {200}


def test_a_canary_gets_its_share_of_model_name_on_the_v1_routes(stack, expected) -> None:
    models_cli(stack, "canary", "tiny", "2", "--percent", "50", "--why", "test")
    time.sleep(TTL_S + 0.2)
    seen = []
    for _ in range(24):  # each request has its own API Gateway request id: the split is by its hash
        status, text, usage = complete(stack)
        assert status == 200, usage
        seen.append(served_version(text, expected))
        tally(seen[-1], usage)
    # 50% of 24 requests: 3..21 of them on the canary (outside it: p < 1e-4 for a fair split)
    assert 3 <= seen.count("2") <= 21, seen
    ids = {m["id"] for m in json.loads(urllib.request.urlopen(f"{stack.url}/v1/models", timeout=30).read())["data"]}
    assert {"tiny", "tiny:1", "tiny:2"} <= ids
    # promoting the canary ends it: every request on v2
    models_cli(stack, "promote", "tiny", "2", "--why", "test")
    time.sleep(TTL_S + 0.2)
    for _ in range(4):
        status, text, usage = complete(stack)
        assert served_version(text, expected) == "2"
        tally("2", usage)


def test_a_generative_version_is_rolled_out_to_100_percent_by_tierserve_models_rollout(stack, expected) -> None:
    # Given v2 the default, v3 published, and steady traffic to model: tiny
    models_cli(stack, "publish", str(stack.candidates / "tiny" / "3"), "--why", "test")
    with Traffic(stack, expected) as traffic:
        # When the rollout runs (the canary judged on the router's per-version metrics and the generation's)
        cmd = [sys.executable, "-m", "tierserve_tools.cli", "models", "--stack", str(stack.workdir), "--by", "ci",
               "rollout", "tiny", "3", "--tick", "0.25s", "--steps", "50,100", "--interval", "3s",
               "--max-error-rate", "0.01", "--max-p99-ms", "5000", "--max-ttft-p99-ms", "5000",
               "--min-tokens-per-s-ratio", "0.3", "--min-requests", "5"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    # Then it is promoted, as a rollout of any other model is
    assert proc.returncode == 0, out
    assert "step_started 50%" in out and "tiny: promoted" in out, out
    assert any(v == "3" for *_, v in traffic.results) and {s for _, _, s, _ in traffic.results} == {200}


def _series(text: str, metric: str, **labels: str) -> list[float]:
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{metric}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            out.append(float(m.group(2)))
    return out


def test_the_metrics_page_shows_the_generation_metrics_per_model_and_version(stack) -> None:
    assert USAGE, "the tests above made requests"
    deadline = time.time() + 30
    while True:
        text = urllib.request.urlopen(f"{stack.url}/metrics", timeout=30).read().decode()
        cpu = {"function": "CpuInferenceFunction", "model": "tiny"}
        got = {v: (sum(_series(text, "tierserve_completion_tokens_total", **cpu, version=v)),
                   sum(_series(text, "tierserve_prompt_tokens_total", **cpu, version=v))) for v in USAGE}
        want = {v: (float(c["completion"]), float(c["prompt"])) for v, c in USAGE.items()}
        if got == want or time.time() > deadline:
            break
        time.sleep(0.3)
    assert got == want, text[-3000:]
    for version, counts in USAGE.items():
        labels = {**cpu, "version": version}
        assert sum(_series(text, "tierserve_time_to_first_token_ms_count", **labels)) == counts["requests"]
        assert sum(_series(text, "tierserve_inter_token_latency_ms_count", **labels)) == counts["requests"]
        assert _series(text, "tierserve_time_to_first_token_ms_bucket", **labels, le="+Inf")
        # tokens/s is a rate: a summary (its sum over its count is the mean), never a counter summed over requests
        count = sum(_series(text, "tierserve_tokens_per_second_count", **labels))
        assert count == counts["requests"] and sum(_series(text, "tierserve_tokens_per_second_sum", **labels)) > 0
    assert "tierserve_tokens_per_second_total" not in text
    assert "# TYPE tierserve_tokens_per_second summary" in text
    # by tier too
    assert _series(text, "tierserve_time_to_first_token_ms_count", function="CpuInferenceFunction", model="tiny",
                   tier="cpu")
