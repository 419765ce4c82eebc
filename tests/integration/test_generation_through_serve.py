"""Generation limits through `tierserve serve` as AWS runs it (issue 17's acceptance): the streaming REST API ->
RouterFunction -> InvokeWithResponseStream -> CpuInferenceFunction, each function in its own execution
environments (three of each, as Lambda scales out), on a model slow enough (hundreds of tokens/s) that a stream
lasts seconds:

* a client that disconnects stops the generation in the CPU function (its tokens, counted by the function's
  CompletionTokens metric on ``GET /metrics``, stop a few tokens after the client's last chunk), and the
  environments serve again;
* past a model's cap on concurrent generations the answer is 429 with Retry-After (the cap shared by every router
  environment: ``tierserve.admission``, a DynamoDB item in the router's usage table).

Why a test through the whole stack: ``generation.service.Admission`` counts the generations of one process, and
a Lambda execution environment runs one invocation at a time, so a cap counted there never sees a second
generation; the streams that exceed it would land in other environments (or wait for one) and all be served, so
the router counts them in DynamoDB across its environments. The in-process tests (tests/unit/runtime/
test_api_generate.py, the edge) cannot show it.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.genai_models import write_genai_store
from tierserve_tools.serve import LocalStack

pytestmark = pytest.mark.integration
STREAMS = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    import subprocess
    import sys

    from tests.support.causal_lm import build_causal_lm
    from tests.support.genai_models import TinyLM

    root = tmp_path_factory.mktemp("admission")
    # 6 layers of hidden size 256: slow enough (hundreds of tokens/s) that 900 tokens take seconds
    hf = build_causal_lm(root / "hf", "llama", layers=6, hidden=256)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(root / "lm"),
                    "-p", "fp32", "-e", "cpu"], cwd=root, check=True, capture_output=True)
    write_genai_store(root / "store", "tiny", TinyLM("llama", hf, root / "lm"), context_length=1024,
                      max_tokens_cap=900, max_concurrency=1)
    with LocalStack(root / "store", port=0, triton=False, batch=False, s3=False, workdir=root / "serve",
                    router_workers=STREAMS, cpu_workers=STREAMS) as local:
        yield local


def stream(stack: LocalStack, start: threading.Barrier, out: list) -> None:
    conn = http.client.HTTPConnection(stack.host, stack.port, timeout=120)
    body = {"model": "tiny", "prompt": "The with statement", "max_tokens": 900, "temperature": 0, "stream": True,
            "stop": ["never-generated-stop-string"]}
    start.wait()
    t0 = time.monotonic()
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    first = time.monotonic()
    data = resp.read()
    out.append((resp.status, t0, first, time.monotonic(), resp.getheader("retry-after"), data[-300:]))
    conn.close()


def test_past_the_models_cap_on_concurrent_generations_the_answer_is_429(stack: LocalStack) -> None:
    # warm STREAMS environments of the router and of the CPU function (model loaded), so the streams start together
    for _ in range(2):
        warm: list = []
        threads = [threading.Thread(target=lambda: warm.append(_one(stack))) for _ in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    out: list = []
    start = threading.Barrier(STREAMS)
    threads = [threading.Thread(target=stream, args=(stack, start, out)) for _ in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    served = [o for o in out if o[0] == 200]
    refused = [o for o in out if o[0] == 429]
    assert len(served) + len(refused) == STREAMS, out
    assert len(served) == 1 and all(r[4] for r in refused), [(o[0], o[4]) for o in out]
    # refused while the served stream held the model's one slot (it lasts seconds), in OpenAI's shape
    assert all(r[3] < served[0][3] for r in refused), [(o[0], round(o[1], 3), round(o[3], 3)) for o in out]
    assert all(b'"code": "rate_limit_exceeded"' in r[5] or b'"code":"rate_limit_exceeded"' in r[5] for r in refused)
    # the slot was released when the stream ended: the model serves again
    assert _one(stack)[0] == 200


def _completion_tokens(stack: LocalStack) -> float:
    import re
    import urllib.request

    text = urllib.request.urlopen(f"{stack.url}/metrics", timeout=30).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(
        r'^tierserve_completion_tokens_total\{[^}]*function="CpuInferenceFunction"[^}]*\} (\S+)$', text, re.M))


def _settled_tokens(stack: LocalStack, timeout_s: float = 30.0) -> float:
    """The CPU function's completion tokens once the counter has not moved for a second."""
    deadline = time.monotonic() + timeout_s
    last, since = _completion_tokens(stack), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = _completion_tokens(stack)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            break
    return last


def test_a_client_that_disconnects_stops_the_generation_in_the_cpu_function(stack: LocalStack) -> None:
    body = {"model": "tiny", "prompt": "The with statement", "max_tokens": 900, "temperature": 0, "stream": True,
            "stop": ["never-generated-stop-string"]}
    # undisturbed, this greedy generation is long (so stopping early is the disconnect's doing, not EOS's)
    status, whole = _one(stack, {**body, "stream": False})
    assert status == 200 and json.loads(whole)["usage"]["completion_tokens"] >= 300, whole[-300:]
    before = _settled_tokens(stack)
    conn = http.client.HTTPConnection(stack.host, stack.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    read = 0
    while read < 5:  # five text chunks, then the client goes away
        line = resp.readline()
        if line.startswith(b"data: {") and b'"text"' in line:
            read += 1
    conn.sock.shutdown(2)
    conn.close()
    # the CPU function's stream ends and counts what it generated: a few tokens past what the client read, far
    # fewer than the generation it would have made
    generated = _settled_tokens(stack) - before
    print(f"disconnect: {generated:g} tokens generated after 5 chunks read")
    assert 5 <= generated < 100, generated
    # and the environments serve again
    assert _one(stack)[0] == 200


def _one(stack: LocalStack, body: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(stack.host, stack.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body or {"model": "tiny", "prompt": "x", "max_tokens": 4}),
                 {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data
