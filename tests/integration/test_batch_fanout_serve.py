"""A batch job that fans out, through `tierserve serve`: the job message's 16 shards go to the jobs queue, a
pool of 2 BatchInferenceFunction workers takes them concurrently (one message per invocation, as Lambda's SQS
scaling does), the last shard in closes the job; the outputs are byte-identical to the same job run by one
worker. The model is a compute-bound MLP built here (MiniLM is not part of the test fixtures); the speed-up
on MiniLM int8 is a benchmark's figure (`python -m tierserve_tools.bench.batch_fanout`), not a timed assert."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.models import write_model
from tierserve.manifest import TensorSpec

pytestmark = pytest.mark.integration

SHARDS = 16
ROWS = np.random.default_rng(9).standard_normal((800, 64)).astype(np.float32)


def mlp_onnx(width: int = 512, depth: int = 4, seed: int = 0) -> bytes:
    """x FP32 [-1, 64] -> ``depth`` dense ReLU layers of ``width`` -> y FP32 [-1, 8]: compute-bound per row."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dims = [64] + [width] * depth + [8]
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"W{i}"))
        out = "y" if i == len(dims) - 2 else f"h{i}"
        mm = f"m{i}" if out != "y" else "y"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [mm]))
        if out != "y":
            nodes.append(helper.make_node("Relu", [mm], [out]))
        prev = out
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _run(store: Path, workdir: Path, workers: int) -> tuple[dict[str, bytes], int]:
    """The job through a stack with ``workers`` batch workers: its outputs, and how many environments ran it."""
    from tierserve_tools.serve import BUCKET, LocalStack

    body = b"".join(json.dumps({"id": f"r{i}", "inputs": {"x": row.tolist()}}).encode() + b"\n"
                    for i, row in enumerate(ROWS))
    body += b'{"id": "broken"\n'  # one bad line, in the last shard: errors.jsonl is merged across shards
    with LocalStack(store, port=0, triton=False, workdir=workdir, batch_workers=workers,
                    env={"CHUNK_ROWS": "16", "ORT_THREADS": "1"}) as stack:
        s3, sqs = stack.client("s3"), stack.client("sqs")
        s3.put_object(Bucket=BUCKET, Key="input/big.jsonl", Body=body)
        sqs.send_message(QueueUrl=stack.queues["jobs_queue_url"], MessageBody=json.dumps(
            {"model": "mlp", "input": f"s3://{BUCKET}/input/big.jsonl",
             "output": f"s3://{BUCKET}/batch/out/mlp/big", "shards": SHARDS}))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="batch/out/mlp/big/").get("Contents", [])
            if any(o["Key"].endswith("/_SUCCESS") for o in listed):
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"the fanned-out job did not finish; see {workdir}/BatchInferenceFunction.log")
        out = {o["Key"].rsplit("/", 1)[1]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}
    log = (workdir / "BatchInferenceFunction.log").read_text().splitlines()
    records = [json.loads(ln) for ln in log if ln.startswith("{") and '"cold_start"' in ln]
    # A worker starts only when every started one is busy: each cold start is an environment that ran
    # while the others were running.
    cold = len({r.get("function_request_id") for r in records if r.get("cold_start") is True})
    return out, cold


def test_two_workers_run_the_shards_concurrently_and_write_the_same_bytes_as_one(tmp_path):
    # Given a compute-bound model in a store, and an 800-line job asked to fan out into 16 shards
    store = tmp_path / "models"
    write_model(store, "mlp", "1", mlp_onnx(), (TensorSpec("x", "FP32", (-1, 64)),),
                (TensorSpec("y", "FP32", (-1, 8)),))
    # When one stack runs it with one batch worker, and another with two
    one, one_cold = _run(store, tmp_path / "one", 1)
    two, two_cold = _run(store, tmp_path / "two", 2)
    # Then both closed the job once, over every line and all 16 shards
    success = json.loads(two["_SUCCESS"])
    assert success["shards"] == SHARDS and success["counts"]["output_lines"] == len(ROWS)
    assert success["counts"]["errors"] == 1 and success["counts"] == json.loads(one["_SUCCESS"])["counts"]
    # And the parts are byte-identical, part by part, in the input's order across the parts
    parts = sorted(k for k in two if k.startswith("part-"))
    assert parts == sorted(k for k in one if k.startswith("part-")) and len({p[:10] for p in parts}) == SHARDS
    assert all(one[k] == two[k] for k in parts) and one["errors.jsonl"] == two["errors.jsonl"]
    assert [json.loads(x)["line"] for x in two["errors.jsonl"].splitlines()] == [len(ROWS) + 1]
    ids = [json.loads(line)["id"] for k in parts for line in two[k].splitlines()]
    assert ids == [f"r{i}" for i in range(len(ROWS))]
    # And one environment ran the first job, while the second's shards kept two busy at once
    assert one_cold == 1 and two_cold == 2
