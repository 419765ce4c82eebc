"""Event-stream framing against botocore's own parser (botocore.eventstream), which is what boto3's
invoke_with_response_stream runs on the bytes the local Invoke endpoint sends."""

from __future__ import annotations

import json

import botocore.session
import pytest
from botocore.eventstream import EventStreamBuffer
from botocore.parsers import EventStreamJSONParser

from tierserve.streaming import eventstream
from tierserve.streaming.eventstream import Decoder, EventStreamError


def _stream() -> bytes:
    return (eventstream.payload_chunk(b'{"text": "h\xc3') + eventstream.payload_chunk(b'\xa9llo"}\n')
            + eventstream.payload_chunk(b"") + eventstream.invoke_complete("Unhandled", "boom", "bG9n"))


def _botocore_messages(parts: list[bytes]) -> list:
    buffer = EventStreamBuffer()
    out = []
    for part in parts:
        buffer.add_data(part)
        out.extend(buffer)
    return out


def test_botocore_decodes_what_we_encode_split_at_every_byte_boundary() -> None:
    data = _stream()
    whole = [(m.headers, m.payload) for m in _botocore_messages([data])]
    assert [h[":event-type"] for h, _ in whole] == ["PayloadChunk"] * 3 + ["InvokeComplete"]
    assert whole[0][0] == {":event-type": "PayloadChunk", ":content-type": "application/octet-stream",
                           ":message-type": "event"}
    assert json.loads(whole[3][1]) == {"ErrorCode": "Unhandled", "ErrorDetails": "boom", "LogResult": "bG9n"}
    for cut in range(1, len(data)):
        # botocore's buffer and our decoder, fed the stream in two parts split at `cut`
        assert [(m.headers, m.payload) for m in _botocore_messages([data[:cut], data[cut:]])] == whole
        decoder = Decoder()
        ours = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert [(m.headers, m.payload) for m in ours] == whole and decoder.pending == 0


def test_our_decoder_reads_a_stream_fed_one_byte_at_a_time() -> None:
    data = _stream()
    decoder = Decoder()
    messages = [m for i in range(len(data)) for m in decoder.feed(data[i:i + 1])]
    assert b"".join(m.payload for m in messages if m.event_type == "PayloadChunk").decode() == '{"text": "héllo"}\n'
    assert messages[-1].event_type == "InvokeComplete" and messages[-1].message_type == "event"


def test_boto3s_parser_turns_the_frames_into_payload_chunk_and_invoke_complete_events() -> None:
    # botocore's EventStream parses each message with the Lambda model's InvokeWithResponseStream output shape
    model = botocore.session.get_session().get_service_model("lambda")
    shape = model.operation_model("InvokeWithResponseStream").output_shape.members["EventStream"]
    parser = EventStreamJSONParser()
    parsed = [parser.parse(m.to_response_dict(), shape) for m in _botocore_messages([_stream()])]
    assert parsed[0] == {"PayloadChunk": {"Payload": b'{"text": "h\xc3'}}
    assert parsed[3] == {"InvokeComplete": {"ErrorCode": "Unhandled", "ErrorDetails": "boom", "LogResult": "bG9n"}}
    ok = parser.parse(_botocore_messages([eventstream.invoke_complete()])[0].to_response_dict(), shape)
    assert ok == {"InvokeComplete": {}}


def test_a_corrupt_byte_is_refused_by_a_crc() -> None:
    frame = bytearray(eventstream.payload_chunk(b"data"))
    for i in (1, 9, 20, len(frame) - 6):  # the prelude, its CRC, a header, the payload
        bad = bytearray(frame)
        bad[i] ^= 0x01
        with pytest.raises(EventStreamError, match=r"CRC|lengths"):
            Decoder().feed(bytes(bad))


def test_other_header_types_decode_as_botocore_decodes_them() -> None:
    # a frame written by hand with bool, byte, int32, int64, bytes, timestamp and uuid headers
    import struct
    import zlib

    headers = (b"\x01t\x00" + b"\x01f\x01" + b"\x01b\x02\xff" + b"\x01i\x04" + struct.pack(">i", -7)
               + b"\x01l\x05" + struct.pack(">q", 2**40) + b"\x01y\x06\x00\x02\x00\x01" + b"\x02ts\x08"
               + struct.pack(">q", 1700000000000) + b"\x01u\x09" + bytes(range(16)))
    total = 12 + len(headers) + 4
    head = struct.pack(">II", total, len(headers))
    body = head + struct.pack(">I", zlib.crc32(head)) + headers
    frame = body + struct.pack(">I", zlib.crc32(body))
    ours = eventstream.decode_message(frame).headers
    assert ours == _botocore_messages([frame])[0].headers


def test_the_stream_must_end_on_a_message_boundary_and_large_payloads_are_split() -> None:
    with pytest.raises(EventStreamError, match="ended inside a message"):
        list(eventstream.decode_stream([eventstream.payload_chunk(b"abc")[:-1]]))
    frames = list(eventstream.payload_chunks(b"x" * 10, size=4))
    assert [eventstream.decode_message(f).payload for f in frames] == [b"xxxx", b"xxxx", b"xx"]
    with pytest.raises(EventStreamError, match="exceeds"):
        eventstream.encode_message({":event-type": "PayloadChunk"}, b"x" * (eventstream.MAX_PAYLOAD_BYTES + 1))
