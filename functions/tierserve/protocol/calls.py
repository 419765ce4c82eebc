"""One inference as it travels between the tiers: the request (``InferenceCall``) and its ``Reply``.

Why both forms live in one object: each backend needs a different form of the same request.
The CPU function behind the router needs the client's body *as it came* (forwarded inside the
Invoke payload, never re-encoded); onnxruntime and Triton need numpy arrays; routing needs only
the header's names, shapes and sizes. ``InferenceCall`` keeps whichever form it was built from
and derives the others lazily, at most once, so a request forwarded to the CPU function is never
materialised by the router at all. ``Reply`` likewise carries either decoded outputs (onnxruntime,
Triton) or the CPU function's encoded HTTP response, which goes back to the client untouched.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from tierserve.protocol import header as wire
from tierserve.protocol.messages import InferRequest, InferResponse, RequestedOutput


@dataclass
class Body:
    """A protocol body, its header length, and how a Lambda event carries it.

    ``data`` is bytes, or a :class:`wire.Base64Body` that stays undecoded until a tensor is read.
    ``event_text`` is the body as API Gateway's event held it (JSON text, or base64 when
    ``is_base64``): forwarding it saves decoding and re-encoding megabytes."""

    data: wire.BodyBytes
    header_length: int | None = None
    event_text: str | None = None
    is_base64: bool = False

    @classmethod
    def from_event_text(cls, text: str, is_base64: bool, header_length: int | None) -> Body:
        """A body from a Lambda event's text; ValueError when base64 text has an impossible length."""
        data: wire.BodyBytes = wire.Base64Body(text) if is_base64 else text.encode("utf-8")
        return cls(data, header_length, text, is_base64)

    def as_event(self) -> tuple[str, bool]:
        """(text, is_base64) for a JSON event: the original text when known, else encoded once."""
        if self.event_text is None:
            raw = bytes(wire.body_view(self.data))
            if self.header_length is None:
                try:
                    self.event_text, self.is_base64 = raw.decode("utf-8"), False
                except UnicodeDecodeError:
                    self.event_text, self.is_base64 = base64.b64encode(raw).decode(), True
            else:
                self.event_text, self.is_base64 = base64.b64encode(raw).decode(), True
        return self.event_text, self.is_base64

    @property
    def event_bytes(self) -> int:
        """Bytes this body takes inside a JSON event (base64 grows binary bodies by 4/3)."""
        text, _ = self.as_event()
        return len(text)


class InferenceCall:
    """One inference request, from an HTTP body or from arrays; each form derived lazily, once."""

    def __init__(self, header: wire.Header | None = None, body: Body | None = None,
                 request: InferRequest | None = None) -> None:
        if header is None and request is None:
            raise ValueError("an InferenceCall needs a parsed header or a materialised request")
        self.header = header
        self._body = body
        self._request = request

    @classmethod
    def from_body(cls, body: Body) -> InferenceCall:
        """Parse the header only (:class:`InvalidRequestError` for a malformed one); tensors stay unread."""
        return cls(wire.parse_request(body.data, body.header_length), body)

    @classmethod
    def from_request(cls, request: InferRequest) -> InferenceCall:
        return cls(request=request)

    # --- what routing and validation read (never materialises) -----------------------------------------

    @property
    def _meta(self) -> wire.Header | InferRequest:
        meta = self.header if self.header is not None else self._request
        assert meta is not None
        return meta

    @property
    def inputs(self) -> list[Any]:
        """Name, datatype and shape of every input (headers or materialised tensors)."""
        meta = self._meta
        return meta.tensors if isinstance(meta, wire.Header) else list(meta.inputs)

    @property
    def outputs(self) -> list[RequestedOutput]:
        return self._meta.outputs

    @property
    def parameters(self) -> dict[str, Any]:
        return self._meta.parameters

    @property
    def id(self) -> str | None:
        return self._meta.id

    @property
    def rows(self) -> int:
        return self._meta.rows

    @property
    def tensor_bytes(self) -> int:
        meta = self._meta
        if isinstance(meta, wire.Header):
            return meta.tensor_bytes
        return sum(_nbytes(t) for t in meta.inputs)

    @property
    def target_hint(self) -> str | None:
        t = self.parameters.get("target")
        return str(t) if t is not None else None

    # --- the forms the backends need ------------------------------------------------------------------

    def request(self) -> InferRequest:
        """numpy tensors (binary data viewed in place); materialised on first use."""
        if self._request is None:
            from tierserve.protocol.tensors import request_from_header

            assert self.header is not None
            self._request = request_from_header(self.header)
        return self._request

    def body(self) -> Body:
        """The body to forward: the client's own, or this request encoded once with binary tensors."""
        if self._body is None:
            from tierserve.protocol.tensors import encode_request

            data, header_length = encode_request(self.request(), binary=True)
            self._body = Body(data, header_length)
        return self._body

    @property
    def materialized(self) -> bool:
        return self._request is not None


def _nbytes(tensor: Any) -> int:
    """A materialised tensor's bytes as the wire counts them (BYTES: 4-byte length + data per element)."""
    if tensor.datatype == "BYTES":
        return sum(4 + len(x) for x in tensor.data.ravel())
    return int(tensor.data.nbytes)


@dataclass
class Reply:
    """A backend's answer: decoded outputs, or an HTTP API response the CPU function already encoded."""

    response: InferResponse | None = None
    http: dict[str, Any] | None = None  # {"statusCode": 200, "headers", "body", "isBase64Encoded"}

    def decoded(self) -> InferResponse:
        """The outputs as numpy tensors (decoding the HTTP body when that is what came back)."""
        if self.response is None:
            from tierserve.protocol.tensors import decode_response

            assert self.http is not None
            headers = {k.lower(): v for k, v in (self.http.get("headers") or {}).items()}
            raw = self.http.get("body") or ""
            data = base64.b64decode(raw) if self.http.get("isBase64Encoded") else str(raw).encode("utf-8")
            length = headers.get("inference-header-content-length")
            self.response = decode_response(data, int(length) if length else None)
        return self.response

    def arrays(self) -> dict[str, Any]:
        return {t.name: t.data for t in self.decoded().outputs}
