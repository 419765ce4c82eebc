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
