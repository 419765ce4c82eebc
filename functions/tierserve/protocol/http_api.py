"""HTTP plumbing for API Gateway HTTP API (payload format 2.0) events.

Errors become HTTP status codes in one place, ``tierserve.protocol.rendering`` (``STATUS_BY_ERROR``, the one
error wrapper for every transport); every handler and the local API emulator go through
``error_response``, and no stack trace ever reaches a client.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

from tierserve import errors
from tierserve.protocol.header import Base64Body, BodyBytes
from tierserve.protocol.rendering import STATUS_BY_ERROR, render_error, status_for  # noqa: F401 - re-exported


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str] = field(default_factory=dict)
    request_id: str = ""
    #: The body as the event carried it (JSON text, or base64 when ``is_base64``): forwarded untouched.
    event_text: str | None = None
    is_base64: bool = False
    _body: BodyBytes | None = field(default=None, repr=False)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def body(self) -> BodyBytes:
        """The body's bytes as they came (a binary body stays base64 until a tensor is read).

        Built on first use, so that a request for an unknown model is a 404 before its body is looked
        at; a body flagged ``isBase64Encoded`` that cannot be base64 is a 400 here."""
        if self._body is None:
            raw = self.event_text or ""
            try:
                self._body = Base64Body(raw) if self.is_base64 else raw.encode("utf-8")
            except ValueError as exc:
                raise errors.InvalidRequestError(
                    f"body is flagged isBase64Encoded but is not valid base64: {exc}") from exc
        return self._body


def payload_too_large(size: int, limit: int) -> errors.PayloadTooLargeError:
    """The 413 for a body of ``size`` bytes over ``limit`` (the API, and the edge before it reads a body)."""
    return errors.PayloadTooLargeError(
        f"request body is {size} bytes; the limit is {limit} bytes. Split the batch into "
        "smaller requests, or use batch inference from S3 for large jobs"
    )


def parse_http_event(event: dict[str, Any], max_body_bytes: int) -> HttpRequest:
    """Parse an HTTP API v2 event. Oversized bodies are refused (413) before they are decoded."""
    if not isinstance(event, dict) or "requestContext" not in event:
        raise errors.InvalidRequestError(
            "event is not an API Gateway HTTP API (payload format 2.0) event; "
            "generate one with `sam local generate-event apigateway http-api-proxy`"
        )
    ctx = event.get("requestContext") or {}
    http = ctx.get("http") or {}
    method = str(http.get("method") or event.get("httpMethod") or "GET").upper()
    path = str(event.get("rawPath") or http.get("path") or "/")
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    raw = event.get("body") or ""
    is_b64 = bool(event.get("isBase64Encoded"))
    # Cheap size check first: never decode or parse a body over the limit.
    approx = math.ceil(len(raw) * 3 / 4) - raw[-2:].count("=") if is_b64 else len(raw)
    if not is_b64 and approx <= max_body_bytes and not raw.isascii():
        approx = len(raw.encode("utf-8"))
    if approx > max_body_bytes:
        raise payload_too_large(approx, max_body_bytes)
    query = {str(k): str(v) for k, v in (event.get("queryStringParameters") or {}).items()}
    return HttpRequest(method, path, headers, query, str(ctx.get("requestId") or ""), raw, is_b64)


# --- content codings (Content-Encoding / Accept-Encoding) ---------------------------------------------
#: Content codings the API decodes and can answer with; "deflate" is the zlib format (RFC 9110 8.4.1.2).
CODINGS = ("gzip", "deflate")
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decode_content(data: bytes | memoryview, encoding: str, limit: int) -> bytes:
    """The body with its content codings undone (listed in the order they were applied).

    Never inflates more than ``limit`` + 1 bytes: a body that would grow past ``limit`` (a
    decompression bomb, or just too big) is a 413 as soon as that is known. An unknown coding is a
    415; a corrupt or truncated stream a 400."""
    out = bytes(data)
    for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        wbits = _WBITS.get(coding)
        if wbits is None:
            raise errors.UnsupportedEncodingError(
                f"Content-Encoding {coding!r} is not supported; send the body as gzip, deflate or identity")
        out = _inflate(out, coding, wbits, limit)
    return out


def _inflate(data: bytes, coding: str, wbits: int, limit: int) -> bytes:
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(data, limit + 1)
        if len(out) > limit:
            raise errors.PayloadTooLargeError(
                f"the {coding} request body inflates to more than {limit} bytes, the limit; send smaller "
                "requests, or use batch inference from S3 for large jobs")
        if not d.eof:
            raise errors.InvalidRequestError(f"the {coding} request body is truncated (the stream does not end)")
        if d.unused_data:
            raise errors.InvalidRequestError(f"the {coding} request body has {len(d.unused_data)} bytes after "
                                             "its end")
        return out
    except zlib.error as exc:
        if coding == "deflate" and wbits > 0:  # some clients send raw deflate without the zlib wrapper
            return _inflate(data, coding, -zlib.MAX_WBITS, limit)
        raise errors.InvalidRequestError(f"the request body is not valid {coding} data: {exc}") from exc


def accepted_coding(accept_encoding: str | None) -> str | None:
    """The coding to answer with for an Accept-Encoding header: gzip or deflate by q-value, else None."""
    if not accept_encoding:
        return None
    q: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        weight = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                try:
                    weight = float(v)
                except ValueError:
                    weight = 0.0
        q[name.strip().lower()] = weight
    star = q.get("*", 0.0)
    best = max(CODINGS, key=lambda c: (q.get(c, star), -CODINGS.index(c)))
    return best if q.get(best, star) > 0 else None


#: Media types never compressed: an event stream must reach the client as each event is written, and a
#: compressor holds bytes back until it flushes.
NEVER_COMPRESSED = ("text/event-stream",)


def encode_content(resp: dict[str, Any], coding: str, level: int = 1) -> dict[str, Any]:
    """``resp`` with its body compressed as ``coding`` (level 1: the CPU time is the client's latency).

    An event stream, or a body that already has a content coding, comes back as it was."""
    headers_in = {k.lower(): v for k, v in (resp.get("headers") or {}).items()}
    media_type = headers_in.get("content-type", "").split(";")[0].strip().lower()
    if media_type in NEVER_COMPRESSED or headers_in.get("content-encoding", "identity").lower() != "identity":
        return resp
    raw = decode_body(resp)
    if coding == "gzip":
        c = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        payload = c.compress(raw) + c.flush()
    else:
        payload = zlib.compress(raw, level)
    headers = {**(resp.get("headers") or {}), "content-encoding": coding, "vary": "accept-encoding"}
    return {**resp, "headers": headers, "body": base64.b64encode(payload).decode(), "isBase64Encoded": True}


def response(
    status: int, body: bytes | str | dict[str, Any] | list[Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """An HTTP API v2 response; binary bodies are base64-encoded as API Gateway requires."""
    out_headers = {"content-type": "application/json"}
    if isinstance(body, (dict, list)):
        payload: bytes = json.dumps(body, separators=(",", ":")).encode()
    elif isinstance(body, str):
        payload = body.encode()
    else:
        payload = body
    out_headers.update(headers or {})
    binary = out_headers.get("content-type", "").startswith("application/octet-stream")
    return {
        "statusCode": status,
        "headers": out_headers,
        "body": base64.b64encode(payload).decode() if binary else payload.decode("utf-8"),
        "isBase64Encoded": binary,
    }


def error_response(exc: BaseException, headers: dict[str, str] | None = None, request_id: str = "") -> dict:
    """An exception as an HTTP response in the Open Inference Protocol's shape (``tierserve.protocol.rendering``, the
    one error wrapper: status, code, ``retry-after``, the tier that answered); no stack trace."""
    answer = render_error(exc, "oip", headers, request_id)
    return response(answer.status, answer.document, answer.headers)


def decode_body(resp: dict[str, Any]) -> bytes:
    """The raw body bytes of an HTTP API v2 response (used by clients of the handlers)."""
    body = resp.get("body") or ""
    return base64.b64decode(body) if resp.get("isBase64Encoded") else body.encode("utf-8")
