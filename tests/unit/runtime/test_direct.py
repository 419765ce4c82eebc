"""CpuInferenceFunction's entry (tierserve.direct.handle_direct) on a real store and onnxruntime.

tests/functional/test_router_handler.py drives events/cpu_direct_infer.json (a JSON body) and a payload
of the wrong shape through the Lambda handler; here: binary bodies, the pinned version, and how each
kind of bad payload is answered (never raised).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.fakes import json_body, rows_of, write_linear
from tierserve.direct import handle_direct
from tierserve.invoke_payload import payload
from tierserve.manifest import Manifest, ModelVersion
from tierserve.protocol.calls import Body, InferenceCall
from tierserve.protocol.http_api import decode_body
from tierserve.protocol.messages import InferRequest
from tierserve.protocol.tensors import decode_response, encode_request, tensor_from_numpy


@pytest.fixture
def store(runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    runtime_env.setenv("MODEL_STORE_URI", str(tmp_path / "store"))
    return tmp_path / "store"


def json_event(model: ModelVersion | str, version: str | None = "1", x: np.ndarray | None = None) -> dict:
    name = model if isinstance(model, str) else model.name
    return {"model_name": name, "model_version": version, "headers": {"content-type": "application/json"},
            "body": json_body(rows_of(2) if x is None else x).decode(), "isBase64Encoded": False}


def error_of(resp: dict) -> tuple[int, str, str]:
    return resp["statusCode"], json.loads(decode_body(resp))["code"], resp["headers"]["x-served-by"]


def test_a_binary_body_is_served_and_answered_in_binary_when_asked(store: Path) -> None:
    # Given the router's payload for a binary request that asks for binary outputs
    mv, w, b = write_linear(store)
    x = rows_of(3, seed=9)
    request = InferRequest([tensor_from_numpy("x", x)], id="d-1", parameters={"binary_data_output": True})
    data, header_length = encode_request(request, binary=True)
    event = payload(mv, InferenceCall.from_body(Body(data, header_length)))
    # When the CPU function serves it
    resp = handle_direct(event)
    # Then the answer is binary, base64 in the response, and holds y = x @ W + b
    assert (resp["statusCode"], resp["isBase64Encoded"], resp["headers"]["x-served-by"]) == (200, True, "cpu")
    out = decode_response(decode_body(resp), int(resp["headers"]["inference-header-content-length"]))
    assert out.id == "d-1"
    np.testing.assert_allclose(out.outputs[0].data, x @ w + b, rtol=1e-5, atol=1e-5)


def test_the_version_the_router_pinned_is_served_even_under_a_full_canary(store: Path) -> None:
    # Given versions 1 and 2 of a model, with a canary sending every unpinned request to version 2
    _, w1, b1 = write_linear(store, version="1", seed=1)
    _, w2, b2 = write_linear(store, version="2", seed=2)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["models"]["lin"].update(default_version="1", canary={"version": "2", "percent": 100})
    (store / "manifest.json").write_text(Manifest.from_json(manifest).dumps())
    x = rows_of(2, seed=3)
    # When the router pins version 1, and when it pins none
    pinned, unpinned = handle_direct(json_event("lin", "1", x)), handle_direct(json_event("lin", None, x))
    # Then the pinned request runs version 1 (the router's canary pick stands), the other the canary
    for resp, (w, b), version in ((pinned, (w1, b1), "1"), (unpinned, (w2, b2), "2")):
        body = json.loads(decode_body(resp))
        assert body["model_version"] == version
        np.testing.assert_allclose(np.reshape(body["outputs"][0]["data"], (2, 3)), x @ w + b, rtol=1e-5, atol=1e-5)


def test_a_body_flagged_base64_that_is_not_base64_is_a_400(store: Path) -> None:
    # Given a payload whose body claims to be base64 but is not
    mv, _, _ = write_linear(store)
    event = {**json_event(mv), "isBase64Encoded": True, "body": "{not base64}"}
    # When the CPU function serves it
    resp = handle_direct(event)
    # Then it is a 400 that says what was wrong
    assert error_of(resp) == (400, "invalid_request", "cpu")
    assert "not valid base64" in json.loads(decode_body(resp))["error"]


def test_an_oversized_body_is_a_413_before_it_is_decoded(store: Path, runtime_env: pytest.MonkeyPatch) -> None:
    # Given a payload limit smaller than the body (sent as base64, as binary bodies are)
    mv, _, _ = write_linear(store)
    runtime_env.setenv("MAX_PAYLOAD_BYTES", "100")
    event = {**json_event(mv), "isBase64Encoded": True, "body": base64.b64encode(b"\xff" * 300).decode()}
    # When the CPU function serves it
    resp = handle_direct(event)
    # Then it is refused for its size, not for the bytes it holds
    assert error_of(resp) == (413, "payload_too_large", "cpu")
    assert "limit is 100 bytes" in json.loads(decode_body(resp))["error"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"model_name": "nope"}, (404, "model_not_found", "cpu")),
     ({"headers": ["content-type"]}, (500, "internal_error", "cpu"))],
    ids=["unknown-model", "headers-not-an-object"],
)
def test_a_bad_payload_is_answered_with_an_error_response_never_raised(store: Path, change: dict,
                                                                       expected: tuple[int, str, str]) -> None:
    # Given a payload naming a model the store lacks, or one the function did not expect at all
    mv, _, _ = write_linear(store)
    # When the CPU function serves it
    resp = handle_direct({**json_event(mv), **change})
    # Then the error is an HTTP response with the protocol's error body, and no stack trace
    assert error_of(resp) == expected
    assert "Traceback" not in resp["body"]


def test_a_version_published_after_this_function_read_its_manifest_is_served_at_once(store: Path,
                                                                                      runtime_env) -> None:
    # Given a CPU function whose manifest (cached for a minute) predates version 2
    runtime_env.setenv("MANIFEST_TTL_S", "60")
    write_linear(store, version="1", seed=1)
    assert handle_direct(json_event("lin", "1"))["statusCode"] == 200
    write_linear(store, version="2", seed=2)
    # When the router, which has already seen version 2, pins a request to it
    resp = handle_direct(json_event("lin", "2", rows_of(2, seed=4)))
    # Then the function re-reads the manifest and serves it (a request in flight is never broken)
    body = json.loads(decode_body(resp))
    assert resp["statusCode"] == 200 and body["model_version"] == "2"


# --- a generation over a streamed Invoke (issue 17) ----------------------------------------------------------


class FakeGeneration:
    """What DataPlane.generate returns (started: a refusal is raised by the call), over scripted events."""

    def __init__(self, events, fail_after: BaseException | None = None) -> None:
        self.events, self.fail_after, self.closed = list(events), fail_after, False

    def __iter__(self):
        yield from self.events
        if self.fail_after is not None:
            raise self.fail_after

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_plane(runtime_env: pytest.MonkeyPatch, tmp_path: Path):
    """DataPlane.generate replaced by a script: ``calls`` records (request, cancelled); ``answer`` is what
    it returns or raises."""
    from tierserve.protocol import dataplane

    runtime_env.setenv("MODEL_STORE_URI", str(tmp_path / "store"))
    runtime_env.setenv("TIERSERVE_STREAMING_RUNTIME", "1")
    state: dict = {"calls": [], "answer": None}

    def generate(self, request, cancelled=lambda: False, context=None):
        state["calls"].append((request, cancelled))
        if isinstance(state["answer"], BaseException):
            raise state["answer"]
        return state["answer"]

    runtime_env.setattr(dataplane.DataPlane, "generate", generate, raising=False)
    return state


def _generate_event() -> dict:
    from tierserve.generation.requests import KIND_CHAT, GenerationRequest, SamplingParams

    request = GenerationRequest("tiny", "2", KIND_CHAT, SamplingParams(max_tokens=4, temperature=0.0),
                                messages=({"role": "user", "content": "hi"},), request_id="r-1")
    return {"generate": request.to_json()}


def test_a_generation_is_streamed_as_one_json_line_per_event_and_close_cancels_it(fake_plane) -> None:
    from tierserve.generation.events import GenerationEvent, Usage
    from tierserve.streaming.response import StreamingResponse

    # Given a generation of two events
    events = [GenerationEvent("Hé", (7, 8), served_by="cpu", ttft_ms=3.0),
              GenerationEvent("!", (9,), "stop", Usage(5, 3), "cpu", tokens_per_s=99.0)]
    fake_plane["answer"] = generation = FakeGeneration(events)
    # When the CPU function gets {"generate": ...}
    resp = handle_direct(_generate_event())
    # Then the request reached the data plane whole, and the answer is an NDJSON stream
    request, cancelled = fake_plane["calls"][0]
    assert (request.model, request.version, request.messages, request.params.max_tokens) == (
        "tiny", "2", ({"role": "user", "content": "hi"},), 4)
    assert isinstance(resp, StreamingResponse)
    assert resp.status == 200 and resp.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in b"".join(resp.chunks).splitlines()]
    assert [GenerationEvent.from_json(line) for line in lines] == events
    # And closing it (the runtime loop does, at the end or when abandoned) cancels the generation
    assert not cancelled()
    resp.release()
    assert cancelled() and generation.closed


@pytest.mark.parametrize(("error", "status", "code", "retry"), [
    ("too_many", 429, "rate_limit_exceeded", "2"),
    ("not_found", 404, "model_not_found", None),
    ("too_long", 400, "context_length_exceeded", None),
])
def test_a_generation_refused_before_its_first_event_is_a_buffered_answer_with_its_status(
        fake_plane, error: str, status: int, code: str, retry: str | None) -> None:
    from tierserve import errors

    exc = {"too_many": errors.TooManyRequestsError("at its cap", retry_after_s=1.5),
           "not_found": errors.ModelNotFoundError("model 'tiny' not found"),
           "too_long": errors.ContextLengthExceededError("over the context window")}[error]
    if error == "too_many":
        exc.code = code
    fake_plane["answer"] = exc
    resp = handle_direct(_generate_event())
    assert isinstance(resp, dict) and resp["statusCode"] == status
    body = json.loads(resp["body"])
    assert body["error"]["code"] == code and set(body["error"]) == {"message", "type", "param", "code"}
    assert resp["headers"].get("retry-after") == retry


def test_an_error_after_the_first_event_is_one_error_line_then_the_end(fake_plane) -> None:
    from tierserve import errors
    from tierserve.generation.events import GenerationEvent

    fake_plane["answer"] = FakeGeneration([GenerationEvent("a", (1,))], errors.InferenceError("the engine broke"))
    resp = handle_direct(_generate_event())
    lines = [json.loads(line) for line in b"".join(resp.chunks).splitlines()]
    assert lines[0]["text"] == "a"
    assert lines[1] == {"error": {"status": 500, "code": "inference_error", "message": "the engine broke"}}
    assert len(lines) == 2


def test_a_generation_outside_the_streaming_runtime_or_malformed_is_a_clear_400(fake_plane, runtime_env) -> None:
    resp = handle_direct({"generate": {"model": "tiny"}})  # no "kind"
    assert resp["statusCode"] == 400 and "GenerationRequest.to_json()" in json.loads(resp["body"])["error"]["message"]
    runtime_env.delenv("TIERSERVE_STREAMING_RUNTIME")
    resp = handle_direct(_generate_event())
    message = json.loads(resp["body"])["error"]["message"]
    assert resp["statusCode"] == 400 and "AWS_LAMBDA_EXEC_WRAPPER=/var/task/tierserve/streaming/wrapper.sh" in message
    assert fake_plane["calls"] == []
