"""tierserve.batch.generate: OpenAI batch lines generated a part at a time, on real onnxruntime-genai sessions of the
tiny Llama compiled by ``tierserve compile`` (the ``genai_store`` fixture), through BatchInferenceFunction's handler
on in-process moto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.batch_aws import BUCKET, mocked_batch_aws
from tests.support.batch_jobs import outputs, sqs_batch
from tests.support.genai_store import GENAI_MODEL
from tierserve.batch import generate
from tierserve.batch import runner as batch_runner
from tierserve.batch.locations import BatchInputError
from tierserve.batch.spec import job_from_message
from tierserve.generation.requests import SamplingParams
from tierserve.manifest import Manifest

PROMPTS = ["The with statement", "Hello there, how are you doing on this fine and sunny day?", "a",
           "Café, naïve façade: 5 € — ½ 🙂 über straße.", "def f(x):\n    return"]


def _chat(cid: str, text: str, **kw) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": GENAI_MODEL, "messages": [{"role": "user", "content": text}], **kw}}


def _completion(cid: str, text: str, **kw) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"prompt": text, **kw}}


#: Chat and completion lines, greedy with different lengths, a seeded sampled one, blank, malformed and 400 lines.
LINES: list[bytes] = [json.dumps(x).encode() for x in (
    _chat("c0", PROMPTS[0], max_tokens=12, temperature=0),
    _completion("p1", PROMPTS[1], max_tokens=7, temperature=0),
    _chat("c2", PROMPTS[3], max_tokens=20, temperature=0, stop=["e"]),
    _completion("p3", PROMPTS[2], max_tokens=16, temperature=0.8, seed=7),
)] + [b"", b'{"custom_id": "broken"', json.dumps({**_completion("u5", "x"), "url": "/v1/embeddings"}).encode(),
      json.dumps(_completion("e7", "x", logprobs=True)).encode(),
      json.dumps(_completion("e8", "x", max_tokens=100_000)).encode()] + [
    json.dumps(_completion(f"g{i}", PROMPTS[i % 5], max_tokens=5 + i, temperature=0)).encode() for i in range(9, 13)]
BAD_LINES = [6, 7]  # 1-based: not JSON, a url that is not a generation route
ANSWERED_400 = {"e7": "logprobs", "e8": "max_tokens"}


@pytest.fixture
def aws(runtime_env, genai_store):
    with mocked_batch_aws(runtime_env, genai_store, CHUNK_ROWS="5") as clients:
        yield clients
    batch_runner.after_part_hook = None


def _run(aws, lambda_context, key: str, out: str, **extra) -> dict:
    from tierserve.handlers import batch_inference

    body = {"model": GENAI_MODEL, "input": f"s3://{BUCKET}/{key}", "output": f"s3://{BUCKET}/{out}", **extra}
    return batch_inference.lambda_handler(sqs_batch(body), lambda_context)


def _sync_body(line: dict) -> dict:
    """The synchronous API's answer for ``line`` (in process: DataPlane.generate and openai.py's renderer)."""
    from tierserve.app import get_runtime
    from tierserve.generation import openai
    from tierserve.protocol.dataplane import DataPlane

    body = {"model": GENAI_MODEL, **line["body"]}
    parse = openai.parse_chat if line["url"] == "/v1/chat/completions" else openai.parse_completion
    generation = DataPlane(get_runtime()).generate(parse(body))
    return openai.completion_body(generation.request, generation)


def _without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_batched_greedy_generation_equals_batch_one_token_for_token(genai_store):
    # Given the compiled tiny Llama, prompts of 1 to 46 tokens, and different max_tokens per row
    from tierserve.generation import engine
    from tierserve.store import ModelStore

    store = ModelStore(str(genai_store), cache_dir=genai_store.parent / "batch-gen-cache")
    mv = store.manifest().resolve(GENAI_MODEL)
    loaded = engine.load(store.fetch(mv.cpu_artifact).parent, 1)
    prompts = [loaded.encode(p) for p in PROMPTS]
    maxes = [20, 7, 33, 12, 25]
    greedy = SamplingParams(temperature=0.0)
    # And an EOS set holding a token the rows produce, so that rows stop early at different steps
    alone = [list(loaded.generate(p, greedy, (), n)) for p, n in zip(prompts, maxes, strict=True)]
    eos = {alone[0][3].token_ids[0], alone[2][5].token_ids[0]}
    for params in (greedy, SamplingParams(temperature=0.0, stop=("e", "th"))):
        # When they are generated alone and together
        one = [list(loaded.generate(p, params, tuple(eos), n)) for p, n in zip(prompts, maxes, strict=True)]
        many = engine.generate_batch(loaded, prompts, params, tuple(eos), maxes)
        # Then every row has the same tokens, text, finish reason and usage as alone
        for a, b in zip(one, many, strict=True):
            assert [e.token_ids for e in b] == [e.token_ids for e in a]
            assert [e.text for e in b] == [e.text for e in a]
            assert (b[-1].finish_reason, b[-1].usage) == (a[-1].finish_reason, a[-1].usage)
        assert any(a[-1].finish_reason == "stop" for a in one) and len({len(a) for a in one}) > 2  # rows end apart


def test_a_generation_job_answers_each_line_as_the_synchronous_api_in_order(aws, lambda_context, monkeypatch):
    # Given an OpenAI batch file of chat and completion lines with a blank line, malformed lines and two 400s
    from tierserve.generation import engine

    key = f"batch/in/{GENAI_MODEL}/nightly.jsonl"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"\n".join(LINES) + b"\n")
    batched: list[int] = []
    real = engine.generate_batch
    monkeypatch.setattr(engine, "generate_batch", lambda m, prompts, *a, **k: batched.append(len(prompts)) or
                        real(m, prompts, *a, **k))
    # When it runs (parts of 5 lines)
    assert _run(aws, lambda_context, key, "batch/out/one/nightly") == {"batchItemFailures": []}
    out = outputs(aws, "batch/out/one/nightly")
    # (a part's greedy lines with equal parameters were generated together: c0 + p1, then g10 ... g12)
    assert batched == [2, 3]
    # Then every good line is answered, in the input's order, in OpenAI's batch output shape
    answers = [json.loads(x) for k in sorted(out) if k.startswith("part-") for x in out[k].splitlines()]
    given = [json.loads(x) for i, x in enumerate(LINES, 1) if x and i not in BAD_LINES]
    assert [a["custom_id"] for a in answers] == [g["custom_id"] for g in given]
    created = int(aws["s3"].head_object(Bucket=BUCKET, Key=key)["LastModified"].timestamp())
    for a, g in zip(answers, given, strict=True):
        assert set(a) == {"id", "custom_id", "response", "error"} and a["error"] is None
        assert a["id"].startswith("batch_req_")
        if g["custom_id"] in ANSWERED_400:  # the API's 400, in OpenAI's error shape
            assert a["response"]["status_code"] == 400
            assert a["response"]["body"]["error"]["param"] == ANSWERED_400[g["custom_id"]]
            continue
        # And each body is the synchronous API's answer, except id and created (from the job, custom_id)
        body = a["response"]["body"]
        assert a["response"]["status_code"] == 200 and body["created"] == created
        assert body["id"].startswith("chatcmpl-" if g["url"] == "/v1/chat/completions" else "cmpl-")
        assert _without_ids(body) == _without_ids(_sync_body(g)), g["custom_id"]
    # And the malformed lines are named with their line numbers
    errs = [json.loads(x) for x in out["errors.jsonl"].splitlines()]
    assert [e["line"] for e in errs] == BAD_LINES and "JSON" in errs[0]["reason"] and "url" in errs[1]["reason"]
    # And _SUCCESS carries the job's token usage
    success = json.loads(out["_SUCCESS"])
    usage = {k: sum(a["response"]["body"]["usage"][k] for a in answers if a["response"]["status_code"] == 200)
             for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert success["usage"] == usage and usage["completion_tokens"] > 0
    assert success["counts"] | {} == {"lines": len(LINES), "output_lines": len(answers), "rows": len(answers) - 2,
                                      "errors": 2, "blank_lines": 1, "failed_requests": 2}


def test_a_redelivered_job_rewrites_nothing_and_a_crash_resumes_to_identical_parts(aws, lambda_context):
    key = f"batch/in/{GENAI_MODEL}/redo.jsonl"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"\n".join(LINES) + b"\n")
    assert _run(aws, lambda_context, key, "batch/out/a/redo") == {"batchItemFailures": []}
    listed = aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix="batch/out/a/redo/")["Contents"]
    # When the same message is delivered again
    assert _run(aws, lambda_context, key, "batch/out/a/redo") == {"batchItemFailures": []}
    # Then no object was written again
    again = aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix="batch/out/a/redo/")["Contents"]
    assert [(o["Key"], o["ETag"], o["LastModified"]) for o in again] == \
        [(o["Key"], o["ETag"], o["LastModified"]) for o in listed]

    # And a run of the same input that crashes after part 1's checkpoint, retried, writes the same bytes
    def crash(stage: str, part: int) -> None:
        if stage == "checkpointed" and part == 1:
            raise RuntimeError("simulated crash")

    batch_runner.after_part_hook = crash
    assert _run(aws, lambda_context, key, "batch/out/b/redo")["batchItemFailures"] == [{"itemIdentifier": "m0"}]
    batch_runner.after_part_hook = None
    assert _run(aws, lambda_context, key, "batch/out/b/redo") == {"batchItemFailures": []}
    one, two = outputs(aws, "batch/out/a/redo"), outputs(aws, "batch/out/b/redo")
    assert {k: v for k, v in one.items() if k != "_SUCCESS"} == {k: v for k, v in two.items() if k != "_SUCCESS"}
    assert json.loads(two["_SUCCESS"])["invocations"] == 2


def test_a_job_fanned_out_over_shards_writes_the_bytes_of_one_run(aws, lambda_context):
    from tests.support.batch_jobs import drain

    key = f"batch/in/{GENAI_MODEL}/wide.jsonl"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"\n".join(LINES) + b"\n")
    assert _run(aws, lambda_context, key, "batch/out/one/wide") == {"batchItemFailures": []}
    # When the same job is asked to fan out into 3 shards, each shard run from the jobs queue
    assert _run(aws, lambda_context, key, "batch/out/fan/wide", shards=3) == {"batchItemFailures": []}
    messages = drain(aws)
    assert len(messages) == 3
    from tierserve.handlers import batch_inference

    assert batch_inference.lambda_handler(sqs_batch(*messages), lambda_context) == {"batchItemFailures": []}
    one, fan = outputs(aws, "batch/out/one/wide"), outputs(aws, "batch/out/fan/wide")
    # Then the output lines, in order, and errors.jsonl are byte-identical to one run's, and so is the usage
    assert len({k[:10] for k in fan if k.startswith("part-")}) == 3

    def lines(out: dict[str, bytes]) -> bytes:
        return b"".join(out[k] for k in sorted(out) if k.startswith("part-"))

    assert lines(fan) == lines(one) and fan["errors.jsonl"] == one["errors.jsonl"]
    assert json.loads(fan["_SUCCESS"])["usage"] == json.loads(one["_SUCCESS"])["usage"]


def test_a_tensor_format_for_a_text_generation_model_is_the_jobs_poison_alone(aws, lambda_context):
    key = f"batch/in/{GENAI_MODEL}/t.jsonl"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"\n".join(LINES) + b"\n")
    got = _run(aws, lambda_context, key, "batch/out/t", format="tensors")
    assert got == {"batchItemFailures": [{"itemIdentifier": "m0"}]}
    with pytest.raises(BatchInputError, match='"format" must be'):
        job_from_message({"model": "m", "input": f"s3://{BUCKET}/a.jsonl", "format": "csv"})


@pytest.mark.parametrize(("raw", "reason"), [
    (b"[1]", "not a JSON object"),
    (b'{"method": "POST", "url": "/v1/completions", "body": {}}', "custom_id"),
    (b'{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}', "method"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": "x"}', "body"),
])
def test_a_malformed_line_says_what_is_wrong(raw, reason):
    line, body, _ = generate.parse_line(raw, 3)
    assert body is None and line.line == 3 and reason in (line.error or "")


def test_the_part_size_is_bounded_by_the_kv_cache_of_a_batch_at_the_full_context(genai_store, runtime_env):
    # Given the tiny Llama with a stated KV cache of 1 MiB a token and a 1,024-token context
    from dataclasses import replace

    from tierserve.app import get_runtime

    runtime_env.setenv("MODEL_STORE_URI", str(genai_store))
    mv = Manifest.loads((Path(genai_store) / "manifest.json").read_text()).resolve(GENAI_MODEL)
    assert mv.generation is not None
    big = replace(mv, generation=replace(mv.generation, kv_bytes_per_token=1 << 20, context_length=1024, tiers={}))
    for memory_mb, rows in ((4096, 1), (10240, 4)):
        runtime_env.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", str(memory_mb))
        from tierserve.app import reset_runtime

        reset_runtime()
        # Then a part holds as many lines as their KV caches at the full context fit in half the memory
        assert generate.part_rows(get_runtime(), big) == rows
    assert generate.budget_bytes(big, 10240) // ((1 << 20) * 1024) == 4


def test_a_file_dropped_at_batch_in_model_runs_from_its_s3_event(aws, lambda_context):
    # Given the file dropped at batch/in/{model}/{job}.jsonl, and the S3 event it causes (an unquoted eTag, as S3
    # sends it; defect: `created` was read with If-Match on that eTag, which S3 refuses with 412)
    from tests.support.make_batch_events import s3_put_event
    from tierserve.handlers import batch_inference

    key = f"batch/in/{GENAI_MODEL}/dropped.jsonl"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=LINES[0] + b"\n")
    head = aws["s3"].head_object(Bucket=BUCKET, Key=key)
    event = s3_put_event(key=key, etag=head["ETag"].strip('"'), size=head["ContentLength"])
    # When the event is handled
    result = batch_inference.lambda_handler(event, lambda_context)
    # Then the job ran, with the line answered at batch/out/{model}/{job}/
    assert result["jobs"][0]["counts"]["output_lines"] == 1 and result["jobs"][0]["format"] == "openai"
    answer = json.loads(outputs(aws, f"batch/out/{GENAI_MODEL}/dropped")["part-00000.jsonl"])
    assert answer["custom_id"] == "c0" and answer["response"]["status_code"] == 200


def test_a_function_without_onnxruntime_genai_refuses_a_generation_job_before_any_work(monkeypatch) -> None:
    # Given a package without onnxruntime-genai (the deployed BatchInferenceFunction's)
    import importlib.util

    from tierserve import errors as tierserve_errors
    from tierserve.batch import generate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_genai"
                        else real(name, *a))
    # Then an OpenAI batch job is a configuration error that says where to run it, not an ImportError later
    with pytest.raises(tierserve_errors.ConfigurationError, match="onnxruntime-genai") as raised:
        generate.require_engine()
    # (the fix: hand such jobs to BatchGenerateFunction, issue 19)
    assert "GENERATION_JOBS_QUEUE_URL" in raised.value.message and "BatchGenerateFunction" in raised.value.message


# --- the hand-off to BatchGenerateFunction (issue 19: BatchInferenceFunction's package has no room for the engine) ---

def _as_function(runtime_env, aws, name: str) -> None:
    """The process plays ``name``: BatchInferenceFunction hands OpenAI batch jobs to the generation queue;
    BatchGenerateFunction runs them, its continuations and shards on its own queue (template.yaml's environments)."""
    from tierserve.app import reset_runtime

    runtime_env.setenv("AWS_LAMBDA_FUNCTION_NAME", name)
    if name == "BatchInferenceFunction":
        runtime_env.setenv("CONTINUATION_QUEUE_URL", aws["jobs_queue_url"])
        runtime_env.setenv("GENERATION_JOBS_QUEUE_URL", aws["generate_queue_url"])
    else:
        runtime_env.setenv("CONTINUATION_QUEUE_URL", aws["generate_queue_url"])
        runtime_env.delenv("GENERATION_JOBS_QUEUE_URL", raising=False)
    reset_runtime()


def _listing(aws, prefix: str) -> list[tuple]:
    listed = aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return [(o["Key"], o["ETag"], o["LastModified"]) for o in listed]


def test_an_openai_job_is_handed_to_batch_generate_function_once_and_run_there_once(aws, lambda_context,
                                                                                     runtime_env):
    from tests.support.batch_jobs import drain
    from tests.support.make_batch_events import s3_put_event
    from tierserve.handlers import batch_generate, batch_inference

    # Given a file dropped at batch/in/{model}/{job}.jsonl, and BatchInferenceFunction with GENERATION_JOBS_QUEUE_URL
    key = f"batch/in/{GENAI_MODEL}/handed.jsonl"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"\n".join(LINES) + b"\n")
    head = aws["s3"].head_object(Bucket=BUCKET, Key=key)
    etag = head["ETag"].strip('"')
    event = s3_put_event(key=key, etag=etag, size=head["ContentLength"])
    _as_function(runtime_env, aws, "BatchInferenceFunction")
    # When its S3 event is delivered, and delivered again
    first = batch_inference.lambda_handler(event, lambda_context)["jobs"][0]
    again = batch_inference.lambda_handler(event, lambda_context)["jobs"][0]
    # Then the job was handed to the generation queue, once (the redelivery gets the stored result), with nothing
    # written and no job state here
    assert first["status"] == "handed_off" and first["queue"] == aws["generate_queue_url"]
    assert again == first
    assert _listing(aws, f"batch/out/{GENAI_MODEL}/handed") == []
    handed = drain({**aws, "jobs_queue_url": aws["generate_queue_url"]})
    assert drain(aws) == []  # nothing on BatchInferenceFunction's own jobs queue
    assert handed == [{"model": GENAI_MODEL, "version": first["version"], "input": f"s3://{BUCKET}/{key}",
                       "input_version": {"etag": etag}, "output": f"s3://{BUCKET}/batch/out/{GENAI_MODEL}/handed",
                       "format": "openai"}]
    # When BatchGenerateFunction receives it
    _as_function(runtime_env, aws, "BatchGenerateFunction")
    assert batch_generate.lambda_handler(sqs_batch(*handed), lambda_context) == {"batchItemFailures": []}
    # Then it ran the job: every good line answered, the bad ones named
    out = outputs(aws, f"batch/out/{GENAI_MODEL}/handed")
    assert json.loads(out["_SUCCESS"])["format"] == "openai"
    assert [json.loads(x)["line"] for x in out["errors.jsonl"].splitlines()] == BAD_LINES
    done = _listing(aws, f"batch/out/{GENAI_MODEL}/handed")

    # When a job message names the same file (no version: the object's, pinned canonically as the S3 event's)
    _as_function(runtime_env, aws, "BatchInferenceFunction")
    message = {"model": GENAI_MODEL, "input": f"s3://{BUCKET}/{key}"}
    from tierserve.batch.runner import run_job
    from tierserve.batch.spec import job_from_message

    # Then BatchInferenceFunction knows the job (one job key for that version) as completed, and hands nothing off
    assert run_job(job_from_message(message), lambda_context)["status"] == "already_completed"
    assert drain({**aws, "jobs_queue_url": aws["generate_queue_url"]}) == []
    # When BatchGenerateFunction gets the hand-off again, and with another body (asking for one shard)
    _as_function(runtime_env, aws, "BatchGenerateFunction")
    other = {**handed[0], "shards": 1}
    assert batch_generate.lambda_handler(sqs_batch(*handed, other), lambda_context) == {"batchItemFailures": []}
    # Then BatchGenerateFunction ran it once: nothing was written again (idempotency, then the job's state)
    assert _listing(aws, f"batch/out/{GENAI_MODEL}/handed") == done
    assert drain({**aws, "jobs_queue_url": aws["generate_queue_url"]}) == []


def test_a_generation_job_fanned_out_in_batch_generate_function_keeps_its_shards_on_its_queue(aws, lambda_context,
                                                                                             runtime_env):
    from tests.support.batch_jobs import drain
    from tierserve.handlers import batch_generate, batch_inference

    key = f"batch/in/{GENAI_MODEL}/fan.jsonl"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"\n".join(LINES) + b"\n")
    _as_function(runtime_env, aws, "BatchInferenceFunction")
    message = {"model": GENAI_MODEL, "input": f"s3://{BUCKET}/{key}", "output": f"s3://{BUCKET}/batch/out/f/fan",
               "shards": 2}
    assert batch_inference.lambda_handler(sqs_batch(message), lambda_context) == {"batchItemFailures": []}
    generate_queue = {**aws, "jobs_queue_url": aws["generate_queue_url"]}
    handed = drain(generate_queue)
    assert len(handed) == 1 and handed[0]["shards"] == 2
    _as_function(runtime_env, aws, "BatchGenerateFunction")
    assert batch_generate.lambda_handler(sqs_batch(*handed), lambda_context) == {"batchItemFailures": []}
    shards = drain(generate_queue)  # the shard messages: on BatchGenerateFunction's own queue
    assert [m["shard"]["index"] for m in shards] == [0, 1] and drain(aws) == []
    # A shard message that reaches BatchInferenceFunction (misrouted, or redriven from the wrong DLQ) is handed to
    # BatchGenerateFunction as that same shard, not run where the engine is missing
    _as_function(runtime_env, aws, "BatchInferenceFunction")
    before = _listing(aws, "batch/")
    assert batch_inference.lambda_handler(sqs_batch(shards[1]), lambda_context) == {"batchItemFailures": []}
    rehanded = drain(generate_queue)
    assert len(rehanded) == 1 and rehanded[0]["shard"] == shards[1]["shard"], rehanded
    assert _listing(aws, "batch/") == before  # nothing written there
    _as_function(runtime_env, aws, "BatchGenerateFunction")
    assert batch_generate.lambda_handler(sqs_batch(shards[0], *rehanded), lambda_context) == {"batchItemFailures": []}
    assert json.loads(outputs(aws, "batch/out/f/fan")["_SUCCESS"])["shards"] == 2


def test_a_hand_off_the_queue_refuses_fails_the_delivery_and_writes_nothing(aws, lambda_context, runtime_env):
    from tierserve.handlers import batch_inference

    key = f"batch/in/{GENAI_MODEL}/refused.jsonl"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=LINES[0] + b"\n")
    _as_function(runtime_env, aws, "BatchInferenceFunction")
    runtime_env.setenv("GENERATION_JOBS_QUEUE_URL", aws["generate_queue_url"] + "-gone")
    from tierserve.app import reset_runtime

    reset_runtime()
    message = {"model": GENAI_MODEL, "input": f"s3://{BUCKET}/{key}"}
    # Then the delivery is a failed item (retried by SQS, its idempotency record released), and nothing was written
    assert batch_inference.lambda_handler(sqs_batch(message), lambda_context) == \
        {"batchItemFailures": [{"itemIdentifier": "m0"}]}
    assert _listing(aws, f"batch/out/{GENAI_MODEL}/refused") == []
    # And once the queue is there, the retried delivery hands it off
    _as_function(runtime_env, aws, "BatchInferenceFunction")
    assert batch_inference.lambda_handler(sqs_batch(message), lambda_context) == {"batchItemFailures": []}


def test_only_a_whole_openai_job_is_handed_off(genai_store, digits_store, runtime_env) -> None:
    # Given a function with GENERATION_JOBS_QUEUE_URL
    from tierserve.app import get_runtime, reset_runtime
    from tierserve.batch.shards import Shard

    runtime_env.setenv("GENERATION_JOBS_QUEUE_URL", "https://sqs.us-east-1.amazonaws.com/123456789012/generate")
    reset_runtime()
    mv = Manifest.loads((Path(genai_store) / "manifest.json").read_text()).resolve(GENAI_MODEL)
    spec = job_from_message({"model": GENAI_MODEL, "input": f"s3://{BUCKET}/batch/in/{GENAI_MODEL}/a.jsonl"})
    # Then a tensor job runs where it is (nothing is sent)
    assert generate.hand_off(get_runtime(), spec, mv, generate.FORMAT_TENSORS, {}) is None
    # And a shard of an OpenAI job is handed off as that shard (the message names it, and parses back to it)
    shard = job_from_message({"model": GENAI_MODEL, "input": spec.input.uri,
                              "shard": Shard(0, 2, 0, 10, 1).to_json()})
    shard_message = generate.handoff_message(shard, mv, {"etag": "abc"})
    assert job_from_message(shard_message).shard == shard.shard and "shards" not in shard_message
    # And the hand-off's message pins the version as the job saw it, the eTag without quotes
    message = generate.handoff_message(spec, mv, {"version_id": "v1", "etag": '"abc"'})
    assert message["input_version"] == {"version_id": "v1", "etag": "abc"}
    assert job_from_message(message).job_key == spec.__class__(**{**spec.__dict__,
                                                                   "input_version": {"version_id": "v1"}}).job_key
    # And without the setting nothing is handed off
    runtime_env.delenv("GENERATION_JOBS_QUEUE_URL")
    reset_runtime()
    assert generate.hand_off(get_runtime(), spec, mv, generate.FORMAT_OPENAI, {}) is None


def test_a_continuation_that_reaches_batch_inference_function_resumes_the_job_in_batch_generate_function(
        aws, lambda_context, runtime_env):
    from tests.support.batch_jobs import drain
    from tierserve.handlers import batch_generate, batch_inference

    # Given a generation job BatchGenerateFunction ran one part of, then continued (its margin reached)
    key = f"batch/in/{GENAI_MODEL}/cont.jsonl"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"\n".join(LINES) + b"\n")
    _as_function(runtime_env, aws, "BatchGenerateFunction")
    checkpointed: list[int] = []
    batch_runner.after_part_hook = lambda stage, part: checkpointed.append(part) if stage == "checkpointed" else None
    remaining = lambda_context.get_remaining_time_in_millis
    lambda_context.get_remaining_time_in_millis = lambda: 500 if checkpointed else remaining()
    message = {"model": GENAI_MODEL, "input": f"s3://{BUCKET}/{key}", "output": f"s3://{BUCKET}/batch/out/c/cont",
               "format": "openai"}
    try:
        assert batch_generate.lambda_handler(sqs_batch(message), lambda_context) == {"batchItemFailures": []}
    finally:
        batch_runner.after_part_hook = None
        lambda_context.get_remaining_time_in_millis = remaining
    generate_queue = {**aws, "jobs_queue_url": aws["generate_queue_url"]}
    continuation = drain(generate_queue)
    assert [m["continuation"] for m in continuation] == [1]
    # When its continuation message reaches BatchInferenceFunction instead (misrouted, or sent by hand)
    _as_function(runtime_env, aws, "BatchInferenceFunction")
    assert batch_inference.lambda_handler(sqs_batch(*continuation), lambda_context) == {"batchItemFailures": []}
    # Then it hands BatchGenerateFunction the continuation (not a new job its idempotency would swallow)
    handed = drain(generate_queue)
    assert len(handed) == 1 and handed[0]["continuation"] == 1, handed
    # And BatchGenerateFunction resumes the job to its end
    _as_function(runtime_env, aws, "BatchGenerateFunction")
    assert batch_generate.lambda_handler(sqs_batch(*handed), lambda_context) == {"batchItemFailures": []}
    summary = json.loads(outputs(aws, "batch/out/c/cont")["_SUCCESS"])
    assert summary["invocations"] == 2 and summary["counts"]["lines"] == len(LINES)



def test_a_part_that_would_outlast_the_margin_is_left_unwritten_and_the_job_continues_with_smaller_parts(
        aws, lambda_context, runtime_env, monkeypatch):
    from tests.support.batch_jobs import drain
    from tierserve.app import get_runtime
    from tierserve.batch.state import JobStore
    from tierserve.handlers import batch_generate

    # Given a generation job (parts of 5 lines, no measured tokens/s to bound them in time) in BatchGenerateFunction,
    # and a reference run of it that was never short of time
    key = f"batch/in/{GENAI_MODEL}/slow.jsonl"
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=b"\n".join(LINES) + b"\n")
    _as_function(runtime_env, aws, "BatchGenerateFunction")
    message = {"model": GENAI_MODEL, "input": f"s3://{BUCKET}/{key}", "format": "openai"}
    ref = {**message, "output": f"s3://{BUCKET}/batch/out/ref/slow"}
    assert batch_generate.lambda_handler(sqs_batch(ref), lambda_context) == {"batchItemFailures": []}
    assert json.loads(outputs(aws, "batch/out/ref/slow")["_SUCCESS"])["chunk_rows"] == 5
    # When the remaining time drops below the checkpoint margin (1 s) after the first part's first batch
    batches = []
    real_run_batch = generate.GenerationPart.run_batch

    def counted(part, batch):
        real_run_batch(part, batch)
        batches.append(len(batch))

    monkeypatch.setattr(generate.GenerationPart, "run_batch", counted)
    monkeypatch.setattr(lambda_context, "get_remaining_time_in_millis", lambda: 500 if batches else 600_000)
    slow = {**message, "output": f"s3://{BUCKET}/batch/out/short/slow"}
    assert batch_generate.lambda_handler(sqs_batch(slow), lambda_context) == {"batchItemFailures": []}
    # Then that part was not written (it would have run into Lambda's timeout), its checkpoint is where it was, with
    # parts half the size from here, and the job continues in a new invocation
    assert _listing(aws, "batch/out/short/slow") == []
    etag = aws["s3"].head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
    state = JobStore(get_runtime().settings.job_table, get_runtime().aws("dynamodb-resource")).load(
        f"s3://{BUCKET}/{key}@{etag}->s3://{BUCKET}/batch/out/short/slow")
    assert state is not None and (state.next_part, state.chunk_rows) == (0, 2)
    continued = drain({**aws, "jobs_queue_url": aws["generate_queue_url"]})
    assert [m["continuation"] for m in continued] == [0]
    # And the continuation, with time enough, finishes the job with every line answered as in the reference run
    monkeypatch.setattr(lambda_context, "get_remaining_time_in_millis", lambda: 600_000)
    assert batch_generate.lambda_handler(sqs_batch(*continued), lambda_context) == {"batchItemFailures": []}
    got, want = outputs(aws, "batch/out/short/slow"), outputs(aws, "batch/out/ref/slow")

    def lines(o: dict[str, bytes]) -> bytes:
        return b"".join(o[k] for k in sorted(o) if k.startswith("part-"))

    assert lines(got) == lines(want) and got["errors.jsonl"] == want["errors.jsonl"]
    assert json.loads(got["_SUCCESS"])["parts"] == 7  # 13 lines in parts of 2
