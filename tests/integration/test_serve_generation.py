"""A generation through `tierserve serve` as AWS runs it: the streaming REST API (payload 1.0) -> RouterFunction
in its own environment under the streaming runtime loop -> InvokeWithResponseStream on the local Invoke endpoint
-> CpuInferenceFunction under the loop -> the engine; with --auth keys' bearer check."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierserve_tools.serve import LocalStack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[LocalStack]:
    from tests.support.genai_models import export, write_genai_store

    root = tmp_path_factory.mktemp("serve-generation")
    write_genai_store(root / "store", "tiny", export(root / "lm", "llama"))
    with LocalStack(root / "store", port=0, triton=False, batch=False, s3=False, auth="keys",
                    workdir=root / "serve") as local:
        yield local


def _post(stack: LocalStack, path: str, body: dict, key: str | None) -> tuple[int, dict[str, str], list[bytes]]:
    conn = http.client.HTTPConnection(stack.host, stack.port, timeout=120)
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    conn.request("POST", path, json.dumps(body), headers)
    resp = conn.getresponse()
    lines = []
    while line := resp.readline():
        lines.append(line)
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, lines


def test_a_streamed_completion_through_the_rest_api_the_router_and_the_cpu_function(stack: LocalStack) -> None:
    from tierserve import keys
    from tierserve_tools.keys_cli import LOCAL_TABLE

    request = {"model": "tiny", "prompt": "The with statement", "max_tokens": 8, "temperature": 0}
    # Without an API key: the REST API's 401, in OpenAI's shape
    status, _, lines = _post(stack, "/v1/completions", request, None)
    assert status == 401 and json.loads(b"".join(lines))["error"]["code"] == "invalid_api_key"
    secret, _ = keys.KeyStore(LOCAL_TABLE, stack.client("dynamodb")).create("tester")
    # With one: the streamed answer is SSE, served by the CPU tier, ending with [DONE]
    status, headers, lines = _post(stack, "/v1/completions", {**request, "stream": True}, secret)
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), b"".join(lines)
    assert headers["x-served-by"] == "cpu" and "content-encoding" not in headers
    data = [line[6:].strip() for line in lines if line.startswith(b"data: ")]
    assert data[-1] == b"[DONE]" and len(data) > 2
    streamed = "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])
    # And the same request unstreamed gives the same text, with its usage
    status, _, lines = _post(stack, "/v1/completions", request, secret)
    whole = json.loads(b"".join(lines))
    assert status == 200 and whole["choices"][0]["text"] == streamed
    assert whole["usage"]["completion_tokens"] <= 8
    # And the router and the CPU function each ran in its own environment (the runtime loop's processes)
    assert stack.lambda_endpoint is not None
    assert stack.lambda_endpoint.functions["RouterFunction"].worker_pids
    assert stack.lambda_endpoint.functions["CpuInferenceFunction"].worker_pids
    assert Path(stack.workdir / "CpuInferenceFunction.log").exists()
