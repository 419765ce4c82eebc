"""The generation routes of the endpoint table (tierserve.api, issue 17): OpenAI's /v1 routes and Triton's generate
extension, through the three entries (handle_request, handle_http, handle_rest), on a real store and engine."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.causal_lm import MULTIBYTE_TEXT
from tests.support.genai_models import TinyLM, export
from tests.support.genai_serving import TINY_TOKENS_PER_S, sse_events, sse_text, write_serving_store
from tests.support.make_events import http_event
from tierserve import api
from tierserve.protocol.http_api import HttpRequest, decode_body
from tierserve.streaming.response import StreamingResponse


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> TinyLM:
    return export(tmp_path_factory.mktemp("api-lm"), "llama")


@pytest.fixture
def rt(runtime_env: pytest.MonkeyPatch, tmp_path: Path, llama: TinyLM) -> Iterator[object]:
    from tierserve.app import build_runtime
    from tierserve.generation import engine
    from tierserve.settings import Settings

    root = write_serving_store(tmp_path / "store", llama)
    runtime_env.setenv("TIERSERVE_METRICS", "false")
    yield build_runtime(Settings(model_store_uri=str(root), model_cache_dir=str(tmp_path / "cache"), ort_threads=1))
    engine.clear()


def post(rt, path: str, body: object, **headers: str):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = HttpRequest("POST", path, {k.replace("_", "-"): v for k, v in headers.items()}, {}, "rid-1", _body=raw)
    return api.handle_request(req, None, rt)


def get(rt, path: str):
    return api.handle_request(HttpRequest("GET", path, {}, {}, "rid-1", _body=b""), None, rt)


def read(resp) -> bytes:
    assert isinstance(resp, StreamingResponse)
    try:
        return b"".join(resp.chunks)
    finally:
        resp.release()


def doc(resp) -> dict:
    assert isinstance(resp, dict), resp
    return json.loads(decode_body(resp))


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": MULTIBYTE_TEXT}], "temperature": 0,
        "max_tokens": 24}


# --- OpenAI's routes ------------------------------------------------------------------------------------------


def test_chat_streamed_text_equals_the_buffered_text_and_usage_is_the_tokenizers(rt, llama) -> None:
    from transformers import AutoTokenizer

    whole = post(rt, "/v1/chat/completions", CHAT)
    assert whole["statusCode"] == 200 and whole["headers"]["x-served-by"] == "cpu"
    body = doc(whole)
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "length"
    # the prompt's tokens as transformers counts them (its chat template, its tokenizer)
    prompt = AutoTokenizer.from_pretrained(llama.hf).apply_chat_template(CHAT["messages"], add_generation_prompt=True,
                                                                         tokenize=True, return_dict=False)
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 24, "total_tokens": len(prompt) + 24}

    streamed = post(rt, "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert isinstance(streamed, StreamingResponse) and streamed.status == 200
    assert streamed.headers["content-type"].startswith("text/event-stream") and streamed.headers["x-served-by"] == "cpu"
    data = read(streamed)
    assert sse_text(data) == body["choices"][0]["message"]["content"]
    chunks = [json.loads(e) for e in sse_events(data)[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == body["usage"]  # include_usage: the last chunk


def test_completions_streamed_equals_buffered_with_multibyte_prompt(rt) -> None:
    req = {"model": "plain:1", "prompt": MULTIBYTE_TEXT, "temperature": 0, "max_tokens": 30}
    body = doc(post(rt, "/v1/completions", req))
    assert body["object"] == "text_completion" and body["model"] == "plain:1"
    data = read(post(rt, "/v1/completions", {**req, "stream": True}))
    data.decode("utf-8")  # every event is whole UTF-8
    assert sse_text(data) == body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 30


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    (b"{not json", 400, None, "invalid_json"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n", "unsupported_value"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs",
     "unsupported_parameter"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature",
     "invalid_type"),
    ({"model": "tiny", "messages": []}, 400, "messages", "invalid_value"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, None, "model_not_found"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 250}, 400, "max_tokens",
     "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 200}, 400,
     "messages", "context_length_exceeded"),
    ({"model": "plain", "messages": [{"role": "user", "content": "x"}]}, 400, "messages",
     "model_has_no_chat_template"),
    ({"model": "emb", "messages": [{"role": "user", "content": "x"}]}, 400, None, "invalid_request"),
])
def test_malformed_requests_get_openais_error_shape(rt, body, status, param, code) -> None:
    resp = post(rt, "/v1/chat/completions", body)
    assert resp["statusCode"] == status, resp
    error = doc(resp)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_an_unknown_v1_route_is_a_404_in_openais_shape(rt) -> None:
    resp = post(rt, "/v1/nothing", {})
    assert resp["statusCode"] == 404 and doc(resp)["error"]["code"] == "route_not_found"


def test_past_the_cap_is_a_429_with_retry_after_in_openais_shape(rt) -> None:
    held = [post(rt, "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True}) for _ in range(2)]
    assert all(isinstance(h, StreamingResponse) for h in held)
    resp = post(rt, "/v1/completions", {"model": "tiny", "prompt": "x"})
    assert resp["statusCode"] == 429 and int(resp["headers"]["retry-after"]) >= 1
    assert doc(resp)["error"]["type"] == "rate_limit_error" and doc(resp)["error"]["code"] == "rate_limit_exceeded"
    for h in held:
        h.release()  # the slots are free again
    assert post(rt, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})["statusCode"] == 200


def test_closing_a_stream_stops_the_generation_within_one_token(rt) -> None:
    from tierserve.generation import service

    mv = rt.store.manifest().resolve("tiny")
    resp = post(rt, "/v1/completions", {"model": "tiny", "prompt": "Hello", "temperature": 0, "max_tokens": 200,
                                        "stream": True})
    got = [next(resp.chunks) for _ in range(3)]
    assert service.ADMISSION.running(mv) == 1
    resp.release()  # the client went away
    assert service.ADMISSION.running(mv) == 0
    assert list(resp.chunks) == []  # not one more chunk
    assert len(got) == 3


def test_a_disconnect_seen_by_the_transport_stops_the_generation_within_one_token(rt) -> None:
    gone = []
    req = HttpRequest("POST", "/v1/completions", {}, {}, "rid", _body=json.dumps(
        {"model": "tiny", "prompt": "Hello", "temperature": 0, "max_tokens": 200, "stream": True}).encode())
    resp = api.handle_request(req, None, rt, cancelled=lambda: bool(gone))
    first = [next(resp.chunks) for _ in range(2)]
    gone.append(True)
    rest = list(resp.chunks)
    resp.release()
    # at most the token already computed, then the end: never the 198 tokens left
    texts = [e for e in sse_events(b"".join(rest))] if rest else []
    assert len([e for e in texts if e != "[DONE]"]) <= 2, texts
    assert len(first) == 2


def test_models_lists_every_model_and_version(rt) -> None:
    resp = get(rt, "/v1/models")
    ids = [m["id"] for m in doc(resp)["data"]]
    assert ids == ["emb", "emb:1", "plain", "plain:1", "tiny", "tiny:1"]


def test_embeddings_from_token_ids_as_floats_and_base64(rt) -> None:
    floats = doc(post(rt, "/v1/embeddings", {"model": "emb", "input": [[1, 2, 3], [4, 5]], "encoding_format": "float"}))
    assert floats["object"] == "list" and floats["model"] == "emb"
    assert floats["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert [d["index"] for d in floats["data"]] == [0, 1] and len(floats["data"][0]["embedding"]) == 4
    b64 = doc(post(rt, "/v1/embeddings", {"model": "emb:1", "input": [[1, 2, 3], [4, 5]],
                                          "encoding_format": "base64"}))
    decoded = list(struct.unpack("<4f", base64.b64decode(b64["data"][1]["embedding"])))
    assert decoded == pytest.approx(floats["data"][1]["embedding"], rel=1e-6)
    # one text (a flat list of ids) is one embedding
    alone = doc(post(rt, "/v1/embeddings", {"model": "emb", "input": [4, 5], "encoding_format": "float"}))
    assert len(alone["data"]) == 1 and alone["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"model": "emb", "input": "some text"}, "input", "tokenizer_required"),
    ({"model": "emb", "input": []}, "input", "invalid_type"),
    ({"model": "emb", "input": [1], "dimensions": 3}, "dimensions", "unsupported_value"),
    ({"model": "emb", "input": [1], "encoding_format": "hex"}, "encoding_format", "invalid_value"),
    ({"model": "tiny", "input": [1]}, "model", "model_not_embedding"),
])
def test_embeddings_say_what_they_need(rt, body, param, code) -> None:
    resp = post(rt, "/v1/embeddings", body)
    assert resp["statusCode"] == 400
    error = doc(resp)["error"]
    assert (error["param"], error["code"]) == (param, code), error


# --- Triton's generate extension and the model's config -----------------------------------------------------


def test_triton_generate_and_generate_stream(rt) -> None:
    req = {"text_input": "Hello", "parameters": {"temperature": 0, "max_tokens": 12}, "exclude_input_in_output": True}
    whole = post(rt, "/v2/models/tiny/versions/1/generate", req)
    answer = doc(whole)
    assert (answer["model_name"], answer["model_version"]) == ("tiny", "1")
    data = read(post(rt, "/v2/models/tiny/generate_stream", req))
    events = [json.loads(e) for e in sse_events(data)]
    assert "".join(e["text_output"] for e in events) == answer["text_output"]
    echoed = doc(post(rt, "/v2/models/tiny/generate", {**req, "exclude_input_in_output": False}))
    assert echoed["text_output"] == "Hello" + answer["text_output"]
    bad = post(rt, "/v2/models/tiny/generate", {"text_input": "x", "parameters": {"logprobs": 1}})
    assert bad["statusCode"] == 400 and doc(bad)["code"] == "unsupported_parameter"


def test_config_of_a_generative_model_is_decoupled_with_the_vllm_backends_tensors(rt) -> None:
    config = doc(get(rt, "/v2/models/tiny/config"))
    assert config["model_transaction_policy"] == {"decoupled": True}
    assert {i["name"]: i["optional"] for i in config["input"]} == {
        "text_input": False, "stream": True, "sampling_parameters": True, "exclude_input_in_output": True}
    assert [(o["name"], o["data_type"]) for o in config["output"]] == [("text_output", "TYPE_STRING")]
    metadata = doc(get(rt, "/v2/models/tiny"))
    assert [i["name"] for i in metadata["inputs"]] == ["text_input", "stream", "sampling_parameters",
                                                       "exclude_input_in_output"]
    assert [o["name"] for o in metadata["outputs"]] == ["text_output"]
    assert "model_transaction_policy" not in doc(get(rt, "/v2/models/emb/config"))


# --- the buffered HTTP API (payload 2.0) -------------------------------------------------------------------


def http(rt, path: str, body: dict) -> dict:
    return api.handle_http(http_event("POST", path, f"POST {path}", json.dumps(body)), None, rt)


def test_http_api_refuses_a_stream_with_a_400_that_says_where_to_stream(rt) -> None:
    resp = http(rt, "/v1/chat/completions", {**CHAT, "stream": True})
    error = doc(resp)["error"]
    assert resp["statusCode"] == 400 and error["code"] == "streaming_unsupported" and error["param"] == "stream"
    assert "REST API" in error["message"]
    resp = http(rt, "/v2/models/tiny/generate_stream", {"text_input": "x"})
    assert resp["statusCode"] == 400 and doc(resp)["code"] == "streaming_unsupported"


def test_http_api_refuses_a_generation_that_cannot_finish_in_29_s_before_any_work(rt) -> None:
    from tierserve.generation import engine

    engine.clear()
    too_long = int(TINY_TOKENS_PER_S * 30)  # 150 tokens at 5 tokens/s: 30 s
    resp = http(rt, "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": too_long})
    error = doc(resp)["error"]
    assert resp["statusCode"] == 400 and error["code"] == "generation_too_long_for_http_api"
    assert error["param"] == "max_tokens" and "stream" in error["message"]
    assert "at most 144 tokens" in error["message"]  # (30 s - 1 s of margin - 50 ms to the first token) x 5/s
    assert engine._models == {}  # nothing was loaded, let alone run
    ok = http(rt, "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 8})
    assert ok["statusCode"] == 200 and doc(ok)["usage"]["completion_tokens"] <= 8


# --- the streaming REST API (payload 1.0) ------------------------------------------------------------------


def rest_event(path: str, body: dict) -> dict:
    return {"resource": path, "path": path, "httpMethod": "POST", "headers": {"content-type": "application/json"},
            "multiValueHeaders": {}, "queryStringParameters": None, "pathParameters": None,
            "requestContext": {"requestId": "r-1", "stage": "api", "path": f"/api{path}",
                               "authorizer": {"caller": "team-a", "key_id": "abc"}},
            "body": json.dumps(body), "isBase64Encoded": False}


def test_rest_streams_under_the_streaming_runtime_and_buffers_otherwise(rt, monkeypatch) -> None:
    streamed = {**CHAT, "stream": True}
    monkeypatch.delenv("TIERSERVE_STREAMING_RUNTIME", raising=False)
    buffered = api.handle_rest(rest_event("/v1/chat/completions", streamed), None, rt)
    assert isinstance(buffered, dict) and buffered["headers"]["content-type"].startswith("text/event-stream")
    monkeypatch.setenv("TIERSERVE_STREAMING_RUNTIME", "1")
    live = api.handle_rest(rest_event("/v1/chat/completions", streamed), None, rt)
    assert sse_text(read(live)) == sse_text(decode_body(buffered))
    # every answer streams there, a buffered one as one chunk (an error too)
    missing = api.handle_rest(rest_event("/v1/chat/completions", {**CHAT, "model": "nope"}), None, rt)
    assert isinstance(missing, StreamingResponse) and missing.status == 404
    assert json.loads(read(missing))["error"]["code"] == "model_not_found"
