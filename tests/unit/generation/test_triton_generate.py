"""Triton's generate extension with the vLLM backend's names: parsing and answers."""

from __future__ import annotations

import json

import pytest

from tierserve.errors import InvalidParameterError
from tierserve.generation import triton_generate as tg
from tierserve.generation.events import GenerationEvent, Usage

EVENTS = [GenerationEvent(" wor", (1,)), GenerationEvent("ld", (2,), finish_reason="length", usage=Usage(2, 2))]


def test_parameters_and_sampling_parameters_parse() -> None:
    req = tg.parse({"text_input": "Hello", "parameters": {"temperature": 0, "max_tokens": 5, "stop": ["x"]},
                    "sampling_parameters": json.dumps({"top_p": 0.5, "seed": 3}), "exclude_input_in_output": True},
                   "tiny", "1", stream=False)
    p = req.params
    assert (req.prompt, p.temperature, p.max_tokens, p.stop, p.top_p, p.seed) == ("Hello", 0.0, 5, ("x",), 0.5, 3)
    assert req.echo_prompt is False and req.stream is False and req.kind == "triton"
    # vLLM's ignore_eos, which its Triton backend takes in sampling_parameters (issue 19)
    forced = tg.parse({"text_input": "Hello", "sampling_parameters": json.dumps({"ignore_eos": True})}, "tiny", None,
                      stream=True)
    assert forced.params.ignore_eos is True and req.params.ignore_eos is False


def test_the_answer_echoes_the_prompt_unless_excluded_as_vllm_does() -> None:
    req = tg.parse({"text_input": "Hello", "parameters": {"return_finish_reason": True,
                                                          "return_num_output_tokens": True}}, "tiny", "1", False)
    assert tg.answer(req, "1", EVENTS) == {"model_name": "tiny", "model_version": "1", "text_output": "Hello world",
                                           "finish_reason": "length", "num_output_tokens": 2}
    streamed = tg.parse({"text_input": "Hello"}, "tiny", None, stream=True)
    assert streamed.echo_prompt is False  # a stream never repeats the prompt
    raw = list(tg.stream(streamed, "1", iter(EVENTS)))
    assert [json.loads(b[6:]) for b in raw] == [
        {"model_name": "tiny", "model_version": "1", "text_output": " wor"},
        {"model_name": "tiny", "model_version": "1", "text_output": "ld"}]


@pytest.mark.parametrize(("body", "param"), [
    ({}, "text_input"),
    ({"text_input": 3}, "text_input"),
    ({"text_input": "x", "prompt": "y"}, "prompt"),
    ({"text_input": "x", "parameters": {"beam_width": 2}}, "parameters.beam_width"),
    ({"text_input": "x", "parameters": {"temperature": -1}}, "parameters.temperature"),
    ({"text_input": "x", "sampling_parameters": "{not json"}, "sampling_parameters"),
    ({"text_input": "x", "stream": "yes"}, "stream"),
])
def test_a_bad_generate_request_is_a_400_naming_the_field(body, param) -> None:
    with pytest.raises(InvalidParameterError) as err:
        tg.parse(body, "tiny", None, False)
    assert err.value.param == param


def test_an_error_in_the_stream_is_tritons_error_event() -> None:
    def broken():
        yield EVENTS[0]
        raise InvalidParameterError("bad")

    raw = list(tg.stream(tg.parse({"text_input": "x"}, "tiny", None, True), "1", broken()))
    assert json.loads(raw[-1][6:]) == {"error": "bad"}
