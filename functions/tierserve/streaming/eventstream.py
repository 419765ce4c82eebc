"""AWS event-stream framing (``application/vnd.amazon.eventstream``), as InvokeWithResponseStream uses it.

Why our own: the local Invoke endpoint must answer ``response-streaming-invocations`` with the frames boto3
parses (``PayloadChunk`` per chunk the function wrote, then ``InvokeComplete``), and tests must read such a
stream split anywhere. botocore ships a parser but no encoder, and the runtime must not import botocore's
internals. Stdlib only (``zlib.crc32``, ``struct``).

A message (every integer big-endian)::

    total length u32 | headers length u32 | prelude CRC32 (of the 8 bytes before it)
    headers          | payload            | message CRC32 (of every byte before it)

A header is ``name length u8 | name | type u8 | value``; the type Lambda's stream uses is 7 (a string:
``length u16 | UTF-8``). The decoder also reads the other types (bool, integers, bytes, timestamp, uuid).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

PRELUDE_BYTES = 12
CRC_BYTES = 4
#: botocore's limits: a message larger than these is refused by its parser, so by ours too.
MAX_HEADERS_BYTES = 128 * 1024
MAX_PAYLOAD_BYTES = 24 * 1024 * 1024

CONTENT_TYPE = "application/vnd.amazon.eventstream"
PAYLOAD_CHUNK = "PayloadChunk"
INVOKE_COMPLETE = "InvokeComplete"

_STRING = 7
_FIXED = {2: ">b", 3: ">h", 4: ">i", 5: ">q", 8: ">q"}  # byte, short, integer, long, timestamp (ms)


class EventStreamError(ValueError):
    """Bytes that are not a valid event-stream message: a CRC mismatch, a bad length, a bad header."""


@dataclass(frozen=True)
class Message:
    headers: dict[str, Any]
    payload: bytes

    @property
    def event_type(self) -> str | None:
        value = self.headers.get(":event-type")
        return value if isinstance(value, str) else None

    @property
    def message_type(self) -> str | None:
        value = self.headers.get(":message-type")
        return value if isinstance(value, str) else None


def _crc(data: bytes, start: int = 0) -> int:
    return zlib.crc32(data, start) & 0xFFFFFFFF


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """String headers (type 7), in the order given."""
    out = bytearray()
    for name, value in headers.items():
        raw_name, raw_value = name.encode("utf-8"), str(value).encode("utf-8")
        if not 0 < len(raw_name) < 256:
            raise EventStreamError(f"event-stream header name {name!r} must be 1-255 bytes")
        if len(raw_value) > 0xFFFF:
            raise EventStreamError(f"event-stream header {name!r} value is over 65535 bytes")
        out += struct.pack(">B", len(raw_name)) + raw_name
        out += struct.pack(">BH", _STRING, len(raw_value)) + raw_value
    return bytes(out)


def encode_message(headers: Mapping[str, str], payload: bytes = b"") -> bytes:
    """One complete message with both CRCs."""
    raw_headers = encode_headers(headers)
    if len(raw_headers) > MAX_HEADERS_BYTES:
        raise EventStreamError(f"event-stream headers of {len(raw_headers)} bytes exceed {MAX_HEADERS_BYTES}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise EventStreamError(f"event-stream payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}; "
                               "split it into several messages")
    total = PRELUDE_BYTES + len(raw_headers) + len(payload) + CRC_BYTES
    head = struct.pack(">II", total, len(raw_headers))
    prelude = head + struct.pack(">I", _crc(head))
    body = prelude + raw_headers + bytes(payload)
    return body + struct.pack(">I", _crc(body))


def event(event_type: str, payload: bytes, content_type: str) -> bytes:
    return encode_message({":event-type": event_type, ":content-type": content_type, ":message-type": "event"},
                          payload)


def payload_chunk(data: bytes) -> bytes:
    """A ``PayloadChunk`` event: the raw bytes the function wrote (boto3: ``{"PayloadChunk": {"Payload": ...}}``)."""
    return event(PAYLOAD_CHUNK, bytes(data), "application/octet-stream")


def payload_chunks(data: bytes, size: int = MAX_PAYLOAD_BYTES) -> Iterator[bytes]:
    """``data`` as one ``PayloadChunk`` per ``size`` bytes (a function may write more than one message holds)."""
    for start in range(0, len(data), size):
        yield payload_chunk(data[start:start + size])


def invoke_complete(error_code: str | None = None, error_details: str | None = None,
                    log_result: str | None = None) -> bytes:
    """The last event: ``InvokeComplete`` with ``ErrorCode`` / ``ErrorDetails`` when the function failed."""
    body = {k: v for k, v in (("ErrorCode", error_code), ("ErrorDetails", error_details),
                              ("LogResult", log_result)) if v is not None}
    return event(INVOKE_COMPLETE, json.dumps(body).encode(), "application/json")


def _decode_headers(data: bytes) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    i, n = 0, len(data)
    try:
        while i < n:
            name_len = data[i]
            name = data[i + 1:i + 1 + name_len].decode("utf-8")
            i += 1 + name_len
            kind = data[i]
            i += 1
            value: Any
            if kind in (0, 1):
                value = kind == 0
            elif kind in _FIXED:
                fmt = _FIXED[kind]
                size = struct.calcsize(fmt)
                (value,) = struct.unpack(fmt, data[i:i + size])
                i += size
            elif kind in (6, _STRING):
                (length,) = struct.unpack(">H", data[i:i + 2])
                raw = data[i + 2:i + 2 + length]
                if len(raw) != length:
                    raise EventStreamError("an event-stream header value runs past the headers")
                value = raw.decode("utf-8") if kind == _STRING else bytes(raw)
                i += 2 + length
            elif kind == 9:
                value = bytes(data[i:i + 16])
                i += 16
            else:
                raise EventStreamError(f"unknown event-stream header type {kind} for {name!r}")
            if i > n:
                raise EventStreamError("an event-stream header runs past the headers")
            if name in headers:
                raise EventStreamError(f"duplicate event-stream header {name!r}")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise EventStreamError(f"malformed event-stream headers: {exc}") from exc
    return headers


class Decoder:
    """An incremental decoder: :meth:`feed` any bytes (split anywhere), get the messages completed so far."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held for a message not yet complete (non-zero at the end of a stream: it was cut short)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= PRELUDE_BYTES:
            total, headers_len, prelude_crc = struct.unpack(">III", self._buf[:PRELUDE_BYTES])
            if _crc(bytes(self._buf[:8])) != prelude_crc:
                raise EventStreamError("event-stream prelude CRC mismatch: the stream is corrupt or not an "
                                       "event stream")
            if headers_len > MAX_HEADERS_BYTES or total < PRELUDE_BYTES + headers_len + CRC_BYTES \
                    or total - PRELUDE_BYTES - headers_len - CRC_BYTES > MAX_PAYLOAD_BYTES:
                raise EventStreamError(f"event-stream message lengths out of range (total {total}, "
                                       f"headers {headers_len})")
            if len(self._buf) < total:
                break
            frame = bytes(self._buf[:total])
            del self._buf[:total]
            (message_crc,) = struct.unpack(">I", frame[-CRC_BYTES:])
            if _crc(frame[:-CRC_BYTES]) != message_crc:
                raise EventStreamError("event-stream message CRC mismatch: the stream is corrupt")
            headers = _decode_headers(frame[PRELUDE_BYTES:PRELUDE_BYTES + headers_len])
            out.append(Message(headers, frame[PRELUDE_BYTES + headers_len:-CRC_BYTES]))
        return out


def decode_message(data: bytes) -> Message:
    """Exactly one message."""
    decoder = Decoder()
    messages = decoder.feed(data)
    if len(messages) != 1 or decoder.pending:
        raise EventStreamError(f"expected one whole event-stream message, got {len(messages)} and "
                               f"{decoder.pending} bytes left over")
    return messages[0]


def decode_stream(parts: Iterable[bytes]) -> Iterator[Message]:
    """Messages from a byte stream split anywhere; :class:`EventStreamError` when it ends mid-message."""
    decoder = Decoder()
    for part in parts:
        yield from decoder.feed(part)
    if decoder.pending:
        raise EventStreamError(f"the event stream ended inside a message ({decoder.pending} bytes left)")
