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

    def tiers(model, request, deadline, cancelled, local=None, tokenizer=None):
        # the cloud's dispatcher routes across the tiers (issue 18), given the in-process path and the tokenizer
        calls.append((model.name, request.prompt_ids is not None, request.params.max_tokens, callable(local),
                      tokenizer().decode([1]) == tokenizer().decode([1])))
        yield GenerationEvent("hi", (1,), finish_reason="stop", usage=Usage(1, 1), served_by="gpu")

    monkeypatch.setattr(type(genai_runtime.dispatcher), "generate_tiers", lambda self, *a, **kw: tiers(*a, **kw))
    gen = DataPlane(genai_runtime).generate(openai.parse_completion({"model": "tiny", "prompt": "x"}))
    assert gen.served_by == "gpu" and [e.text for e in gen] == ["hi"]
    assert calls == [("tiny", True, 16, True, True)]


def test_models_list_names_each_model_and_each_listed_version(genai_runtime) -> None:
    doc = DataPlane(genai_runtime).models_list().document
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["plain", "plain:1", "tiny", "tiny:1"]
    assert all(m["object"] == "model" and m["owned_by"] == "tierserve" and m["created"] > 0 for m in doc["data"])


# --- each generation counts for its model version, as an inference does (issue 18: rollouts) ----------------


def _emf(capsys, metric: str) -> list[dict]:
    import json

    return [d for d in map(json.loads, capsys.readouterr().out.splitlines()) if metric in d]


def test_each_generation_counts_as_a_request_of_its_version_so_a_rollout_can_judge_it(
        genai_runtime, runtime_env, monkeypatch, capsys) -> None:
    from tierserve.errors import BackendUnavailableError
    from tierserve.generation.events import GenerationEvent, Usage

    runtime_env.setenv("TIERSERVE_METRICS", "true")
    dp = DataPlane(genai_runtime)
    # a generation that ends: one request of tiny v1, no error, no Latency (a stream's length is not a latency)
    list(dp.generate(openai.parse_completion({"model": "tiny", "prompt": "x", "max_tokens": 3})))
    [doc] = _emf(capsys, "Generations")
    assert (doc["model"], doc["version"], doc["tier"]) == ("tiny", "1", "cpu")
    assert (doc["Requests"], doc["Errors"], doc["ClientErrors"], doc["Generations"]) == (1, 0, 0, 1)
    assert "Latency" not in doc
    dims = doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"]
    assert ["service", "function", "model", "version"] in dims and ["service", "function"] in dims
    # a prompt over the context window: refused before any work, a client error of that version
    with pytest.raises(InvalidRequestError):
        dp.generate(openai.parse_completion({"model": "tiny", "prompt": "x " * 400, "max_tokens": 3}))
    [doc] = _emf(capsys, "Generations")
    assert (doc["version"], doc["Requests"], doc["Errors"], doc["ClientErrors"]) == ("1", 1, 0, 1)

    # a stream that fails after its first event: a server error of that version
    def broken(model, request, deadline, cancelled, **_):
        yield GenerationEvent("hi", (1,), served_by="gpu")
        raise BackendUnavailableError("the tier went away")

    monkeypatch.setattr(genai_runtime.dispatcher, "generate_tiers", broken)
    gen = dp.generate(openai.parse_completion({"model": "tiny", "prompt": "x"}))
    with pytest.raises(BackendUnavailableError):
        list(gen)
    gen.close()
    [doc] = _emf(capsys, "Generations")
    assert (doc["tier"], doc["Requests"], doc["Errors"], doc["ClientErrors"]) == ("gpu", 1, 1, 0)

    # a client that goes away after the first event: counted once, not as the version's failure
    def endless(model, request, deadline, cancelled, **_):
        while True:
            yield GenerationEvent("a", (1,), served_by="cpu", usage=Usage(1, 1))

    monkeypatch.setattr(genai_runtime.dispatcher, "generate_tiers", endless)
    gen = dp.generate(openai.parse_completion({"model": "tiny", "prompt": "x"}))
    next(gen)
    gen.close()
    [doc] = _emf(capsys, "Generations")
    assert (doc["Requests"], doc["Errors"], doc["ClientErrors"]) == (1, 0, 0)
