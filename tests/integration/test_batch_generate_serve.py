"""Batch generation through `tierserve serve`: an OpenAI batch file of chat and completion lines (with malformed
lines and a 400) dropped at batch/in/{model}/{job}.jsonl reaches BatchInferenceFunction (S3 notification -> queue ->
worker), which hands it to BatchGenerateFunction's queue as in AWS (GENERATION_JOBS_QUEUE_URL, issue 19: its package
has no room for the engine), where BatchGenerateFunction runs it; every output body equals the synchronous API's
answer for its line (in process: DataPlane.generate and openai.py's renderer; and the stack's own POST
/v1/chat/completions and /v1/completions), in order; bad lines are named; a redelivered job message rewrites nothing;
the job fanned out over shards writes one run's bytes. The model is the tiny Llama compiled by `tierserve compile`
(G1's genai_store fixture)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.genai_store import GENAI_MODEL, genai_store, genai_validation, tiny_llama_hf  # noqa: F401

pytestmark = pytest.mark.integration

LINES = [
    {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": GENAI_MODEL, "messages": [{"role": "user", "content": "The with statement"}],
              "max_tokens": 10, "temperature": 0}},
    {"custom_id": "text-2", "method": "POST", "url": "/v1/completions",
     "body": {"model": GENAI_MODEL, "prompt": "The for statement is used", "max_tokens": 12, "temperature": 0}},
    "not json {",
    {"custom_id": "text-4", "method": "POST", "url": "/v1/completions",
     "body": {"model": GENAI_MODEL, "prompt": "Café, naïve façade", "max_tokens": 9, "temperature": 0.7, "seed": 3}},
    {"custom_id": "bad-5", "method": "POST", "url": "/v1/completions",
     "body": {"model": GENAI_MODEL, "prompt": "x", "echo": True}},
    {"custom_id": "chat-6", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": GENAI_MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello there"}],
              "max_tokens": 14, "temperature": 0, "stop": ["e"]}},
    {"custom_id": "nope-7", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    *({"custom_id": f"text-{i}", "method": "POST", "url": "/v1/completions",
       "body": {"model": GENAI_MODEL, "prompt": f"Line {i}: the if statement", "max_tokens": 4 + i, "temperature": 0}}
      for i in range(8, 14)),
]
RAW = b"".join((x if isinstance(x, str) else json.dumps(x)).encode() + b"\n" for x in LINES)
BAD = [3, 7]


@pytest.fixture(scope="module")
def stack(genai_store, tmp_path_factory) -> Iterator[object]:  # noqa: F811
    from tierserve_tools.serve import LocalStack

    with LocalStack(genai_store, port=0, triton=False, workdir=tmp_path_factory.mktemp("batch-gen-serve"),
                    batch_workers=2, env={"CHUNK_ROWS": "4", "ORT_THREADS": "1"}) as local:
        yield local


def _wait_success(s3, bucket: str, prefix: str, workdir: Path, timeout: float = 300) -> dict[str, bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
        if any(o["Key"].endswith("/_SUCCESS") for o in listed):
            return {o["Key"].rsplit("/", 1)[1]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                    for o in listed}
        time.sleep(0.3)
    raise AssertionError(f"{prefix} did not finish; see {workdir}/BatchInferenceFunction.log and "
                         "BatchGenerateFunction.log")


def _idle(sqs, urls: list[str], timeout: float = 120) -> None:
    """Wait until the jobs queues (BatchInferenceFunction's and BatchGenerateFunction's) hold nothing, visible or in
    flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = [sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"] for url in urls]
        if all(a["ApproximateNumberOfMessages"] == "0" and a["ApproximateNumberOfMessagesNotVisible"] == "0"
               for a in counts):
            return
        time.sleep(0.3)
    raise AssertionError("the jobs queues did not drain")


def _logged(workdir: Path, function: str, message: str, job: str) -> int:
    """How many of ``function``'s log lines say ``message`` about a job whose key holds ``job``."""
    lines = [json.loads(x) for x in (workdir / f"{function}.log").read_text().splitlines() if x.startswith("{")]
    return sum(1 for x in lines if x.get("message") == message and job in str(x.get("job", "")))


def _post(stack, path: str, body: dict) -> dict:
    conn = http.client.HTTPConnection(stack.host, stack.port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    assert resp.status == 200, data
    return json.loads(data)


def _in_process(store: Path, line: dict, monkeypatch, tmp_path: Path) -> dict:
    from tierserve.app import get_runtime, reset_runtime
    from tierserve.generation import openai
    from tierserve.protocol.dataplane import DataPlane

    monkeypatch.setenv("MODEL_STORE_URI", str(store))
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ORT_THREADS", "1")
    reset_runtime()
    parse = openai.parse_chat if line["url"] == "/v1/chat/completions" else openai.parse_completion
    generation = DataPlane(get_runtime()).generate(parse(line["body"]))
    return openai.completion_body(generation.request, generation)


def _same(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_an_openai_batch_file_dropped_in_s3_is_answered_as_the_synchronous_api(stack, genai_store, monkeypatch,  # noqa: F811
                                                                             tmp_path):
    from tierserve_tools.serve import BUCKET

    s3, sqs = stack.client("s3"), stack.client("sqs")
    # Given the file dropped at batch/in/{model}/nightly.jsonl (the bucket's notification starts the job)
    s3.put_object(Bucket=BUCKET, Key=f"batch/in/{GENAI_MODEL}/nightly.jsonl", Body=RAW)
    out = _wait_success(s3, BUCKET, f"batch/out/{GENAI_MODEL}/nightly", stack.workdir)
    # Then every good line is answered, in order, with the synchronous API's body (except id and created)
    answers = [json.loads(x) for k in sorted(out) if k.startswith("part-") for x in out[k].splitlines()]
    good = [x for i, x in enumerate(LINES, 1) if i not in BAD]
    assert [a["custom_id"] for a in answers] == [g["custom_id"] for g in good]
    for a, g in zip(answers, good, strict=True):
        if g["custom_id"] == "bad-5":  # the API's 400, in OpenAI's error shape
            assert a["response"]["status_code"] == 400 and a["response"]["body"]["error"]["param"] == "echo"
            continue
        body = a["response"]["body"]
        assert a["response"]["status_code"] == 200 and a["error"] is None
        assert _same(body) == _same(_in_process(genai_store, g, monkeypatch, tmp_path)), g["custom_id"]
        assert _same(body) == _same(_post(stack, g["url"], g["body"])), g["custom_id"]  # the stack's own API
    # And the bad lines are named with their line numbers
    assert [json.loads(x)["line"] for x in out["errors.jsonl"].splitlines()] == BAD
    # And _SUCCESS carries the job's token usage
    usage = json.loads(out["_SUCCESS"])["usage"]
    assert usage["completion_tokens"] == sum(a["response"]["body"]["usage"]["completion_tokens"] for a in answers
                                             if a["response"]["status_code"] == 200) > 0
    queues = [stack.queues["jobs_queue_url"], stack.queues["generate_queue_url"]]
    _idle(sqs, queues)
    # And BatchInferenceFunction handed the job to BatchGenerateFunction, which ran it (the deployed path: the batch
    # function's package has no room for the engine)
    nightly = f"batch/in/{GENAI_MODEL}/nightly.jsonl"
    assert _logged(stack.workdir, "BatchInferenceFunction", "batch generation job handed off", nightly) == 1
    assert _logged(stack.workdir, "BatchInferenceFunction", "batch job completed", nightly) == 0
    assert _logged(stack.workdir, "BatchGenerateFunction", "batch job completed", nightly) == 1

    # When a job message for the same file is delivered twice
    message = json.dumps({"model": GENAI_MODEL, "input": f"s3://{BUCKET}/batch/in/{GENAI_MODEL}/nightly.jsonl",
                          "output": f"s3://{BUCKET}/batch/out/again/nightly"})
    sqs.send_message(QueueUrl=stack.queues["jobs_queue_url"], MessageBody=message)
    first = _wait_success(s3, BUCKET, "batch/out/again/nightly", stack.workdir)
    _idle(sqs, queues)
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="batch/out/again/nightly/")["Contents"]
    sqs.send_message(QueueUrl=stack.queues["jobs_queue_url"], MessageBody=message)
    time.sleep(1)
    _idle(sqs, queues)
    # Then the redelivery rewrote nothing, and the job's output is the S3-dropped run's, byte for byte
    again = s3.list_objects_v2(Bucket=BUCKET, Prefix="batch/out/again/nightly/")["Contents"]
    assert [(o["Key"], o["ETag"], o["LastModified"]) for o in again] == \
        [(o["Key"], o["ETag"], o["LastModified"]) for o in listed]
    assert {k: v for k, v in first.items() if k != "_SUCCESS"} == {k: v for k, v in out.items() if k != "_SUCCESS"}

    # When the job is fanned out over 3 shards (run by the pool of 2 workers)
    sqs.send_message(QueueUrl=stack.queues["jobs_queue_url"], MessageBody=json.dumps(
        {**json.loads(message), "output": f"s3://{BUCKET}/batch/out/fan/nightly", "shards": 3}))
    fan = _wait_success(s3, BUCKET, "batch/out/fan/nightly", stack.workdir)
    # Then its output lines and errors are byte-identical to one run's
    assert json.loads(fan["_SUCCESS"])["shards"] == 3

    def lines(o: dict[str, bytes]) -> bytes:
        return b"".join(o[k] for k in sorted(o) if k.startswith("part-"))

    assert lines(fan) == lines(out) and fan["errors.jsonl"] == out["errors.jsonl"]
    assert json.loads(fan["_SUCCESS"])["usage"] == usage
    # And the redelivered job was handed off once, and every run (the shards too) was BatchGenerateFunction's
    assert _logged(stack.workdir, "BatchInferenceFunction", "batch generation job handed off", nightly) == 3
    assert _logged(stack.workdir, "BatchInferenceFunction", "batch job completed", "") == 0
    assert _logged(stack.workdir, "BatchGenerateFunction", "batch shard completed", "batch/out/fan/nightly") == 3
