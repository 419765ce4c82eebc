"""CpuInferenceFunction's Invoke payload: the contract between the router's Lambda backend and the CPU function.

Why a module of its own: the router builds it (``tierserve.backends.lambda_invoke``) and the CPU
function reads it (``tierserve.direct``). When the backend imported it from ``direct``, an entry module,
the runtime had an import cycle (``app`` -> ``backends.lambda_invoke`` -> ``direct`` -> ``inference`` ->
``app``); both sides now import this small module, which imports no entry module.

The payload carries the client's body exactly as API Gateway handed it to the router, so nothing
is decoded and re-encoded on the way (events/cpu_direct_infer.json is an example)::

    {"model_name": "digits", "model_version": "1",
     "headers": {"content-type": "application/json", "inference-header-content-length": "..."},
     "body": "<the JSON text, or base64 of a binary body>", "isBase64Encoded": false}

A readiness question is ``{"model_name": ..., "model_version": ..., "ready": true}`` (no body).
"""

from __future__ import annotations

from typing import Any

from tierserve.manifest import ModelVersion
from tierserve.protocol.calls import InferenceCall

#: The headers of the client's request that the CPU function needs to read its body.
FORWARDED_HEADERS = ("content-type", "inference-header-content-length")
#: What a payload must look like, for the error that refuses one that does not.
SHAPE = ("CpuInferenceFunction expects {'model_name', 'model_version'?, 'body', 'isBase64Encoded'?, "
         "'headers'?}; see events/cpu_direct_infer.json")


def payload(model: ModelVersion, call: InferenceCall) -> dict[str, Any]:
    """The Invoke payload for ``call`` on ``model``: the client's body as it came, when there is one."""
    body = call.body()
    text, is_base64 = body.as_event()
    headers = {"content-type": "application/octet-stream" if is_base64 else "application/json"}
    if body.header_length is not None:
        headers["inference-header-content-length"] = str(body.header_length)
    return {"model_name": model.name, "model_version": model.version, "headers": headers,
            "body": text, "isBase64Encoded": is_base64}


def readiness_payload(model: ModelVersion) -> dict[str, Any]:
    """The Invoke payload that asks whether ``model`` loads and runs there (no inference body)."""
    return {"model_name": model.name, "model_version": model.version, "ready": True}


def is_readiness(event: Any) -> bool:
    """Whether an Invoke event is a readiness question rather than an inference."""
    return isinstance(event, dict) and event.get("ready") is True and "model_name" in event
