"""OpenAI's ``POST /v1/embeddings`` over the embedding models tierserve already serves (MiniLM-shaped encoders).

Why its own module: an embedding model is an ordinary inference model (one forward pass through
``DataPlane.infer``), but OpenAI's clients speak another shape: ``{"model", "input", "encoding_format"}`` in,
``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}`` out. This
module maps one onto the other, and says clearly what cannot be mapped.

Which models: those whose inputs are token ids (an integer ``[batch, sequence]`` input, e.g. MiniLM's
``input_ids``), with optionally an attention mask (an input named ``*mask*``: ones over each text's ids, zeros
over the padding) and token type ids (``*type*``: zeros), and with one float ``[batch, dim]`` output (MiniLM's
``sentence_embedding``; when there are several, the one named ``*embedding*``, else the first).

Input: the compiled models carry no tokenizer, so ``input`` must be token ids, as OpenAI allows: a list of ids
(one text) or a list of such lists (several, padded here to the longest). Text is a 400 that says so. Answer:
``encoding_format`` ``float`` (lists of floats) or ``base64`` (little-endian float32, what the ``openai`` SDK asks
for by default and decodes); ``dimensions`` is refused (400) unless it equals the model's size.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any

from tierserve import errors
from tierserve.manifest import ModelVersion, TensorSpec
from tierserve.protocol.http_api import decode_body

_INTEGER = {"INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8"}
_FLOAT = {"FP32", "FP16", "FP64", "BF16"}
_HARMLESS = {"user"}


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    version: str | None
    label: str
    inputs: tuple[tuple[int, ...], ...]
    encoding_format: str = "float"
    dimensions: int | None = None


def _bad(message: str, param: str | None, code: str = "invalid_value") -> errors.InvalidParameterError:
    return errors.InvalidParameterError(message, param=param, code=code)


def parse(body: Any) -> EmbeddingRequest:
    """A ``/v1/embeddings`` body -> an EmbeddingRequest (400s name the parameter)."""
    from tierserve.generation.openai import split_model

    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object with model and input", None, "invalid_type")
    for key, value in body.items():
        if value is not None and key not in {"model", "input", "encoding_format", "dimensions"} | _HARMLESS:
            raise _bad(f"unrecognized request argument supplied: {key} (not a parameter of /v1/embeddings)", key,
                       "unknown_parameter")
    label = body.get("model")
    name, version = split_model(label)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad(f"encoding_format must be float or base64, got {json.dumps(fmt)}", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise _bad(f"dimensions must be a positive integer, got {json.dumps(dims)}", "dimensions", "invalid_type")
    return EmbeddingRequest(name, version, str(label), _token_lists(body.get("input")), fmt, dims)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _token_lists(value: Any) -> tuple[tuple[int, ...], ...]:
    if value is None:
        raise _bad("input is required: token ids (a list of ints, or a list of such lists)", "input",
                   "missing_required_parameter")
    texts = isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value))
    if texts:
        raise _bad("input is text, but this server's embedding models ship no tokenizer: send input as token ids "
                   "(a list of ints for one text, or a list of lists), tokenized with the model's own tokenizer "
                   "(for MiniLM, transformers' AutoTokenizer of sentence-transformers/all-MiniLM-L6-v2)", "input",
                   "tokenizer_required")
    if _is_ids(value):
        return (tuple(value),)
    if isinstance(value, list) and value and all(_is_ids(v) for v in value):
        return tuple(tuple(v) for v in value)
    raise _bad("input must be token ids: a non-empty list of ints, or a non-empty list of non-empty lists of ints",
               "input", "invalid_type")


def _roles(model: ModelVersion) -> tuple[TensorSpec, TensorSpec | None, TensorSpec | None, TensorSpec]:
    """(the ids input, the mask input or None, the token-type input or None, the embedding output)."""
    ids = mask = types = None
    for spec in model.inputs:
        lowered = spec.name.lower()
        if spec.datatype not in _INTEGER or len(spec.shape) != 2:
            break
        if "mask" in lowered and mask is None:
            mask = spec
        elif "type" in lowered and types is None:
            types = spec
        elif ids is None:
            ids = spec
        else:
            break
    else:
        if ids is not None:
            outputs = [s for s in model.outputs if s.datatype in _FLOAT and len(s.shape) == 2]
            named = [s for s in outputs if "embedding" in s.name.lower()]
            if outputs:
                return ids, mask, types, (named or outputs)[0]
    raise errors.InvalidParameterError(
        f"model {model.name!r} is not an embedding model this route can serve (it needs token ids as an integer "
        "[batch, sequence] input, optionally an attention mask and token type ids, and a float [batch, dim] "
        f"output); use /v2/models/{model.name}/infer", param="model", code="model_not_embedding")


def infer_body(model: ModelVersion, request: EmbeddingRequest) -> tuple[bytes, str]:
    """(the Open Inference Protocol JSON body for ``request``, the output to read)."""
    ids, mask, types, output = _roles(model)
    width = max(len(t) for t in request.inputs)
    rows = [list(t) + [0] * (width - len(t)) for t in request.inputs]
    shape = [len(rows), width]
    tensors = [{"name": ids.name, "datatype": ids.datatype, "shape": shape, "data": rows}]
    if mask is not None:
        tensors.append({"name": mask.name, "datatype": mask.datatype, "shape": shape,
                        "data": [[1] * len(t) + [0] * (width - len(t)) for t in request.inputs]})
    if types is not None:
        tensors.append({"name": types.name, "datatype": types.datatype, "shape": shape,
                        "data": [[0] * width for _ in rows]})
    document = {"inputs": tensors, "outputs": [{"name": output.name}]}
    return json.dumps(document, separators=(",", ":")).encode(), output.name


def answer(request: EmbeddingRequest, model: ModelVersion, reply: dict[str, Any], output: str) -> dict[str, Any]:
    """OpenAI's embeddings answer from the inference reply (an HTTP API response with a JSON body)."""
    document = json.loads(decode_body(reply))
    tensor = next((o for o in document.get("outputs") or () if o.get("name") == output), None)
    if tensor is None:
        raise errors.InferenceError(f"model {model.name!r} answered without its {output!r} output")
    rows, dim = int(tensor["shape"][0]), int(tensor["shape"][-1])
    if request.dimensions is not None and request.dimensions != dim:
        raise _bad(f"dimensions {request.dimensions} is not supported by {model.name!r}: its embeddings have {dim} "
                   "dimensions (leave dimensions out)", "dimensions", "unsupported_value")
    flat = [float(x) for x in _flatten(tensor["data"])]
    data = []
    for i in range(rows):
        vector = flat[i * dim:(i + 1) * dim]
        value: Any = vector if request.encoding_format == "float" else base64.b64encode(
            struct.pack(f"<{dim}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(t) for t in request.inputs)
    return {"object": "list", "data": data, "model": request.label,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [x for row in data for x in _flatten(row)]
    return list(data)
