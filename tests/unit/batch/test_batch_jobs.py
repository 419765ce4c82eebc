"""Job parsing, job state, the runner and the SQS entry point, on in-process moto (mock_aws)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tests.support.make_batch_events import s3_put_event
from tests.unit.batch.conftest import BUCKET, TABLE
from tierserve.batch import jobs as batch_jobs
from tierserve.batch.io import BatchInputError
from tierserve.batch.jobs import job_from_message, job_from_s3_record
from tierserve.batch.service import specs_from_body
from tierserve.batch.state import JobConflictError, JobState, JobStore
from tierserve.errors import InvalidNameError, ModelNotFoundError
from tierserve.handlers import batch_inference
from tierserve_tools.batch import sqs_event

ROWS = np.random.default_rng(3).integers(0, 17, size=(10, 64)).astype(np.float32)


def _event(*bodies: dict) -> dict:
    msgs = [{"MessageId": f"m{i}", "ReceiptHandle": f"r{i}", "Body": json.dumps(b)} for i, b in enumerate(bodies)]
    return sqs_event(msgs, "arn:aws:sqs:us-east-1:123456789012:q", "us-east-1")


def _put_jsonl(aws, name: str, n: int = 10) -> str:
    key = f"batch/in/digits/{name}.jsonl"
    body = "".join(json.dumps({"id": f"{name}-{i}", "inputs": {"input": ROWS[i].tolist()}}) + "\n" for i in range(n))
    aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=body.encode())
    return key


def _outputs(aws, prefix: str) -> dict[str, bytes]:
    listed = aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: aws["s3"].get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for o in listed}


def test_s3_records_and_job_messages_become_validated_jobs():
    # Given an S3 record (URL-encoded key) and a job message
    rec = s3_put_event(key="batch/in/digits/night%2D1.jsonl", etag="abc", size=1)["Records"][0]
    # When they are parsed
    s3_job = job_from_s3_record(rec)
    msg_job = job_from_message({"model": "digits", "version": "1", "input": f"s3://{BUCKET}/any/where/x.npz"})
    # Then both name their model, input and default output; redeliveries share an idempotency key
    assert s3_job.input.key == "batch/in/digits/night-1.jsonl" and s3_job.output.key == "batch/out/digits/night-1"
    assert s3_job.input_version == {"etag": "abc"}
    assert job_from_s3_record(rec).idempotency_key == s3_job.idempotency_key
    assert msg_job.output.key == "batch/out/digits/x" and msg_job.version == "1"
    assert job_from_message({"model": "digits", "input": f"s3://{BUCKET}/a.jsonl", "continuation": 3}
                            ).idempotency_key != job_from_message({"model": "digits", "input": f"s3://{BUCKET}/a.jsonl"}
                                                                  ).idempotency_key
    # And bad names, keys and shapes are refused with a reason
    with pytest.raises(InvalidNameError):
        job_from_message({"model": "../etc", "input": f"s3://{BUCKET}/a.jsonl"})
    with pytest.raises(BatchInputError, match="not batch/in"):
        job_from_s3_record(s3_put_event(key="batch/in/x.jsonl", etag="e", size=1)["Records"][0])
    with pytest.raises(BatchInputError, match="job message"):
        job_from_message({"input": "s3://b/a.jsonl"})


def test_s3_test_event_is_acknowledged_without_a_job():
    assert specs_from_body(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET})) == []


def test_checkpoints_refuse_a_runner_that_fell_behind(aws):
    # Given a job state at part 2
    store = JobStore(TABLE)
    state = JobState(job_key="k", next_part=0)
    store.save(state, None)
    state.next_part = 2
    store.save(state, 0)
    # When a stale runner (which started from part 0) checkpoints, or the job is created twice
    # Then both are refused as conflicts, and the stored state is intact
    with pytest.raises(JobConflictError):
        store.save(JobState(job_key="k", next_part=1), 0)
    with pytest.raises(JobConflictError):
        store.save(JobState(job_key="k"), None)
    assert store.load("k").next_part == 2


def test_poison_records_are_reported_alone(aws, lambda_context):
    # Given a batch: a good job, an unknown model, a missing object, non-JSON, and S3's test event
    key = _put_jsonl(aws, "good")
    event = _event({"model": "digits", "input": f"s3://{BUCKET}/{key}"},
                   {"model": "nope", "input": f"s3://{BUCKET}/{key}", "output": f"s3://{BUCKET}/batch/out/n"},
                   {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/missing.jsonl"},
                   {"Event": "s3:TestEvent"})
    event["Records"].insert(3, {**event["Records"][0], "messageId": "m-raw", "body": "not json"})
    # When the handler processes it
    result = batch_inference.lambda_handler(event, lambda_context)
    # Then exactly the three poison messages are failed items, and the good job completed
    assert sorted(f["itemIdentifier"] for f in result["batchItemFailures"]) == ["m-raw", "m1", "m2"]
    assert json.loads(_outputs(aws, "batch/out/digits/good")["_SUCCESS"])["counts"]["output_lines"] == 10


def test_duplicate_delivery_while_the_first_runs_is_a_failed_item(aws, lambda_context):
    # Given a job whose first delivery is still running when a second one arrives
    key = _put_jsonl(aws, "dup")
    event = _event({"model": "digits", "input": f"s3://{BUCKET}/{key}"})
    inner = []

    def redeliver(stage: str, part: int) -> None:
        if stage == "checkpointed" and part == 0 and not inner:
            inner.append(batch_inference.lambda_handler(event, lambda_context))

    batch_jobs.after_part_hook = redeliver
    # When both are handled
    outer = batch_inference.lambda_handler(event, lambda_context)
    # Then the duplicate is reported as failed (SQS retries it later) and the first one completes
    assert inner == [{"batchItemFailures": [{"itemIdentifier": "m0"}]}]
    assert outer == {"batchItemFailures": []}
    assert len(_outputs(aws, "batch/out/digits/dup")) == 5  # 3 parts, errors.jsonl, _SUCCESS


def test_npz_job_crashing_after_a_checkpoint_resumes_to_identical_parts(aws, lambda_context):
    # Given a 10-row .npz with ids, read in chunks of 4 rows, and a reference run of it
    buf = io.BytesIO()
    np.savez(buf, input=ROWS, id=np.array([f"n{i}" for i in range(10)]))
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/arr.npz", Body=buf.getvalue())
    body = {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/arr.npz"}
    assert batch_inference.lambda_handler(_event(body), lambda_context) == {"batchItemFailures": []}

    def crash(stage: str, part: int) -> None:
        if stage == "checkpointed" and part == 1:
            raise RuntimeError("simulated crash")

    # When another run of it crashes after part 1 and is retried
    out = {**body, "output": f"s3://{BUCKET}/batch/out/crash-npz"}
    batch_jobs.after_part_hook = crash
    crashed = batch_inference.lambda_handler(_event(out), lambda_context)
    assert crashed["batchItemFailures"] == [{"itemIdentifier": "m0"}]
    batch_jobs.after_part_hook = None
    assert batch_inference.lambda_handler(_event(out), lambda_context) == {"batchItemFailures": []}
    # Then its parts equal the reference run's, with the ids from the archive
    ref, got = _outputs(aws, "batch/out/digits/arr"), _outputs(aws, "batch/out/crash-npz")
    assert [k for k in sorted(got) if k.startswith("part-")] == ["part-00000.jsonl", "part-00001.jsonl",
                                                               "part-00002.jsonl"]
    assert {k: v for k, v in got.items() if k != "_SUCCESS"} == {k: v for k, v in ref.items() if k != "_SUCCESS"}
    assert [json.loads(x)["id"] for x in got["part-00000.jsonl"].splitlines()] == ["n0", "n1", "n2", "n3"]
    assert json.loads(got["_SUCCESS"])["invocations"] == 2


def test_parquet_job_crashing_after_a_checkpoint_resumes_to_the_same_parquet_parts(aws, lambda_context):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # Given a 10-row Parquet file (a list column per input, and ids) read in chunks of 4 rows
    flat = pa.array(ROWS.reshape(-1))
    table = pa.table({"input": pa.ListArray.from_arrays(pa.array(np.arange(0, 641, 64, dtype=np.int32)), flat),
                      "id": pa.array([f"q{i}" for i in range(10)])})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=3)
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/tab.parquet", Body=buf.getvalue())
    body = {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/tab.parquet"}
    assert batch_inference.lambda_handler(_event(body), lambda_context) == {"batchItemFailures": []}

    def crash(stage: str, part: int) -> None:
        if stage == "checkpointed" and part == 0:
            raise RuntimeError("simulated crash")

    # When another run of it crashes after part 0 and is retried
    out = {**body, "output": f"s3://{BUCKET}/batch/out/crash-parquet"}
    batch_jobs.after_part_hook = crash
    assert batch_inference.lambda_handler(_event(out), lambda_context)["batchItemFailures"]
    batch_jobs.after_part_hook = None
    assert batch_inference.lambda_handler(_event(out), lambda_context) == {"batchItemFailures": []}
    # Then the parts are Parquet, equal to the reference run's, with every row's label in order
    ref, got = _outputs(aws, "batch/out/digits/tab"), _outputs(aws, "batch/out/crash-parquet")
    parts = sorted(k for k in got if k.startswith("part-"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert {k: got[k] for k in parts} == {k: ref[k] for k in parts}
    rows = [pq.read_table(io.BytesIO(got[k])).to_pydict() for k in parts]
    assert [i for r in rows for i in r["id"]] == [f"q{i}" for i in range(10)]
    assert [n for r in rows for n in r["line"]] == list(range(1, 11))
    assert all(len(p) == 10 for r in rows for p in r["probabilities"])


def test_direct_s3_event_runs_the_job_and_a_replaced_object_is_refused(aws, lambda_context):
    # Given an object, and an S3 event for it with its real eTag
    key = _put_jsonl(aws, "direct")
    etag = aws["s3"].head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
    # When the event is invoked directly (tierserve invoke -e events/s3_put.json)
    result = batch_inference.lambda_handler(s3_put_event(key=key, etag=etag, size=1), lambda_context)
    # Then the job's summary comes back
    assert result["jobs"][0]["status"] == "completed" and result["jobs"][0]["counts"]["rows"] == 10
    # And an event for an older version of a replaced object is refused, not run on the new content
    with pytest.raises(BatchInputError, match="replaced"):
        batch_inference.lambda_handler(s3_put_event(key=key, etag="0" * 32, size=1), lambda_context)


def test_unknown_model_message_names_the_models_served(aws, lambda_context):
    key = _put_jsonl(aws, "unknown")
    with pytest.raises(ModelNotFoundError, match="models served here: digits"):
        batch_jobs.run_job(job_from_message({"model": "nope", "input": f"s3://{BUCKET}/{key}"}), lambda_context)


class _Gpu:
    tier = "gpu"

    def __init__(self):
        self.batches = []

    def infer(self, model, call, timeout_s=None):
        from tierserve.calls import Reply
        from tierserve.codec import tensor_from_numpy
        from tierserve.types import InferResponse

        x = call.request().inputs[0].data
        self.batches.append(x.shape[0])
        return Reply(InferResponse(model.name, model.version, [tensor_from_numpy("y", x.sum(axis=1, keepdims=True))]))

    def ready(self, model=None):
        return True


def test_gpu_models_are_scored_on_the_gpu_tier_through_the_dispatcher():
    # Given a GPU-only model and a dispatcher whose GPU tier is up
    from tierserve.manifest import ModelVersion, TensorSpec
    from tierserve.routing import size_aware
    from tierserve.tiering import TierDispatcher

    gpu = _Gpu()
    mv = ModelVersion("g", "1", (TensorSpec("x", "FP32", (-1, 3)),), (TensorSpec("y", "FP32", (-1, 1)),), {}, "fp32",
                      targets=("gpu",), max_batch_size=4)
    dispatcher = TierDispatcher(cpu=None, gpu=gpu, policy=size_aware)
    # When a 10-row chunk is scored
    out = dispatcher.score(mv, {"x": np.arange(30, dtype=np.float32).reshape(10, 3)})
    # Then the GPU tier got the chunk (Triton's backend splits it by max_batch_size), outputs in row order
    assert gpu.batches == [10]
    np.testing.assert_array_equal(out["y"][:, 0], np.arange(30, dtype=np.float32).reshape(10, 3).sum(axis=1))


def test_poll_queue_forever_plays_the_sqs_trigger_until_stopped(aws):
    # Given a job message and a poison message in the events queue
    import threading
    import time

    from tierserve_tools.batch import poll_queue_forever

    key = _put_jsonl(aws, "polled")
    aws["sqs"].send_message(QueueUrl=aws["queue_url"], MessageBody=json.dumps({"model": "digits",
                                                                               "input": f"s3://{BUCKET}/{key}"}))
    aws["sqs"].send_message(QueueUrl=aws["queue_url"], MessageBody="not json")
    stop = threading.Event()
    # When the poller runs in a thread until the job's _SUCCESS appears
    t = threading.Thread(target=poll_queue_forever, args=(aws["queue_url"], batch_inference.lambda_handler, stop),
                         kwargs={"sqs_client": aws["sqs"], "wait_s": 0}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while "_SUCCESS" not in _outputs(aws, "batch/out/digits/polled") and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join(timeout=10)
    # Then it stopped, the good message was deleted, and the poison one is still in flight (not deleted)
    assert not t.is_alive()
    attrs = aws["sqs"].get_queue_attributes(QueueUrl=aws["queue_url"], AttributeNames=["All"])["Attributes"]
    assert int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"]) == 1


def test_versioned_bucket_scores_the_version_the_event_names(aws, lambda_context):
    # Given a versioned bucket (as template.yaml's) where the input was overwritten after its event
    aws["s3"].put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    key = _put_jsonl(aws, "versioned", n=3)
    first = aws["s3"].head_object(Bucket=BUCKET, Key=key)
    _put_jsonl(aws, "versioned", n=9)
    event = s3_put_event(key=key, etag=first["ETag"].strip('"'), size=1)
    event["Records"][0]["s3"]["object"]["versionId"] = first["VersionId"]
    # When the first version's event is handled
    result = batch_inference.lambda_handler(event, lambda_context)
    # Then the job scored that version (3 rows), not the newer object
    assert result["jobs"][0]["counts"]["rows"] == 3
    assert result["jobs"][0]["input_version"]["version_id"] == first["VersionId"]


def test_a_part_written_on_the_writer_thread_is_never_followed_by_the_next_before_its_checkpoint(aws, lambda_context):
    # Given a 10-row .npz (parts of 4 rows, written on PartWriter's thread while the next chunk is scored)
    buf = io.BytesIO()
    np.savez(buf, input=ROWS)
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/order.npz", Body=buf.getvalue())
    body = {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/order.npz",
            "output": f"s3://{BUCKET}/batch/out/order"}
    seen: list[tuple[str, int, list[str]]] = []

    def crash(stage: str, part: int) -> None:
        seen.append((stage, part, sorted(_outputs(aws, "batch/out/order"))))
        if stage == "written" and part == 1:
            raise RuntimeError("simulated crash before part 1's checkpoint")

    # When the job crashes after writing part 1, before checkpointing it, and is retried
    batch_jobs.after_part_hook = crash
    assert batch_inference.lambda_handler(_event(body), lambda_context)["batchItemFailures"]
    after_crash = sorted(_outputs(aws, "batch/out/order"))
    batch_jobs.after_part_hook = None
    assert batch_inference.lambda_handler(_event(body), lambda_context) == {"batchItemFailures": []}
    # Then each stage saw only the parts up to its own, part 2 was never written before the crash
    assert seen == [("written", 0, ["part-00000.jsonl"]), ("checkpointed", 0, ["part-00000.jsonl"]),
                    ("written", 1, ["part-00000.jsonl", "part-00001.jsonl"])]
    assert after_crash == ["part-00000.jsonl", "part-00001.jsonl"]
    # And the retry resumed at part 1 (two invocations) and finished every row, in order
    got = _outputs(aws, "batch/out/order")
    summary = json.loads(got["_SUCCESS"])
    assert summary["invocations"] == 2 and summary["counts"]["rows"] == 10
    assert [json.loads(x)["line"] for k in sorted(got) if k.startswith("part-") for x in got[k].splitlines()] == \
        list(range(1, 11))
