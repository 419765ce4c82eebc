"""DataPlane.generate and DataPlane.models_list (tierserve.protocol.dataplane), on a real store and engine."""

from __future__ import annotations

import pytest

from tierserve.errors import InvalidRequestError, ModelNotFoundError, TooManyRequestsError
from tierserve.generation import openai
from tierserve.protocol.dataplane import DataPlane


def test_generate_resolves_prepares_and_streams_locally(genai_runtime) -> None:
    dp = DataPlane(genai_runtime)
    gen = dp.generate(openai.parse_chat({"model": "tiny:1", "messages": [{"role": "user", "content": "Hi"}],
                                         "temperature": 0, "max_tokens": 8}))
    assert (gen.model.name, gen.model.version, gen.served_by) == ("tiny", "1", "cpu")
    body = openai.completion_body(gen.request, gen)
    assert body["usage"]["prompt_tokens"] == len(gen.request.prompt_ids)
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"
    # the stream and the non-streamed answer say the same
    again = dp.generate(openai.parse_chat({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                           "temperature": 0, "max_tokens": 8, "stream": True}))
    streamed = "".join(e.text for e in again)
    assert streamed == body["choices"][0]["message"]["content"]


def test_errors_before_the_first_event_are_raised_by_generate(genai_runtime) -> None:
    dp = DataPlane(genai_runtime)
    with pytest.raises(ModelNotFoundError):
        dp.generate(openai.parse_completion({"model": "nope", "prompt": "x"}))
    from dataclasses import replace

    genai_runtime.settings = replace(genai_runtime.settings, generation_max_concurrency=1)
    held = dp.generate(openai.parse_completion({"model": "tiny", "prompt": "x"}))
    with pytest.raises(TooManyRequestsError):
        dp.generate(openai.parse_completion({"model": "tiny", "prompt": "x"}))
    held.close()


def test_a_model_that_is_not_generative_is_a_400(genai_runtime, tmp_path) -> None:
    from tests.support.models import write_digits

    write_digits(genai_runtime.store.root)
    genai_runtime.store.refresh()
    with pytest.raises(InvalidRequestError, match="not a text-generation model; use /v2/models/digits/infer"):
        DataPlane(genai_runtime).generate(openai.parse_completion({"model": "digits", "prompt": "x"}))


def test_the_dispatchers_generation_backend_is_used_when_it_has_one(genai_runtime, monkeypatch) -> None:
    from tierserve.generation.events import GenerationEvent, Usage

    calls = []

    def remote(model, request, deadline, cancelled):
        calls.append((model.name, request.prompt_ids is not None, request.params.max_tokens))
        yield GenerationEvent("hi", (1,), finish_reason="stop", usage=Usage(1, 1), served_by="gpu")

    monkeypatch.setattr(type(genai_runtime.dispatcher), "generate", property(lambda self: remote))
    gen = DataPlane(genai_runtime).generate(openai.parse_completion({"model": "tiny", "prompt": "x"}))
    assert gen.served_by == "gpu" and [e.text for e in gen] == ["hi"]
    assert calls == [("tiny", True, 16)]


def test_models_list_names_each_model_and_each_listed_version(genai_runtime) -> None:
    doc = DataPlane(genai_runtime).models_list().document
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["plain", "plain:1", "tiny", "tiny:1"]
    assert all(m["object"] == "model" and m["owned_by"] == "tierserve" and m["created"] > 0 for m in doc["data"])
