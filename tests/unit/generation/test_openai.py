"""OpenAI's request parsing (every parameter, 400s that name the parameter) and answer shapes."""

from __future__ import annotations

import json

import pytest

from tierserve.errors import InvalidParameterError, TooManyRequestsError
from tierserve.generation import openai
from tierserve.generation.events import GenerationEvent, Usage
from tierserve.protocol.rendering import render_error

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}


def test_a_chat_body_with_every_parameter_parses() -> None:
    req = openai.parse_chat({**CHAT, "model": "tiny:2", "max_completion_tokens": 9, "temperature": 0.5,
                             "top_p": 0.9, "top_k": 40, "seed": 3, "stop": ["a", "b"], "n": 1, "stream": True,
                             "stream_options": {"include_usage": True}, "user": "u1", "logprobs": False,
                             "presence_penalty": 0, "messages": [{"role": "user", "content": [
                                 {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]})
    assert (req.model, req.version, req.stream, req.include_usage) == ("tiny", "2", True, True)
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (9, 0.5, 0.9, 40, 3, ("a", "b"))
    assert req.messages == ({"role": "user", "content": "one\ntwo"},)
    assert req.request_id.startswith("chatcmpl-")


def test_defaults_and_a_completion_body() -> None:
    req = openai.parse_completion({"model": "tiny", "prompt": "x", "stop": "END", "top_k": -1, "max_tokens": None})
    assert (req.prompt, req.params.max_tokens, req.params.temperature, req.params.top_k, req.params.stop) == (
        "x", None, 1.0, 0, ("END",))
    assert openai.parse_completion({"model": "tiny", "prompt": [1, 2, 3]}).prompt_ids == (1, 2, 3)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({**CHAT, "logprobs": True}, "logprobs", "unsupported_parameter"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
    ({**CHAT, "tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({**CHAT, "logit_bias": {"1": 5}}, "logit_bias", "unsupported_parameter"),
    ({**CHAT, "presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({**CHAT, "frequency_penalty": 1}, "frequency_penalty", "unsupported_parameter"),
    ({**CHAT, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({**CHAT, "n": 2}, "n", "unsupported_value"),
    ({**CHAT, "temperature": 3}, "temperature", "invalid_value"),
    ({**CHAT, "temperature": "hot"}, "temperature", "invalid_type"),
    ({**CHAT, "top_p": 0}, "top_p", "invalid_value"),
    ({**CHAT, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({**CHAT, "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "invalid_value"),
    ({**CHAT, "stop": ["", "x"]}, "stop", "invalid_value"),
    ({**CHAT, "stop": [1]}, "stop", "invalid_type"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({**CHAT, "stream": "yes"}, "stream", "invalid_type"),
    ({**CHAT, "seed": 1.5}, "seed", "invalid_type"),
    ({**CHAT, "ignore_eos": "yes"}, "ignore_eos", "invalid_type"),
    ({**CHAT, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": 1}},
     "stream_options.continuous_usage_stats", "invalid_type"),
    ({**CHAT, "stream": True, "stream_options": {"chunk_size": 1}}, "stream_options.chunk_size",
     "unsupported_parameter"),
    ({"messages": CHAT["messages"]}, "model", "missing_required_parameter"),
    ({"model": "tiny"}, "messages", "missing_required_parameter"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content",
     "unsupported_parameter"),
])
def test_a_bad_chat_parameter_is_a_400_that_names_it(body, param, code) -> None:
    with pytest.raises(InvalidParameterError) as err:
        openai.parse_chat(body)
    assert (err.value.param, err.value.code) == (param, code)
    answer = render_error(err.value, "openai")
    assert answer.status == 400
    assert answer.document["error"]["param"] == param and answer.document["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny", "prompt": "x", "echo": True}, "echo"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "tiny", "prompt": "x", "best_of": 2}, "best_of"),
    ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "tiny", "prompt": None}, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_completion_tokens": 3}, "max_completion_tokens"),
])
def test_a_bad_completion_parameter_is_a_400_that_names_it(body, param) -> None:
    with pytest.raises(InvalidParameterError) as err:
        openai.parse_completion(body)
    assert err.value.param == param


#: What guidellm 0.8.1 sends with ``output_tokens`` set (its backends/openai/request_handlers.py, and checked on the
#: wire through a logging proxy): vLLM's ignore_eos and continuous_usage_stats, and stop: null
GUIDELLM_OPTIONS = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                    "stop": None, "ignore_eos": True}
GUIDELLM_COMPLETION = {"model": "tiny", **GUIDELLM_OPTIONS, "max_tokens": 64, "prompt": "a b c"}
GUIDELLM_CHAT = {"model": "tiny", **GUIDELLM_OPTIONS, "max_completion_tokens": 64,
                 "messages": [{"role": "user", "content": [{"type": "text", "text": "a b c"}]}]}


def test_what_guidellm_sends_parses_with_ignore_eos_and_continuous_usage() -> None:
    for req in (openai.parse_completion(GUIDELLM_COMPLETION), openai.parse_chat(GUIDELLM_CHAT)):
        assert (req.params.ignore_eos, req.params.max_tokens, req.params.stop) == (True, 64, ())
        assert (req.stream, req.include_usage, req.continuous_usage) == (True, True, True)
    plain = openai.parse_chat({**CHAT, "ignore_eos": False})
    assert (plain.params.ignore_eos, plain.continuous_usage) == (False, False)
    # continuous_usage_stats counts only with include_usage, as vLLM's server reads it
    alone = openai.parse_chat({**CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert (alone.include_usage, alone.continuous_usage) == (False, False)


class _Started:
    """What DataPlane.generate hands the renderer: the events, and the prepared request (its prompt ids)."""

    def __init__(self, request, events) -> None:
        self.request, self._events, self.served_by = request, iter(events), "cpu"

    def __iter__(self):
        return self._events


def test_continuous_usage_puts_the_usage_so_far_on_every_chunk() -> None:
    # A completion: the usage after each sent chunk counts every token so far (the held-back one too)
    req = openai.parse_completion(GUIDELLM_COMPLETION).with_ids((5, 6, 7, 8))
    chunks = _chunks(list(openai.stream(req, iter(EVENTS), created=1)))
    assert [(c["choices"][0]["text"] if c["choices"] else None, c["usage"]) for c in chunks] == [
        ("Hel", {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}),
        ("lo", {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}),
        (None, {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})]  # the usage chunk, as before
    # A chat: the prompt's count comes from the prepared request; the role chunk has no completion token yet
    chat = openai.parse_chat(GUIDELLM_CHAT)
    chunks = _chunks(list(openai.stream(chat, _Started(chat.with_ids((1, 2, 3, 4)), EVENTS), created=1)))
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 3, 3]
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {4}


def test_a_429_has_openais_shape_and_retry_after() -> None:
    answer = render_error(TooManyRequestsError("busy", retry_after_s=1.0), "openai")
    assert answer.status == 429 and answer.headers["retry-after"] == "1"
    assert answer.document["error"]["type"] == "rate_limit_error"
    assert answer.document["error"]["code"] == "rate_limit_exceeded"


EVENTS = [GenerationEvent("Hel", (1,), served_by="cpu", ttft_ms=3.0), GenerationEvent("", (2,), served_by="cpu"),
          GenerationEvent("lo", (3,), finish_reason="stop", usage=Usage(4, 3), served_by="cpu")]


def test_a_non_streamed_chat_answer_has_openais_shape_and_says_which_tier() -> None:
    req = openai.parse_chat(CHAT)
    body = openai.completion_body(req, EVENTS, created=7)
    assert body["object"] == "chat.completion" and body["id"] == req.request_id and body["created"] == 7
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello", "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert body["x_served_by"] == "cpu" and body["system_fingerprint"] == "tierserve-cpu"
    done = openai.completion_body(openai.parse_completion({"model": "tiny:1", "prompt": "x"}), EVENTS)
    assert done["object"] == "text_completion" and done["id"].startswith("cmpl-") and done["model"] == "tiny:1"
    assert done["choices"][0]["text"] == "Hello" and "usage" in done


def _chunks(raw: list[bytes]) -> list:
    assert raw[-1] == openai.DONE
    assert all(b.startswith(b"data: ") and b.endswith(b"\n\n") for b in raw)
    return [json.loads(b[6:]) for b in raw[:-1]]


def test_a_chat_stream_sends_the_role_then_text_then_usage_only_when_asked() -> None:
    plain = _chunks(list(openai.stream(openai.parse_chat({**CHAT, "stream": True}), iter(EVENTS), created=1)))
    assert plain[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in plain[1:]] == [{"content": "Hel"}, {"content": "lo"}]  # no empty one
    assert plain[-1]["choices"][0]["finish_reason"] == "stop" and plain[-1]["x_served_by"] == "cpu"
    assert all("usage" not in c for c in plain)
    asked = _chunks(list(openai.stream(openai.parse_chat(
        {**CHAT, "stream": True, "stream_options": {"include_usage": True}}), iter(EVENTS), created=1)))
    assert all(c["usage"] is None for c in asked[:-1])
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["total_tokens"] == 7
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == asked[0]["id"] for c in asked)


def test_an_error_after_the_stream_started_is_an_error_event_then_done() -> None:
    def broken():
        yield EVENTS[0]
        raise TooManyRequestsError("gone")

    got = _chunks(list(openai.stream(openai.parse_completion({"model": "tiny", "prompt": "x", "stream": True}),
                                     broken())))
    assert got[0]["choices"][0]["text"] == "Hel" and got[0]["object"] == "text_completion"
    assert got[-1] == {"error": {"message": "gone", "type": "rate_limit_error", "param": None,
                                 "code": "rate_limit_exceeded"}}


def test_the_final_chunk_records_a_failover_and_names_the_tier_that_finished() -> None:
    from dataclasses import replace

    record = {"from": "gpu", "to": "cpu", "after_tokens": 1}
    events = [replace(EVENTS[0], served_by="gpu"), EVENTS[1],
              replace(EVENTS[2], served_by="cpu", extra={"failover": record})]
    chunks = _chunks(list(openai.stream(openai.parse_chat({**CHAT, "stream": True}), iter(events), created=1)))
    assert chunks[-1]["x_served_by"] == "cpu" and chunks[-1]["x_failover"] == record
    assert all("x_failover" not in c for c in chunks[:-1])
    body = openai.completion_body(openai.parse_completion({"model": "tiny", "prompt": "x"}), events)
    assert body["x_failover"] == record and body["x_served_by"] == "cpu"
    assert "x_failover" not in openai.completion_body(openai.parse_chat(CHAT), EVENTS)
