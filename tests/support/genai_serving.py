"""A store and a runtime for the generation transports' tests: a tiny causal LM beside an embedding model.

Why: the API's tests (``tests/unit/runtime/test_api_generate.py``), the edge's (``tests/unit/edge/
test_edge_generate.py``) and the clients' (``tests/integration/test_openai_clients.py``) all serve the same
two models through different transports; this writes them once per test (the export is built once per session by
``tests.support.genai_models.export``).

- ``tiny`` v1: the tiny Llama (fp32), a chat template, context 256, default 16 tokens, cap 200, at most 2
  generations at once, CPU figures of 50 ms to first token and 5 tokens/s (so the HTTP API refuses more than
  about 140 tokens), placed on the CPU and the edge;
- ``plain`` v1: the same model without a chat template;
- ``emb`` v1: ``tests.support.models.embedding_onnx`` (ids, mask -> y [batch, 4]).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.genai_models import TinyLM, write_genai_store
from tests.support.models import write_embedding

#: The CPU figures written into ``tiny``'s manifest entry.
TINY_TOKENS_PER_S = 5.0
TINY_TTFT_MS = 50.0


def write_serving_store(root: Path, lm: TinyLM, targets: tuple[str, ...] = ("cpu", "edge"),
                        max_concurrency: int = 2) -> Path:
    write_genai_store(root, "tiny", lm, context_length=256, default_max_tokens=16, max_tokens_cap=200,
                      max_concurrency=max_concurrency, targets=targets)
    write_genai_store(root, "plain", lm, drop=("chat_template.jinja",), targets=targets)
    write_embedding(root, "emb", targets=targets)
    manifest = json.loads((root / "manifest.json").read_text())
    for version in manifest["models"]["tiny"]["versions"].values():
        version["generation"]["tiers"] = {"cpu": {"ttft_ms": {"16": TINY_TTFT_MS}, "tokens_per_s": TINY_TOKENS_PER_S,
                                                  "source": "test"}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def sse_events(data: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order (``[DONE]`` included)."""
    text = data.decode("utf-8")
    assert text.endswith("\n\n"), "an SSE body ends with a blank line"
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        out.append(block[len("data: "):])
    return out


def sse_text(data: bytes) -> str:
    """The text of an OpenAI stream (chat deltas or completion texts), checking it ends with ``[DONE]``."""
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    text = []
    for raw in events[:-1]:
        chunk = json.loads(raw)
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(text)


class ApiServer:
    """The endpoint table (``tierserve.api.handle_request``) over HTTP for one runtime, on a free local port, as
    the cloud answers it (``x-served-by`` its own; streams chunked): the "cloud" an edge forwards to, and a server
    the ``openai`` SDK and curl can reach without the local stack."""

    def __init__(self, runtime: object) -> None:
        from tierserve.httpserver import HttpServer, Request, Response
        from tierserve.protocol.http_api import HttpRequest, decode_body
        from tierserve.streaming.response import StreamingResponse

        outer = self

        class _Server(HttpServer):
            thread_name = "test-api"
            allowed_methods = None

            def handle(self, request: Request) -> Response:
                from tierserve import api

                outer.requests += 1
                req = HttpRequest(request.method, request.path, request.header_map(), {}, f"r{outer.requests}",
                                  _body=request.body)
                answered = api.handle_request(req, None, runtime, cancelled=request.disconnected.is_set)
                if isinstance(answered, StreamingResponse):
                    def chunks(stream: StreamingResponse = answered):
                        try:
                            yield from stream.chunks
                        finally:
                            stream.release()

                    return Response(answered.status, list(answered.headers.items()), chunks())
                return Response(int(answered["statusCode"]), list(answered["headers"].items()), decode_body(answered))

        self.requests = 0
        self.server = _Server()
        self.server.host, self.server.port = "127.0.0.1", 0

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> ApiServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
