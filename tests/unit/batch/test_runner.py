"""tierserve.batch.runner: jobs run, crash and resume to identical parts, on in-process moto (mock_aws)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tests.support.batch_jobs import JOB_ROWS, outputs, put_jsonl, sqs_batch
from tests.support.make_batch_events import s3_put_event
from tests.unit.batch.conftest import BUCKET
from tierserve.batch import runner as batch_runner
from tierserve.batch.spec import job_from_message
from tierserve.errors import ModelNotFoundError
from tierserve.handlers import batch_inference


def test_npz_job_crashing_after_a_checkpoint_resumes_to_identical_parts(aws, lambda_context):
    # Given a 10-row .npz with ids, read in chunks of 4 rows, and a reference run of it
    buf = io.BytesIO()
    np.savez(buf, input=JOB_ROWS, id=np.array([f"n{i}" for i in range(10)]))
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/arr.npz", Body=buf.getvalue())
    body = {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/arr.npz"}
    assert batch_inference.lambda_handler(sqs_batch(body), lambda_context) == {"batchItemFailures": []}

    def crash(stage: str, part: int) -> None:
        if stage == "checkpointed" and part == 1:
            raise RuntimeError("simulated crash")

    # When another run of it crashes after part 1 and is retried
    out = {**body, "output": f"s3://{BUCKET}/batch/out/crash-npz"}
    batch_runner.after_part_hook = crash
    crashed = batch_inference.lambda_handler(sqs_batch(out), lambda_context)
    assert crashed["batchItemFailures"] == [{"itemIdentifier": "m0"}]
    batch_runner.after_part_hook = None
    assert batch_inference.lambda_handler(sqs_batch(out), lambda_context) == {"batchItemFailures": []}
    # Then its parts equal the reference run's, with the ids from the archive
    ref, got = outputs(aws, "batch/out/digits/arr"), outputs(aws, "batch/out/crash-npz")
    assert [k for k in sorted(got) if k.startswith("part-")] == ["part-00000.jsonl", "part-00001.jsonl",
                                                               "part-00002.jsonl"]
    assert {k: v for k, v in got.items() if k != "_SUCCESS"} == {k: v for k, v in ref.items() if k != "_SUCCESS"}
    assert [json.loads(x)["id"] for x in got["part-00000.jsonl"].splitlines()] == ["n0", "n1", "n2", "n3"]
    assert json.loads(got["_SUCCESS"])["invocations"] == 2


def test_parquet_job_crashing_after_a_checkpoint_resumes_to_the_same_parquet_parts(aws, lambda_context):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # Given a 10-row Parquet file (a list column per input, and ids) read in chunks of 4 rows
    flat = pa.array(JOB_ROWS.reshape(-1))
    table = pa.table({"input": pa.ListArray.from_arrays(pa.array(np.arange(0, 641, 64, dtype=np.int32)), flat),
                      "id": pa.array([f"q{i}" for i in range(10)])})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=3)
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/tab.parquet", Body=buf.getvalue())
    body = {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/tab.parquet"}
    assert batch_inference.lambda_handler(sqs_batch(body), lambda_context) == {"batchItemFailures": []}

    def crash(stage: str, part: int) -> None:
        if stage == "checkpointed" and part == 0:
            raise RuntimeError("simulated crash")

    # When another run of it crashes after part 0 and is retried
    out = {**body, "output": f"s3://{BUCKET}/batch/out/crash-parquet"}
    batch_runner.after_part_hook = crash
    assert batch_inference.lambda_handler(sqs_batch(out), lambda_context)["batchItemFailures"]
    batch_runner.after_part_hook = None
    assert batch_inference.lambda_handler(sqs_batch(out), lambda_context) == {"batchItemFailures": []}
    # Then the parts are Parquet, equal to the reference run's, with every row's label in order
    ref, got = outputs(aws, "batch/out/digits/tab"), outputs(aws, "batch/out/crash-parquet")
    parts = sorted(k for k in got if k.startswith("part-"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert {k: got[k] for k in parts} == {k: ref[k] for k in parts}
    rows = [pq.read_table(io.BytesIO(got[k])).to_pydict() for k in parts]
    assert [i for r in rows for i in r["id"]] == [f"q{i}" for i in range(10)]
    assert [n for r in rows for n in r["line"]] == list(range(1, 11))
    assert all(len(p) == 10 for r in rows for p in r["probabilities"])


def test_unknown_model_message_names_the_models_served(aws, lambda_context):
    key = put_jsonl(aws, "unknown")
    with pytest.raises(ModelNotFoundError, match="models served here: digits"):
        batch_runner.run_job(job_from_message({"model": "nope", "input": f"s3://{BUCKET}/{key}"}), lambda_context)


class _Gpu:
    tier = "gpu"

    def __init__(self):
        self.batches = []

    def infer(self, model, call, timeout_s=None):
        from tierserve.protocol.calls import Reply
        from tierserve.protocol.messages import InferResponse
        from tierserve.protocol.tensors import tensor_from_numpy

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


def test_versioned_bucket_scores_the_version_the_event_names(aws, lambda_context):
    # Given a versioned bucket (as template.yaml's) where the input was overwritten after its event
    aws["s3"].put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    key = put_jsonl(aws, "versioned", n=3)
    first = aws["s3"].head_object(Bucket=BUCKET, Key=key)
    put_jsonl(aws, "versioned", n=9)
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
    np.savez(buf, input=JOB_ROWS)
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/order.npz", Body=buf.getvalue())
    body = {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/order.npz",
            "output": f"s3://{BUCKET}/batch/out/order"}
    seen: list[tuple[str, int, list[str]]] = []

    def crash(stage: str, part: int) -> None:
        seen.append((stage, part, sorted(outputs(aws, "batch/out/order"))))
        if stage == "written" and part == 1:
            raise RuntimeError("simulated crash before part 1's checkpoint")

    # When the job crashes after writing part 1, before checkpointing it, and is retried
    batch_runner.after_part_hook = crash
    assert batch_inference.lambda_handler(sqs_batch(body), lambda_context)["batchItemFailures"]
    after_crash = sorted(outputs(aws, "batch/out/order"))
    batch_runner.after_part_hook = None
    assert batch_inference.lambda_handler(sqs_batch(body), lambda_context) == {"batchItemFailures": []}
    # Then each stage saw only the parts up to its own, part 2 was never written before the crash
    assert seen == [("written", 0, ["part-00000.jsonl"]), ("checkpointed", 0, ["part-00000.jsonl"]),
                    ("written", 1, ["part-00000.jsonl", "part-00001.jsonl"])]
    assert after_crash == ["part-00000.jsonl", "part-00001.jsonl"]
    # And the retry resumed at part 1 (two invocations) and finished every row, in order
    got = outputs(aws, "batch/out/order")
    summary = json.loads(got["_SUCCESS"])
    assert summary["invocations"] == 2 and summary["counts"]["rows"] == 10
    assert [json.loads(x)["line"] for k in sorted(got) if k.startswith("part-") for x in got[k].splitlines()] == \
        list(range(1, 11))


def _listing(aws, prefix: str) -> list[tuple[str, str, object]]:
    listed = aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return [(o["Key"], o["ETag"], o["LastModified"]) for o in listed]


@pytest.mark.parametrize("versioned", [True, False], ids=["versioned", "unversioned"])
@pytest.mark.parametrize("pin", ["etag", "none"])
def test_an_s3_event_and_a_job_message_for_the_same_version_run_the_job_once(aws, lambda_context, versioned, pin):
    # Given a job run from its S3 event (versionId in a versioned bucket; the eTag unquoted, as S3 spells it there)
    if versioned:
        aws["s3"].put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    key = put_jsonl(aws, "twice", n=3)
    head = aws["s3"].head_object(Bucket=BUCKET, Key=key)
    event = s3_put_event(key=key, etag=head["ETag"].strip('"'), size=head["ContentLength"])
    if versioned:
        event["Records"][0]["s3"]["object"]["versionId"] = head["VersionId"]
    first = batch_inference.lambda_handler(event, lambda_context)["jobs"][0]
    assert first["status"] == "completed"
    before = _listing(aws, "batch/out/digits/twice")
    # When a job message names the same object version (its eTag as HeadObject quotes it, or nothing)
    body: dict = {"model": "digits", "input": f"s3://{BUCKET}/{key}"}
    if pin == "etag":
        body["input_version"] = {"etag": head["ETag"]}
    again = batch_runner.run_job(job_from_message(body), lambda_context)
    # Then it is the same job: already completed, nothing written again
    assert again["status"] == "already_completed", again
    assert _listing(aws, "batch/out/digits/twice") == before
