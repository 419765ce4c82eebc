"""The GPU tier's generation stream: Triton's generate_stream events (vLLM backend outputs) read as GenerationEvents,
and SageMaker's InvokeEndpointWithResponseStream PayloadParts reassembled whatever their split."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from tierserve import errors
from tierserve.backends import generate_stream as gs
from tierserve.backends.sagemaker import SageMakerBackend
from tierserve.generation.requests import KIND_COMPLETION, GenerationRequest, SamplingParams
from tierserve.manifest import GenerationSpec, ModelVersion

REQUEST = GenerationRequest(model="m", version="1", kind=KIND_COMPLETION, prompt="hé", prompt_ids=(1, 5, 6),
                            params=SamplingParams(max_tokens=3, temperature=0.0, stop=("\n\n",)))


def _sse(text: str, ids: list[int], finish: str | None) -> bytes:
    obj = {"model_name": "m", "model_version": "1", "text_output": text, "finish_reason": str(finish),
           "logprobs": json.dumps([{str(t): {"logprob": None, "rank": None, "decoded_token": ""}} for t in ids])}
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


STREAM = _sse("", [200], None) + _sse("é ok", [201], None) + _sse("!", [2], "stop")


def test_the_request_body_asks_for_the_ids_and_the_finish_reason_with_sampling_parameters_as_json() -> None:
    body = gs.request_body(REQUEST, "hé")
    assert body["text_input"] == "hé" and body["stream"] is True and body["exclude_input_in_output"] is True
    assert body["return_logprobs"] is True and body["return_finish_reason"] is True
    assert json.loads(body["sampling_parameters"]) == {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0,
                                                       "top_k": -1, "logprobs": 0, "stop": ["\n\n"]}
    # vLLM's ignore_eos goes to the GPU tier as vLLM's own sampling parameter (issue 19), and only when asked
    forced = replace(REQUEST, params=replace(REQUEST.params, ignore_eos=True))
    assert json.loads(gs.request_body(forced, "hé")["sampling_parameters"])["ignore_eos"] is True


def test_events_carry_text_ids_finish_and_usage() -> None:
    out = list(gs.events(gs.sse_data([STREAM]), REQUEST, "m", started=0.0))
    assert [e.text for e in out] == ["", "é ok", "!"]
    assert [e.token_ids for e in out] == [(200,), (201,), (2,)]
    assert out[-1].finish_reason == "stop" and out[-1].usage is not None
    assert (out[-1].usage.prompt_tokens, out[-1].usage.completion_tokens) == (3, 3)
    assert all(e.served_by == "gpu" for e in out) and out[0].ttft_ms is not None


def test_a_stream_cut_before_its_last_event_is_a_tier_failure_not_a_truncation() -> None:
    cut = STREAM[:-10]
    it = gs.events(gs.sse_data([cut]), REQUEST, "m", started=0.0)
    assert next(it).token_ids == (200,)
    assert next(it).token_ids == (201,)
    with pytest.raises(errors.BackendUnavailableError, match="cut"):
        next(it)


def test_an_error_event_mid_stream_is_the_tiers_failure() -> None:
    data = _sse("a", [7], None) + b'data: {"error":"Error generating stream: CUDA error: device lost"}\n\n'
    it = gs.events(gs.sse_data([data]), REQUEST, "m", started=0.0)
    next(it)
    with pytest.raises(errors.InferenceError, match="device lost"):
        next(it)


@pytest.mark.parametrize(("status", "message", "kind"), [
    (400, "Error generating stream: sampling parameter(s) bogus are not implemented by x", errors.InvalidRequestError),
    (400, "Request for unknown model: 'm' is not found", errors.BackendUnavailableError),
    (500, "internal", errors.InferenceError),
    (503, "unavailable", errors.BackendUnavailableError),
])
def test_a_status_before_the_stream_maps_4xx_to_the_input_and_the_rest_to_the_tier(status, message, kind) -> None:
    assert isinstance(gs.error_for_status(status, message, "m"), kind)


class _Tokenizer:
    """A tokenizer that adds a BOS (1) and maps each character to its code point + 10."""

    class _Enc:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def encode(self, text: str, add_special_tokens: bool = True) -> _Enc:
        return self._Enc(([1] if add_special_tokens else []) + [ord(c) + 10 for c in text])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i - 10) for i in ids if i != 1)


def test_prompt_text_gives_the_text_vllm_tokenizes_back_to_the_same_ids() -> None:
    tok = _Tokenizer()
    ids = tok.encode("hi there").ids
    assert gs.prompt_text(tok, ids) == "hi there"
    with pytest.raises(errors.InvalidRequestError, match="x-target: cpu"):
        gs.prompt_text(tok, [ord("h") + 10])  # no BOS: vLLM would add one


# --- SageMaker: InvokeEndpointWithResponseStream ---------------------------------------------------------


class _StreamClient:
    def __init__(self, parts: list[dict[str, Any]]) -> None:
        self.parts = parts
        self.calls: list[dict[str, Any]] = []

    def invoke_endpoint_with_response_stream(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        return {"Body": iter(self.parts), "ContentType": "text/event-stream"}


def _model() -> ModelVersion:
    return ModelVersion(name="m", version="1", inputs=(), outputs=(), max_batch_size=0, variants={},
                        selected_variant="", targets=("cpu", "gpu"), task="text-generation",
                        generation=GenerationSpec(context_length=64, eos_token_ids=(2,)))


def _generate(parts: list[bytes]) -> list[Any]:
    client = _StreamClient([{"PayloadPart": {"Bytes": p}} for p in parts])
    backend = SageMakerBackend("ep", client=client)
    out = list(backend.generate(_model(), REQUEST))
    body = json.loads(client.calls[0]["Body"])
    assert body["text_input"] == "hé" and client.calls[0]["EndpointName"] == "ep"
    return [(e.text, e.token_ids, e.finish_reason, e.usage) for e in out]  # timings aside


def test_sagemaker_events_split_at_every_byte_boundary_parse_the_same() -> None:
    whole = _generate([STREAM])
    for cut in range(1, len(STREAM)):
        assert _generate([STREAM[:cut], STREAM[cut:]]) == whole, cut
    assert _generate([STREAM[i:i + 1] for i in range(len(STREAM))]) == whole
    assert "".join(e[0] for e in whole) == "é ok!"


def test_sagemaker_model_stream_error_mid_stream_is_a_tier_failure() -> None:
    client = _StreamClient([{"PayloadPart": {"Bytes": _sse("a", [7], None)}},
                            {"ModelStreamError": {"Message": "container died", "ErrorCode": "x"}}])
    it = SageMakerBackend("ep", client=client).generate(_model(), REQUEST)
    assert next(it).token_ids == (7,)
    with pytest.raises(errors.InferenceError, match="container died"):
        next(it)


def test_sagemaker_container_400_before_the_stream_is_an_input_error() -> None:
    from botocore.exceptions import ClientError

    class _Refusing:
        def invoke_endpoint_with_response_stream(self, **kwargs: Any) -> Any:
            raise ClientError({"Error": {"Code": "ModelError", "Message": "Received client error (400)"},
                               "OriginalStatusCode": 400,
                               "OriginalMessage": 'data: {"error":"Error generating stream: n must be 1"}'},
                              "InvokeEndpointWithResponseStream")

    with pytest.raises(errors.InvalidRequestError, match="n must be 1"):
        next(SageMakerBackend("ep", client=_Refusing()).generate(_model(), REQUEST))
