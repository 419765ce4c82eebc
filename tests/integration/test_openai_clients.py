"""Clients we did not write, unchanged, against the generation routes (issue 17): the official ``openai`` SDK
(``chat.completions.create`` and ``completions.create``, streamed and not, ``models.list``), ``curl -N`` on both
streaming routes, and ``tritonclient`` on the existing routes, against ``tierserve serve`` (its streaming REST API:
the router's REST events, the CPU function over a streamed Invoke) and against the edge's HTTP server.

The model is the tiny random-weight Llama (tests/support/causal_lm.py): its greedy text is full of multi-byte
characters and bytes that decode to U+FFFD, so "the streamed text equals the non-streamed text" covers characters
split across tokens and across SSE events.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.support.causal_lm import MULTIBYTE_TEXT
from tests.support.edge import synced_edge
from tests.support.genai_models import TinyLM, export
from tests.support.genai_serving import sse_events, sse_text, write_serving_store

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> TinyLM:
    return export(tmp_path_factory.mktemp("clients-lm"), "llama")


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, llama: TinyLM) -> Iterator[str]:
    from tierserve_tools.serve import LocalStack

    root = write_serving_store(tmp_path_factory.mktemp("clients-store"), llama, targets=("cpu",))
    with LocalStack(root, port=0, s3=False, batch=False, workdir=tmp_path_factory.mktemp("serve")) as stack:
        yield stack.url


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory, llama: TinyLM) -> Iterator[object]:
    root = write_serving_store(tmp_path_factory.mktemp("edge-clients-store"), llama, targets=("cpu", "edge"))
    with synced_edge(1024 * 1024, store_uri=str(root), cache_dir=str(tmp_path_factory.mktemp("edge-cache")), port=0,
                     grpc_port=-1, threads=1) as rt:
        yield rt


@pytest.fixture(params=["serve", "edge"])
def base(request: pytest.FixtureRequest) -> str:
    """The server's URL: `tierserve serve`, or the edge runtime."""
    if request.param == "serve":
        return str(request.getfixturevalue("serve"))
    return str(request.getfixturevalue("edge").url)


def sdk(base: str) -> object:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused-locally", max_retries=0, timeout=120)


CHAT = [{"role": "user", "content": MULTIBYTE_TEXT}]


def test_openai_sdk_chat_streamed_and_not(base: str, llama: TinyLM) -> None:
    from transformers import AutoTokenizer

    client = sdk(base)
    whole = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=40)
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert any(ord(c) > 127 for c in text), "the test needs multi-byte characters in the answer"
    prompt = AutoTokenizer.from_pretrained(llama.hf).apply_chat_template(CHAT, add_generation_prompt=True,
                                                                         tokenize=True, return_dict=False)
    assert whole.usage.prompt_tokens == len(prompt)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_openai_sdk_completions_streamed_and_not(base: str, llama: TinyLM) -> None:
    from transformers import AutoTokenizer

    client = sdk(base)
    whole = client.completions.create(model="tiny:1", prompt=MULTIBYTE_TEXT, temperature=0, max_tokens=30)
    assert whole.model == "tiny:1" and whole.usage.completion_tokens == 30
    assert whole.usage.prompt_tokens == len(AutoTokenizer.from_pretrained(llama.hf)(MULTIBYTE_TEXT)["input_ids"])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny:1", prompt=MULTIBYTE_TEXT, temperature=0, max_tokens=30, stream=True))
    assert streamed == whole.choices[0].text
    # a seed makes sampling reproducible
    a = client.completions.create(model="tiny", prompt="Hello", temperature=1.0, seed=7, max_tokens=12)
    b = client.completions.create(model="tiny", prompt="Hello", temperature=1.0, seed=7, max_tokens=12)
    assert a.choices[0].text == b.choices[0].text


def test_openai_sdk_models_list(base: str) -> None:
    ids = {m.id for m in sdk(base).models.list()}
    assert {"tiny", "tiny:1", "plain", "emb"} <= ids


def test_openai_sdk_errors_are_openais(base: str) -> None:
    client = sdk(base)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=CHAT, logprobs=True)
    assert bad.value.code == "unsupported_parameter" and bad.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as n:
        client.completions.create(model="tiny", prompt="x", n=2)
    assert n.value.param == "n"
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 300}],
                                       max_tokens=100)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert missing.value.code == "model_not_found"


def _curl(url: str, body: dict) -> tuple[list[tuple[float, bytes]], float]:
    """``curl -N`` POSTing ``body``; each line of its output with the time it arrived, and when curl ended."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["curl", "-sS", "-N", "-X", "POST", url, "-H", "Content-Type: application/json",
                             "--data-binary", json.dumps(body)], stdout=subprocess.PIPE)
    lines = []
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        lines.append((time.monotonic() - t0, line))
    assert proc.wait(timeout=120) == 0
    return lines, time.monotonic() - t0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v2/models/tiny/generate_stream"])
def test_curl_n_on_both_streaming_routes(base: str, route: str) -> None:
    if route.startswith("/v1"):
        body: dict = {"model": "tiny", "messages": CHAT, "temperature": 0, "max_tokens": 40, "stream": True}
    else:
        body = {"text_input": MULTIBYTE_TEXT, "parameters": {"temperature": 0, "max_tokens": 40}}
    lines, _ = _curl(f"{base}{route}", body)
    data = b"".join(line for _, line in lines)
    events = sse_events(data)
    if route.startswith("/v1"):
        whole = sdk(base).chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=40)
        assert sse_text(data) == whole.choices[0].message.content
    else:
        texts = [json.loads(e)["text_output"] for e in events]
        answer = json.loads(subprocess.run(
            ["curl", "-sS", "-X", "POST", f"{base}/v2/models/tiny/generate", "-H", "Content-Type: application/json",
             "--data-binary", json.dumps({**body, "exclude_input_in_output": True})],
            capture_output=True, check=True).stdout)
        assert "".join(texts) == answer["text_output"]


def test_tritonclient_on_the_existing_routes(base: str) -> None:
    import numpy as np
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(base.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_model_ready("emb")
        metadata = client.get_model_metadata("tiny")
        assert "text_input" in [i["name"] for i in metadata["inputs"]]
        assert client.get_model_config("tiny")["model_transaction_policy"] == {"decoupled": True}
        ids = httpclient.InferInput("ids", [1, 3], "INT64")
        ids.set_data_from_numpy(np.array([[1, 2, 3]], np.int64))
        mask = httpclient.InferInput("mask", [1, 3], "INT64")
        mask.set_data_from_numpy(np.ones((1, 3), np.int64))
        y = client.infer("emb", [ids, mask]).as_numpy("y")
        assert y.shape == (1, 4)
        # and the same model's embedding through OpenAI's route
        emb = sdk(base).embeddings.create(model="emb", input=[[1, 2, 3]])
        assert emb.data[0].embedding == pytest.approx(y[0].tolist(), rel=1e-5)
    finally:
        client.close()


# --- at the edge: a disconnect stops the generation; past the cap, a 429 ------------------------------------


def test_sdk_stream_closed_early_stops_the_generation_at_the_edge(edge: object) -> None:
    from tierserve.generation import service

    mv = edge.runtime.store.manifest().resolve("tiny")
    stream = sdk(edge.url).completions.create(model="tiny", prompt="Hello", max_tokens=200, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away
    t0 = time.monotonic()
    while service.ADMISSION.running(mv) and time.monotonic() - t0 < 3:
        time.sleep(0.01)
    assert service.ADMISSION.running(mv) == 0 and time.monotonic() - t0 < 1


def test_sdk_past_the_cap_gets_429_with_retry_after_at_the_edge(edge: object) -> None:
    # Given the device at its cap for tiny (2 generations at once), held the way two running streams hold it
    # (the tiny model writes a whole stream faster than a client opens three on a busy machine, so real streams
    # made this test depend on timing; the serve test drives real overlapping streams)
    from tierserve.generation import service

    mv = edge.runtime.store.manifest().resolve("tiny")
    client = sdk(edge.url)
    releases = [service.ADMISSION.acquire(edge.runtime, mv) for _ in range(2)]
    try:
        assert service.ADMISSION.running(mv) == 2
        # Then the SDK's next request is a RateLimitError in OpenAI's shape, with Retry-After
        with pytest.raises(openai.RateLimitError) as limited:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=4)
        assert limited.value.code == "rate_limit_exceeded"
        assert int(limited.value.response.headers["retry-after"]) >= 1
    finally:
        for release in releases:
            release()
    # And once a slot frees, the model serves again
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=4).usage.completion_tokens >= 1


def test_tierserve_client_chat_and_complete(edge: object) -> None:
    from tierserve.client import ApiError, Client

    api = Client(edge.url)
    whole = api.chat("tiny", CHAT, temperature=0, max_tokens=20)
    chunks = list(api.chat("tiny", CHAT, temperature=0, max_tokens=20, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        whole["choices"][0]["message"]["content"]
    done = api.complete("tiny", "Hello", temperature=0, max_tokens=5)
    assert done["usage"]["completion_tokens"] <= 5
    assert {"tiny", "emb"} <= {m["id"] for m in api.models()}
    with pytest.raises(ApiError) as bad:
        list(api.complete("tiny", "Hello", stream=True, logprobs=True))
    assert (bad.value.status, bad.value.param) == (400, "logprobs")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_n_gets_each_event_as_it_is_generated_at_the_edge(edge: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierserve.generation import service

    real = service.generate_local

    def paced(*args, **kwargs):  # 50 ms a token, so that a buffered answer would show
        events = real(*args, **kwargs)

        def gen():
            try:
                for event in events:
                    time.sleep(0.05)
                    yield event
            finally:
                events.close()
        return gen()

    monkeypatch.setattr(service, "generate_local", paced)
    lines, total = _curl(f"{edge.url}/v1/completions", {"model": "tiny", "prompt": "Hello", "temperature": 0,
                                                          "max_tokens": 20, "stream": True})
    first = next(t for t, line in lines if line.startswith(b"data: {"))
    assert total > 0.9 and first < total / 2, (first, total)  # the first event came long before the last
    assert lines[-2][1] == b"data: [DONE]\n"
