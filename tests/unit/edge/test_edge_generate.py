"""Generation at the edge (issue 17): a causal LM the device holds runs on the device with onnxruntime-genai (greedy
output equals transformers'), streamed over the edge's HTTP server; a disconnect stops it; its KV memory caps it
(429); a model the device does not hold is relayed to the cloud, its stream passed on."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.causal_lm import hf_greedy
from tests.support.edge import synced_edge
from tests.support.genai_models import TinyLM, export, write_genai_store
from tests.support.genai_serving import ApiServer, sse_events, sse_text, write_serving_store
from tierserve.client import Client, StreamedResponse

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> TinyLM:
    return export(tmp_path_factory.mktemp("edge-lm"), "llama")


@pytest.fixture
def cloud(runtime_env: pytest.MonkeyPatch, tmp_path: Path, llama: TinyLM) -> Iterator[ApiServer]:
    """'the cloud': the endpoint table over a store where 'tiny' and 'cloudy' (a CPU-only causal LM) are served."""
    from tierserve.app import build_runtime
    from tierserve.settings import Settings

    root = write_serving_store(tmp_path / "cloud-store", llama, targets=("cpu",))
    write_genai_store(root, "cloudy", llama, targets=("cpu",))
    runtime_env.setenv("TIERSERVE_METRICS", "false")
    rt = build_runtime(Settings(model_store_uri=str(root), model_cache_dir=str(tmp_path / "cloud-cache"),
                                ort_threads=1))
    with ApiServer(rt) as server:
        yield server


@pytest.fixture
def edge(tmp_path: Path, llama: TinyLM, cloud: ApiServer) -> Iterator[object]:
    from tierserve.generation import engine

    store = write_serving_store(tmp_path / "edge-store", llama)  # 'tiny' and 'plain' placed on the edge
    write_genai_store(store, "cloudy", llama, targets=("cpu",))   # 'cloudy' is not
    with synced_edge(LIMIT, store_uri=str(store), cache_dir=str(tmp_path / "edge-cache"), port=0, grpc_port=-1,
                     cloud_url=cloud.url, cloud_auth="none", threads=1) as rt:
        yield rt
    engine.clear()


def post(url: str, path: str, body: dict) -> StreamedResponse:
    return Client(url).stream("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})


def test_greedy_output_at_the_edge_equals_transformers(edge, llama: TinyLM) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama.hf)
    ids = tok("The with statement is used to")["input_ids"]
    expected = hf_greedy(llama.hf, ids, 16)
    resp = post(edge.url, "/v1/completions", {"model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 16})
    body = json.loads(resp.read().body)
    assert resp.status == 200 and resp.served_by == "edge"
    eos = int(json.loads((llama.hf / "config.json").read_text())["eos_token_id"])
    new = expected[:expected.index(eos) + 1] if eos in expected else expected
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(new),
                             "total_tokens": len(ids) + len(new)}
    assert body["choices"][0]["text"] == tok.decode(new, skip_special_tokens=True)
    # and streamed through the edge's HTTP, chunk by chunk, the same text
    streamed = post(edge.url, "/v1/completions", {"model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 16,
                                                  "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream") and streamed.served_by == "edge"
    assert streamed.headers.get("transfer-encoding") == "chunked" and "content-encoding" not in streamed.headers
    assert sse_text(streamed.read().body) == body["choices"][0]["text"]


def test_a_client_that_goes_away_stops_the_generation_within_one_token(edge, monkeypatch) -> None:
    from tierserve.generation import service

    pulled: list[int] = []
    real = service.generate_local

    def slow(*args, **kwargs):  # 20 ms a token: 200 tokens would take 4 s
        events = real(*args, **kwargs)

        def paced():
            try:
                for event in events:
                    pulled.append(1)
                    time.sleep(0.02)
                    yield event
            finally:
                events.close()
        return paced()

    monkeypatch.setattr(service, "generate_local", slow)
    mv = edge.runtime.store.manifest().resolve("tiny")
    body = json.dumps({"model": "tiny", "prompt": "Hello", "temperature": 0, "max_tokens": 200, "stream": True})
    host, port = edge.http.host, edge.http.port
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
              f"{len(body)}\r\n\r\n{body}".encode())
    got = b""
    while b"data: " not in got:
        got += s.recv(65536)
    s.close()  # the client goes away after the first event
    t0 = time.monotonic()
    while (service.ADMISSION.running(mv) or edge.dispatcher.kv.running) and time.monotonic() - t0 < 3:
        time.sleep(0.01)
    assert service.ADMISSION.running(mv) == 0 and edge.dispatcher.kv.running == 0, "the generation still holds its slot"
    assert time.monotonic() - t0 < 1.0
    assert len(pulled) < 20, f"{len(pulled)} tokens were generated for a client that left after the first"


def test_past_the_devices_kv_memory_is_a_429_and_a_request_that_can_never_fit_a_400(edge, llama) -> None:
    from tierserve.generation.kv import kv_bytes_per_token

    mv = edge.runtime.store.manifest().resolve("tiny")
    per_token = kv_bytes_per_token(mv, edge.store.held(mv).path.parent)
    assert per_token > 0
    edge.dispatcher.kv.budget = lambda: per_token * 150  # room for one generation of about 100 tokens
    first = post(edge.url, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 100, "stream": True})
    assert first.status == 200
    second = post(edge.url, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 100}).read()
    assert second.status == 429 and int(second.headers["retry-after"]) >= 1
    error = json.loads(second.body)["error"]
    assert error["code"] == "rate_limit_exceeded" and "KV memory" in error["message"]
    first.close()
    huge = post(edge.url, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 190}).read()
    assert huge.status == 400 and json.loads(huge.body)["error"]["param"] == "max_tokens"
    time.sleep(0.2)  # the first stream's slot is freed when the server sees it closed
    again = post(edge.url, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 8}).read()
    assert again.status == 200


def test_a_model_the_device_does_not_hold_is_relayed_to_the_cloud_streamed(edge, cloud) -> None:
    req = {"model": "cloudy", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 12}
    whole = post(edge.url, "/v1/chat/completions", req).read()
    assert whole.status == 200 and whole.served_by == "cpu"
    text = json.loads(whole.body)["choices"][0]["message"]["content"]
    streamed = post(edge.url, "/v1/chat/completions", {**req, "stream": True})
    assert streamed.status == 200 and streamed.served_by == "cpu"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert sse_text(streamed.read().body) == text
    # Triton's generate too, and the cloud's errors pass back as they are
    gen = post(edge.url, "/v2/models/cloudy/generate_stream", {"text_input": "Hi", "parameters": {"max_tokens": 4}})
    events = sse_events(gen.read().body)
    assert events and all("text_output" in json.loads(e) for e in events)
    bad = post(edge.url, "/v1/chat/completions", {**req, "n": 3}).read()
    assert bad.status == 400 and json.loads(bad.body)["error"]["param"] == "n"
    assert cloud.requests >= 3


def test_models_and_an_unknown_model_at_the_edge(edge) -> None:
    models = Client(edge.url).request("GET", "/v1/models")
    assert models.status == 200 and {"tiny", "cloudy", "emb"} <= {m["id"] for m in models.json()["data"]}
    missing = post(edge.url, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    resp = missing.read()
    assert resp.status == 404 and json.loads(resp.body)["error"]["code"] == "model_not_found"


def test_a_generative_model_the_device_holds_is_ready_there_without_a_cloud(tmp_path: Path, llama: TinyLM) -> None:
    from tierserve.generation import engine

    store = write_serving_store(tmp_path / "store", llama)
    write_genai_store(store, "cloudy", llama, targets=("cpu",))
    with synced_edge(LIMIT, store_uri=str(store), cache_dir=str(tmp_path / "cache"), port=0, grpc_port=-1,
                     threads=1) as rt:
        api = Client(rt.url)
        assert api.request("GET", "/v2/models/tiny/ready").status == 200  # onnxruntime-genai loads it here
        assert api.request("GET", "/v2/models/cloudy/ready").status == 503  # not held, no cloud
        index = {m["name"]: m["state"] for m in api.request("POST", "/v2/repository/index").json()}
        assert index["tiny"] == "READY" and index["cloudy"] == "UNAVAILABLE"
    engine.clear()
