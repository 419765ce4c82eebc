"""Batch fan-out (tierserve.batch.shards) on in-process moto: planning aligned to lines (and rows), shards as
job messages, the counter that closes the job once, the input's order kept, a failing shard retried alone,
redeliveries, bad messages refused, concurrent completions counted once, and the job's item within DynamoDB's
size. (Crashes while the last shard closes the job: test_closing.py.)"""

from __future__ import annotations

import io
import itertools
import json
import random

import numpy as np
import pytest

from tests.support.batch_jobs import BODY_ROWS, drain, jsonl_body, outputs, sqs_batch
from tests.unit.batch.conftest import BUCKET, TABLE
from tierserve.batch import runner as batch_runner
from tierserve.batch.locations import BatchInputError, S3Location
from tierserve.batch.shards import COUNTERS, MAX_SHARDS, Shard, count_rows, plan, plan_jsonl, shard_done
from tierserve.batch.spec import job_from_message
from tierserve.batch.state import JobState, JobStore, job_item_id
from tierserve.handlers import batch_inference


def _lines(parts: dict[str, bytes]) -> list[bytes]:
    return [ln for k in sorted(parts) if k.startswith("part-") for ln in parts[k].splitlines()]


def _check_plan(data: bytes, shards: list[Shard]) -> None:
    """Contiguous, covering the object, each shard starting where a line starts, numbered as the input is."""
    assert shards[0].start == 0 and shards[0].line == 1 and shards[-1].stop == len(data)
    assert all(a.stop == b.start for a, b in itertools.pairwise(shards))
    starts = [0] + [i + 1 for i, c in enumerate(data) if c == 10 and i + 1 < len(data)]
    for sh in shards:
        assert sh.start in starts and sh.line == starts.index(sh.start) + 1
    assert [s.index for s in shards] == list(range(len(shards))) and {s.count for s in shards} == {len(shards)}


def test_jsonl_boundaries_fall_on_line_starts_and_carry_line_numbers(aws):
    # Given an object with short, blank and long lines
    data = b"a\n" + b"b" * 50 + b"\nccc\n\ndddd\n" + b"e" * 30 + b"\nf\n"
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/x.jsonl", Body=data)
    loc = S3Location(BUCKET, "batch/in/digits/x.jsonl")
    # When it is planned into 2..40 shards
    for n in (2, 3, 4, 7, 40):
        shards = plan_jsonl(aws["s3"], loc, {}, len(data), n)
        # Then every plan is contiguous and aligned to lines; long lines merge shards, never split a line
        _check_plan(data, shards)
        assert len(shards) <= n
    assert Shard.from_json(shards[1].to_json()) == shards[1]


def test_jsonl_plans_of_random_objects_match_a_line_by_line_count(aws):
    # Given seeded random objects: lines of 0..300 bytes, with or without a last newline
    rng = random.Random(3)
    for trial in range(20):
        lines = [b"x" * rng.choice([0, 1, 5, 40, 300]) for _ in range(rng.randint(1, 60))]
        data = b"\n".join(lines) + (b"\n" if trial % 2 else b"")
        if not data:
            continue
        key = f"batch/in/digits/r{trial}.jsonl"
        aws["s3"].put_object(Bucket=BUCKET, Key=key, Body=data)
        # When it is planned into a random number of shards
        n = rng.randint(2, 30)
        shards = plan_jsonl(aws["s3"], S3Location(BUCKET, key), {}, len(data), n)
        # Then the plan agrees with counting the lines one by one
        _check_plan(data, shards)


def test_npz_and_parquet_inputs_split_into_row_ranges_read_from_their_headers(aws, digits_store):
    from tierserve.manifest import Manifest

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    model = Manifest.loads((digits_store / "manifest.json").read_text()).resolve("digits")
    # Given a compressed 37-row .npz and a 37-row Parquet file
    buf = io.BytesIO()
    np.savez_compressed(buf, input=np.zeros((37, 64), np.float32), id=np.arange(37))
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/a.npz", Body=buf.getvalue())
    table = pa.table({"input": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(37 * 64, np.float32)), 64)})
    pbuf = io.BytesIO()
    pq.write_table(table, pbuf, row_group_size=10)
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/a.parquet", Body=pbuf.getvalue())
    inputs = {"batch/in/digits/a.npz": len(buf.getvalue()), "batch/in/digits/a.parquet": len(pbuf.getvalue())}
    for key, size in inputs.items():
        loc = S3Location(BUCKET, key)
        # When their rows are counted and they are planned into 4 shards
        assert count_rows(aws["s3"], loc, {}, key.rsplit(".", 1)[1], model, size) == 37
        shards = plan(aws["s3"], loc, {}, size, model, 1 << 30, 10**9, 4)
        # Then the row ranges cover the rows once, in order
        assert [(s.start, s.stop) for s in shards] == [(0, 9), (9, 18), (18, 27), (27, 37)]
    # And a file that is not an archive is refused with the reason
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/bad.npz", Body=b"not a zip")
    with pytest.raises(BatchInputError, match=r"not a readable \.npz"):
        count_rows(aws["s3"], S3Location(BUCKET, "batch/in/digits/bad.npz"), {}, "npz", model, 9)


def _fan(aws, lambda_context, name: str, body: bytes, shards: int, seed: int, ext: str = "jsonl") -> dict[str, bytes]:
    """Run a job asked to fan out, its shard messages handled in a seeded random order; its outputs."""
    aws["s3"].put_object(Bucket=BUCKET, Key=f"batch/in/digits/{name}.{ext}", Body=body)
    job = {"model": "digits", "version": "1", "input": f"s3://{BUCKET}/batch/in/digits/{name}.{ext}", "shards": shards}
    assert batch_inference.lambda_handler(sqs_batch(job), lambda_context) == {"batchItemFailures": []}
    shard_messages = drain(aws, shuffle_seed=seed)
    assert sorted(m["shard"]["index"] for m in shard_messages) == list(range(shards))
    assert outputs(aws, f"batch/out/digits/{name}") == {}  # nothing written by the job itself
    for i, msg in enumerate(shard_messages):
        assert batch_inference.lambda_handler(sqs_batch(msg), lambda_context) == {"batchItemFailures": []}
        done = outputs(aws, f"batch/out/digits/{name}")
        assert ("_SUCCESS" in done) == (i == len(shard_messages) - 1)  # only once every shard is in
    return outputs(aws, f"batch/out/digits/{name}")


def test_a_job_that_fans_out_writes_the_inputs_lines_in_order_whoever_runs_the_shards(aws, lambda_context):
    # Given the same input scored as one job, and twice as a job fanned out into 5 shards run in other orders
    body = jsonl_body(40, bad=frozenset({11, 30}))
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/whole.jsonl", Body=body)
    batch_inference.lambda_handler(sqs_batch({"model": "digits", "version": "1",
                                           "input": f"s3://{BUCKET}/batch/in/digits/whole.jsonl"}), lambda_context)
    whole = outputs(aws, "batch/out/digits/whole")
    first = _fan(aws, lambda_context, "fan-a", body, 5, seed=7)
    second = _fan(aws, lambda_context, "fan-b", body, 5, seed=11)
    # Then the two fan-outs are byte-identical (the same shards, the same chunks), whatever the order
    assert {k: v for k, v in first.items() if k != "_SUCCESS"} == {k: v for k, v in second.items() if k != "_SUCCESS"}
    # And they hold the input's lines in order with their line numbers, as one invocation writes them
    # (the scores agree to float32 rounding: a chunk's rows are batched differently)
    got, want = [json.loads(x) for x in _lines(first)], [json.loads(x) for x in _lines(whole)]
    assert [(g["id"], g["line"], g["outputs"][0]["data"]) for g in got] == \
        [(w["id"], w["line"], w["outputs"][0]["data"]) for w in want]
    np.testing.assert_allclose([g["outputs"][1]["data"] for g in got], [w["outputs"][1]["data"] for w in want],
                               rtol=1e-5, atol=1e-7)
    # And the errors of every shard are merged once, in the input's order
    assert first["errors.jsonl"] == whole["errors.jsonl"]
    assert [json.loads(x)["line"] for x in first["errors.jsonl"].splitlines()] == [12, 31]
    success = json.loads(first["_SUCCESS"])
    assert success["shards"] == 5 and success["counts"] == json.loads(whole["_SUCCESS"])["counts"]
    assert success["invocations"] == 6  # the planning one and one a shard
    assert all(k.count("-") == 2 for k in first if k.startswith("part-"))  # part-SHARD-PART
    # And no work fragment is left behind
    assert not aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix="batch/work/").get("Contents")


def test_an_npz_job_fans_out_into_row_ranges_with_the_same_parts_as_one_run(aws, lambda_context):
    # Given a 30-row .npz with ids, scored as one job and as 3 shards
    buf = io.BytesIO()
    np.savez(buf, input=BODY_ROWS[:30], id=np.array([f"n{i}" for i in range(30)]))
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/arr.npz", Body=buf.getvalue())
    batch_inference.lambda_handler(sqs_batch({"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/arr.npz"}),
                                   lambda_context)
    whole = outputs(aws, "batch/out/digits/arr")
    fanned = _fan(aws, lambda_context, "arr-fan", buf.getvalue(), 3, seed=1, ext="npz")
    # Then the rows come out once each, in order, numbered from 1
    rows = [json.loads(x) for x in _lines(fanned)]
    assert [r["id"] for r in rows] == [f"n{i}" for i in range(30)] and [r["line"] for r in rows] == list(range(1, 31))
    assert [json.loads(x)["outputs"][0] for x in _lines(whole)] == [r["outputs"][0] for r in rows]


def test_a_failing_shard_is_retried_alone_and_every_shard_counts_once(aws, lambda_context):
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/retry.jsonl", Body=jsonl_body(30))
    batch_inference.lambda_handler(sqs_batch({"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/retry.jsonl",
                                           "shards": 3}), lambda_context)
    msgs = sorted(drain(aws), key=lambda m: m["shard"]["index"])
    # Given shard 1 crashes after writing its first part (before its checkpoint)
    calls = {"n": 0}

    def crash(stage, part):
        if stage == "written" and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("the function died")

    batch_runner.after_part_hook = crash
    result = batch_inference.lambda_handler(sqs_batch(msgs[1]), lambda_context)
    batch_runner.after_part_hook = None
    assert result == {"batchItemFailures": [{"itemIdentifier": "m0"}]}  # only that message fails
    # When the other shards run, shard 0's message is delivered twice, and shard 1's comes back
    for msg in (msgs[0], msgs[2], msgs[0]):
        assert batch_inference.lambda_handler(sqs_batch(msg), lambda_context) == {"batchItemFailures": []}
    assert "_SUCCESS" not in outputs(aws, "batch/out/digits/retry")
    assert batch_inference.lambda_handler(sqs_batch(msgs[1]), lambda_context) == {"batchItemFailures": []}
    # Then the job closes once, with every line once and every shard counted once
    out = outputs(aws, "batch/out/digits/retry")
    ids = [json.loads(ln)["id"] for ln in _lines(out)]
    assert ids == [f"r{i}" for i in range(30) if i % 13 != 7]
    success = json.loads(out["_SUCCESS"])
    assert success["counts"]["output_lines"] == len(ids) and success["counts"]["lines"] == 30
    item = aws["ddb"].get_item(TableName=TABLE, Key={"id": {"S": _parent_id("retry")}})["Item"]
    assert sorted(int(x) for x in item["done_shards"]["NS"]) == [0, 1, 2] and item["status"]["S"] == "completed"


def _parent_id(name: str) -> str:
    state = JobStore(TABLE).table.scan()["Items"]
    keys = [s["job_key"] for s in state if s.get("status") in ("sharded", "completed") and "#shard" not in
            s.get("job_key", "") and f"/{name}.jsonl@" in s.get("job_key", "")]
    assert len(keys) == 1
    return job_item_id(keys[0])


def test_redelivered_job_and_shard_messages_change_nothing(aws, lambda_context):
    # Given a job fanned out into 3 shards, all of them done
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/again.jsonl", Body=jsonl_body(30, bad=frozenset({3})))
    job = {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/again.jsonl", "shards": 3}
    batch_inference.lambda_handler(sqs_batch(job), lambda_context)
    msgs = drain(aws)
    for msg in msgs:
        batch_inference.lambda_handler(sqs_batch(msg), lambda_context)
    before = outputs(aws, "batch/out/digits/again")
    # When the job message and every shard message are delivered again, after the idempotency records expired
    for item in JobStore(TABLE).table.scan()["Items"]:
        if not item["id"].startswith("job#"):
            JobStore(TABLE).table.delete_item(Key={"id": item["id"]})
    assert batch_inference.lambda_handler(sqs_batch(job, *msgs), lambda_context) == {"batchItemFailures": []}
    # Then nothing was sent or written again
    assert drain(aws) == []
    assert outputs(aws, "batch/out/digits/again") == before


def test_a_job_message_redelivered_while_fanning_out_sends_the_same_shards(aws, lambda_context):
    # Given a job whose first delivery saved its plan but died before the shard messages went out
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/half.jsonl", Body=jsonl_body(30))
    job = {"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/half.jsonl", "shards": 4}
    real = batch_runner._fan_out

    def die(*args, **kwargs):
        raise RuntimeError("the function died while fanning out")

    batch_runner._fan_out = die
    try:
        assert batch_inference.lambda_handler(sqs_batch(job), lambda_context)["batchItemFailures"]
    finally:
        batch_runner._fan_out = real
    assert drain(aws) == []
    # When the message comes back
    assert batch_inference.lambda_handler(sqs_batch(job), lambda_context) == {"batchItemFailures": []}
    msgs = drain(aws)
    # Then the stored plan's shards go out (the plan is not recomputed), and the job completes from them
    assert [m["shard"]["index"] for m in sorted(msgs, key=lambda m: m["shard"]["index"])] == [0, 1, 2, 3]
    for msg in msgs:
        batch_inference.lambda_handler(sqs_batch(msg), lambda_context)
    assert json.loads(outputs(aws, "batch/out/digits/half")["_SUCCESS"])["counts"]["lines"] == 30


def test_a_small_input_does_not_fan_out(aws, lambda_context):
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/small.jsonl", Body=jsonl_body(8))
    result = batch_inference.lambda_handler(sqs_batch({"model": "digits",
                                                    "input": f"s3://{BUCKET}/batch/in/digits/small.jsonl"}),
                                            lambda_context)
    assert result == {"batchItemFailures": []}
    assert drain(aws) == []
    assert "part-00000.jsonl" in outputs(aws, "batch/out/digits/small")


def test_shard_bytes_fans_out_an_s3_event_sized_job(runtime_env, digits_store, lambda_context):
    from tests.support.batch_aws import mocked_batch_aws

    # Given SHARD_BYTES of 1 KB and a 5 KB input
    with mocked_batch_aws(runtime_env, digits_store, CHUNK_ROWS="4", SHARD_BYTES="1024") as aws:
        body = jsonl_body(25)
        aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/sized.jsonl", Body=body)
        # When a job message names it without "shards"
        batch_inference.lambda_handler(sqs_batch({"model": "digits",
                                               "input": f"s3://{BUCKET}/batch/in/digits/sized.jsonl"}), lambda_context)
        # Then it is cut into about one shard a KB
        assert len(drain(aws)) == -(-len(body) // 1024)


@pytest.mark.parametrize(("body", "reason"), [
    ({"shards": 0}, "whole number from 1 to 1000"),
    ({"shards": True}, "whole number from 1 to 1000"),
    ({"shards": 1001}, "whole number from 1 to 1000"),
    ({"shards": "4"}, "whole number from 1 to 1000"),
    ({"shards": 2, "continuation": 1}, "cannot carry it"),
    ({"shard": {"index": 3, "count": 2, "start": 0, "stop": 1, "line": 1}}, "out of range"),
    ({"shard": {"index": 0}}, "index"),
    ({"shard": "x"}, "index"),
    ({"shard": {"index": 0, "count": 2, "start": 5, "stop": 5, "line": 1}}, "out of range"),
])
def test_bad_fan_out_fields_are_refused_with_the_reason(body, reason):
    with pytest.raises(BatchInputError, match=reason):
        job_from_message({"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/x.jsonl", **body})


def test_a_shard_message_that_matches_no_plan_is_poison(aws, lambda_context):
    # Given a job fanned out into 3 shards
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/forge.jsonl", Body=jsonl_body(30))
    batch_inference.lambda_handler(sqs_batch({"model": "digits", "input": f"s3://{BUCKET}/batch/in/digits/forge.jsonl",
                                           "shards": 3}), lambda_context)
    real = drain(aws)[0]
    # When shard messages are forged: another range, another count, a job that never fanned out
    moved = {**real, "shard": {**real["shard"], "stop": real["shard"]["stop"] + 1}}
    recount = {**real, "shard": {**real["shard"], "count": 4}}
    aws["s3"].put_object(Bucket=BUCKET, Key="batch/in/digits/never.jsonl", Body=jsonl_body(30))
    never = {**real, "input": f"s3://{BUCKET}/batch/in/digits/never.jsonl", "input_version": {}}
    # Then each is refused with the reason, and writes nothing
    for forged in (moved, recount, never):
        spec = job_from_message(forged)
        with pytest.raises(BatchInputError, match="does not match a plan"):
            batch_runner.run_job(spec, lambda_context)
    assert batch_inference.lambda_handler(sqs_batch(moved), lambda_context)["batchItemFailures"]
    assert not aws["s3"].list_objects_v2(Bucket=BUCKET, Prefix="batch/out/").get("Contents")


def test_the_jobs_item_at_max_shards_fits_dynamodb_items_with_room_to_spare(aws):
    # Given a job over a 50 TB input planned into MAX_SHARDS shards (the largest numbers a plan holds)
    size = 50 * 10**12
    shards = [Shard(i, MAX_SHARDS, size * i // MAX_SHARDS, size * (i + 1) // MAX_SHARDS, 10**11 + i)
              for i in range(MAX_SHARDS)]
    parent = JobState(job_key="s3://b/batch/in/m/" + "x" * 900 + ".jsonl@etag->s3://b/batch/out/m/" + "x" * 900,
                      status="sharded", model="m" * 64, version="v" * 64, variant_sha256="f" * 64,
                      input_version={"version_id": "v" * 64, "etag": "e" * 34}, input_size=size, chunk_rows=4096,
                      started_at=1.7e9, invocations=1, shards=MAX_SHARDS, shard_plan=[s.bounds() for s in shards])
    JobStore(TABLE).save(parent, None)
    # When every shard but the last is in (one update) and the last one is counted with the largest figures
    table = JobStore(TABLE).table
    table.update_item(Key={"id": parent.item_id}, UpdateExpression="ADD done_shards :s",
                      ExpressionAttributeValues={":s": set(range(MAX_SHARDS - 1))})
    figures = {k: 10**12 for k in COUNTERS} | {k: 123456.789012 for k in ("read_s", "infer_s", "write_s")}
    closes, item = shard_done(table, parent.item_id, shards[-1], figures)
    # Then the item was accepted (moto enforces DynamoDB's 400 KB) and it is under a quarter of the limit
    assert closes and len(item["done_shards"]) == MAX_SHARDS
    assert _dynamodb_size(table.get_item(Key={"id": parent.item_id})["Item"]) < 100_000  # about 39 KB


def _dynamodb_size(v, name: str = "") -> int:
    """DynamoDB's item size rules: UTF-8 names and strings; numbers about one byte per two digits plus one;
    one byte a list or map element plus three a container; sets as their members."""
    from decimal import Decimal

    size = len(name.encode())
    if isinstance(v, str):
        return size + len(v.encode())
    if isinstance(v, bool) or v is None:
        return size + 1
    if isinstance(v, (int, float, Decimal)):
        return size + len(str(v).replace(".", "").lstrip("-0")) // 2 + 2
    if isinstance(v, dict):
        return size + 3 + sum(_dynamodb_size(x, k) + 1 for k, x in v.items())
    if isinstance(v, (list, set)):
        return size + 3 + sum(_dynamodb_size(x) + 1 for x in v)
    raise TypeError(type(v))


def _sharded_parent(n: int) -> JobState:
    parent = JobState(job_key=f"s3://b/batch/in/m/concurrent-{n}.jsonl@e->s3://b/batch/out/m/c", status="sharded",
                      model="m", version="1", started_at=1.7e9, invocations=1, shards=n,
                      shard_plan=[[i, i + 1, i + 1] for i in range(n)])
    JobStore(TABLE).save(parent, None)
    return parent


def test_concurrent_and_redelivered_shard_completions_count_every_shard_once_and_one_closes(aws):
    # Given a job of 16 shards, and DynamoDB's atomic UpdateItem (moto made atomic, as `tierserve serve` runs it)
    import threading

    from tierserve_tools.moto_ext import patch

    patch()
    n = 16
    parent = _sharded_parent(n)
    table = JobStore(TABLE).table
    figures = {i: {"lines": 50 + i, "lines_ok": 49 + i, "rows_ok": 49 + i, "lines_error": 1, "lines_blank": 0,
                   "invocations": 1, "parts": 2, "read_s": 0.5, "infer_s": 0.25, "write_s": 0.125} for i in range(n)}
    # When every shard completes at once, each delivered twice (a redelivery racing its first delivery)
    start = threading.Barrier(2 * n)
    closers: list[int] = []
    failures: list[BaseException] = []

    def complete(i: int) -> None:
        try:
            start.wait(10)
            closes, _ = shard_done(table, parent.item_id, Shard(i, n, i, i + 1, i + 1), figures[i])
            if closes:
                closers.append(i)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=complete, args=(i % n,)) for i in range(2 * n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Then every shard is counted once, in every counter, and one shard (perhaps twice: a redelivery) closes
    assert not failures
    item = table.get_item(Key={"id": parent.item_id}, ConsistentRead=True)["Item"]
    assert sorted(int(i) for i in item["done_shards"]) == list(range(n))
    for k in ("lines", "lines_ok", "rows_ok", "lines_error", "parts"):
        assert int(item[k]) == sum(f[k] for f in figures.values()), k
    assert int(item["invocations"]) == 1 + n
    assert len(set(closers)) == 1


def test_a_refused_count_that_the_job_does_not_hold_is_retried_never_taken_as_counted():
    # Given a table that refuses the count's condition, yet whose item does not hold the shard
    from botocore.exceptions import ClientError

    from tierserve.batch.state import JobConflictError

    class Refusing:
        def update_item(self, **_):
            raise ClientError({"Error": {"Code": "ConditionalCheckFailedException", "Message": "refused"}},
                              "UpdateItem")

        def get_item(self, **_):
            return {"Item": {"id": "job#x", "shards": 2, "done_shards": {0}, "lines": 10}}

    # When shard 1 is counted, Then it is a conflict to retry (the delivery returns), not "already counted"
    with pytest.raises(JobConflictError, match="shard 1"):
        shard_done(Refusing(), "job#x", Shard(1, 2, 5, 10, 3), dict.fromkeys(
            ("lines", "lines_ok", "rows_ok", "lines_error", "lines_blank", "invocations", "parts", "read_s",
             "infer_s", "write_s"), 1))
