"""make demo's pieces: the deliberately bad version (the same answers as v1, except a failure on inputs validation
never holds), the generation step's version choice, and its streamed chat with the openai SDK."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import onnxruntime as ort
import pytest

from tests.support.models import digits_classifier_onnx
from tierserve_tools.demo import bad_digits_onnx


def test_the_bad_digits_version_fails_only_on_a_saturated_pixel(tmp_path):
    good = tmp_path / "v1.onnx"
    good.write_bytes(digits_classifier_onnx()[0])
    bad = bad_digits_onnx(good, tmp_path / "v2.onnx")
    v1, v2 = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (good, bad))
    x = np.random.default_rng(0).integers(0, 17, (5, 64)).astype(np.float32)  # load_digits' range: 0..16
    for a, b in zip(v1.run(None, {"input": x}), v2.run(None, {"input": x}), strict=True):
        np.testing.assert_allclose(a, b)
    x[0, 3] = 17.0
    v1.run(None, {"input": x})
    with pytest.raises(Exception, match="cannot be reshaped"):
        v2.run(None, {"input": x})


def test_the_demo_lm_is_compiled_once_per_training(tmp_path):
    from tierserve_tools.demo import LM_NAME, lm_version

    assert lm_version(tmp_path, trained_now=False) == ("1", True)  # no store yet
    (tmp_path / "manifest.json").write_text(json.dumps({"models": {
        LM_NAME: {"versions": {"1": {}, "2": {}}}, "digits": {"versions": {"7": {}}}}}))
    assert lm_version(tmp_path, trained_now=False) == ("2", False)  # the cached model: served as compiled
    assert lm_version(tmp_path, trained_now=True) == ("3", True)  # trained again: a new, immutable version


class _FakeChat(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that streams three deltas and the usage, 50 ms apart."""

    requests: list[dict] = []

    def do_POST(self) -> None:
        _FakeChat.requests.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("x-served-by", "cpu")
        self.end_headers()
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "pydoc-lm"}
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
        chunks += [{"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
                   for t in ("The ", '"with" ', "statement")]
        chunks += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
                   {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23}}]
        for c in chunks:
            time.sleep(0.05)
            self.wfile.write(b"data: " + json.dumps({**base, **c}).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        pass


def test_stream_chat_prints_as_it_streams_and_times_the_first_token():
    pytest.importorskip("openai")
    from tierserve_tools.demo import stream_chat

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = io.StringIO()
        got = stream_chat(f"http://127.0.0.1:{server.server_port}/v1", "key", "pydoc-lm", "What is with?", 3, out)
    finally:
        server.shutdown()
        server.server_close()
    assert out.getvalue() == 'The "with" statement\n' and got["text"] == 'The "with" statement'
    assert (got["tokens"], got["prompt_tokens"], got["finish_reason"], got["served_by"]) == (3, 20, "length", "cpu")
    # the first text arrives with the second event (~100 ms); the other two tokens come 50 ms apart
    assert 0.08 < got["ttft_s"] < got["total_s"] and 10 < got["tokens_per_s"] < 25
    sent = _FakeChat.requests[-1]
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 3
    assert sent["messages"] == [{"role": "user", "content": "What is with?"}]
