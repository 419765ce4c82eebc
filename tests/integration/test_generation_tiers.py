"""Generation across the tiers through `tierserve serve` (issue 18's acceptance), with the local Triton and with
``--gpu-tier sagemaker``: token-aware routing (a short chat on the CPU tier, a long prompt with a large max_tokens on
the GPU tier), greedy output identical on both tiers, Triton killed before a request (the CPU copy serves it,
``x-fallback: gpu-unavailable``) and in the middle of a greedy stream (one stream whose text equals an uninterrupted
CPU-only generation; the final chunk records the failover).

The store is the tiny Llama compiled with the real ``tierserve compile --target both`` (the GPU tier's vLLM entry
written; locally TritonSync, or the SageMaker endpoint, serves it with the stand-in that runs the CPU tier's
onnxruntime-genai variant: the same engine and weights on both tiers), with tier figures and an SLO that make a
short chat meet the SLO on the CPU tier and a long generation miss it there.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.genai_store import genai_validation, tierserve_compile, tiny_llama_hf  # noqa: F401
from tierserve_tools.serve import LocalStack

pytestmark = pytest.mark.integration

NAME = "tiny-llama"
PROMPT = "The with statement is used to wrap the execution"
#: A prompt of about 300 tokens: with max_tokens 300 its estimate misses the SLO on the CPU tier only.
#: The greedy stream Triton is killed in: long enough that it is still going when the kill lands.
MID_STREAM_TOKENS = 960
LONG_PROMPT = " ".join(["The for statement is used to iterate over the elements of a sequence."] * 20)
#: Figures that make the routing deterministic: the CPU tier at 100 tokens/s, the GPU at 1000, a 1.5 s SLO.
FIGURES = {"cpu": {"ttft_ms": {"16": 50.0, "1024": 2000.0}, "tokens_per_s": 100.0, "cost_per_1m_tokens": 2.0,
                   "source": "test"},
           "gpu": {"ttft_ms": {"16": 20.0, "1024": 100.0}, "tokens_per_s": 1000.0, "cost_per_1m_tokens": 0.5,
                   "source": "test"}}


@pytest.fixture(scope="module")
def tier_store(tiny_llama_hf, genai_validation, tmp_path_factory) -> Path:  # noqa: F811
    from tierserve_tools.triton import pytriton_available

    if not pytriton_available():
        pytest.skip("nvidia-pytriton is not installed")
    store = tmp_path_factory.mktemp("tier-store") / "store"
    proc = tierserve_compile(str(tiny_llama_hf), "--name", NAME, "--target", "both", "--validation",
                             str(genai_validation), "--out", str(store), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = store / "manifest.json"
    doc = json.loads(path.read_text())
    for version in doc["models"][NAME]["versions"].values():
        assert set(version["targets"]) >= {"cpu", "gpu"}, version["targets"]
        gen = version["generation"]
        gen.update(tiers=FIGURES, slo_total_ms=1500.0, slo_ttft_ms=None, slo_tokens_per_s=None)
    path.write_text(json.dumps(doc))
    assert (store / "triton" / NAME / "config.pbtxt").is_file()
    return store


@pytest.fixture(scope="module", params=["triton", "sagemaker"])
def stack(request, tier_store, tmp_path_factory) -> Iterator[LocalStack]:
    work = tmp_path_factory.mktemp(f"serve-{request.param}")
    # no restart within the test: a Triton killed stays down
    with LocalStack(tier_store, port=0, batch=False, s3=False, workdir=work, gpu_tier=request.param,
                    triton_restart_backoff_s=(600.0, 600.0)) as local:
        assert local.triton is not None, local.notes
        yield local


def post(stack: LocalStack, path: str, body: dict[str, Any], headers: dict[str, str] | None = None,
         on_chunk: Callable[[int], None] | None = None) -> tuple[int, dict[str, str], list[tuple[float, Any]]]:
    """POST; the status, the headers and the SSE ``data:`` documents with their arrival times (a plain JSON body as
    one document). ``on_chunk(n)`` is called after the n-th document arrives."""
    conn = http.client.HTTPConnection(stack.host, stack.port, timeout=300)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    head = {k.lower(): v for k, v in resp.getheaders()}
    docs: list[tuple[float, Any]] = []
    if not head.get("content-type", "").startswith("text/event-stream"):
        docs.append((time.perf_counter(), json.loads(resp.read())))
        conn.close()
        return resp.status, head, docs
    while line := resp.readline():
        if not line.startswith(b"data: "):
            continue
        raw = line[6:].strip()
        docs.append((time.perf_counter(), "[DONE]" if raw == b"[DONE]" else json.loads(raw)))
        if on_chunk is not None:
            on_chunk(len(docs))
    conn.close()
    return resp.status, head, docs


def text_of(docs: list[tuple[float, Any]]) -> str:
    out = []
    for _, d in docs:
        if d == "[DONE]":
            continue
        assert "error" not in d, d
        choice = d["choices"][0] if d["choices"] else {}
        out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)


def completion(prompt: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def test_a_short_chat_is_served_by_the_cpu_and_a_long_generation_by_the_gpu(stack: LocalStack) -> None:
    chat = {"model": NAME, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 8, "temperature": 0}
    status, head, docs = post(stack, "/v1/chat/completions", chat)
    assert status == 200 and head["x-served-by"] == "cpu" and docs[0][1]["x_served_by"] == "cpu", docs
    status, head, docs = post(stack, "/v1/completions", completion(LONG_PROMPT, 300, stream=True))
    assert status == 200 and head["x-served-by"] == "gpu" and "x-fallback" not in head, docs[-2:]
    final = docs[-2][1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and final["x_served_by"] == "gpu"
    # a streamed chat that the SLO sends to the GPU too (the prompt's text rebuilt from the chat template's ids)
    status, head, docs = post(stack, "/v1/chat/completions", {**chat, "max_tokens": 300, "stream": True,
                                                               "messages": [{"role": "user", "content": LONG_PROMPT}]})
    assert status == 200 and head["x-served-by"] == "gpu" and docs[-2][1]["x_served_by"] == "gpu"


def test_greedy_output_is_identical_on_both_tiers(stack: LocalStack) -> None:
    got = {}
    for tier in ("cpu", "gpu"):
        status, head, docs = post(stack, "/v1/completions", completion(PROMPT, 48, stream=True), {"x-target": tier})
        assert status == 200 and head["x-served-by"] == tier, docs[-2:]
        got[tier] = text_of(docs)
    assert got["cpu"] == got["gpu"] and got["cpu"]


def test_triton_killed_in_the_middle_of_a_greedy_stream_the_client_gets_one_uninterrupted_stream(
        stack: LocalStack) -> None:
    body = completion(PROMPT, MID_STREAM_TOKENS, stream=True)
    status, _, docs = post(stack, "/v1/completions", body, {"x-target": "cpu"})
    assert status == 200
    reference = text_of(docs)
    assert docs[-2][1]["choices"][0]["finish_reason"] == "length", "the reference must run to max_tokens"
    killed: list[float] = []

    def kill_after_a_few(n: int) -> None:
        if n == 1 and not killed:  # at the first text: the GPU is still generating (960 tokens)
            stack.triton.kill()
            killed.append(time.perf_counter())

    status, head, docs = post(stack, "/v1/completions", body, {"x-target": "gpu"}, on_chunk=kill_after_a_few)
    assert status == 200 and head["x-served-by"] == "gpu" and killed
    assert docs[-1][1] == "[DONE]"
    final = docs[-2][1]
    assert text_of(docs) == reference  # nothing lost or repeated, and what one tier alone produces
    assert final["x_failover"]["from"] == "gpu" and final["x_failover"]["to"] == "cpu"
    assert 1 <= final["x_failover"]["after_tokens"] < MID_STREAM_TOKENS and final["x_served_by"] == "cpu"
    assert final["choices"][0]["finish_reason"] == "length"


def test_triton_killed_before_the_request_the_cpu_copy_serves_it(stack: LocalStack) -> None:
    stack.triton.kill()  # (idempotent: the previous test killed it in the middle of a stream)
    status, head, docs = post(stack, "/v1/completions", completion(LONG_PROMPT, 300, stream=True))
    assert status == 200 and head["x-served-by"] == "cpu" and head.get("x-fallback") == "gpu-unavailable", head
    assert docs[-2][1]["choices"][0]["finish_reason"] in ("stop", "length") and docs[-2][1]["x_served_by"] == "cpu"
