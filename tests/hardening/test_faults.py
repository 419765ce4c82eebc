"""Faults against the real local Triton and moto_server (issue 8's fault part): the GPU tier killed and
frozen under concurrent load, and S3 failing in every way while a model is fetched.

* Triton killed for D seconds at concurrency C (quick: 3 s at 4, full: 20 s at 16): a model with a CPU copy
  loses no request; a GPU-only model gets only fast 503s with Retry-After; Triton restarted, the GPU serves again.
* Triton frozen (SIGSTOP): every request of the first wave is answered, from the CPU, within its deadline
  (one GPU timeout plus the CPU's time), and the circuit opens on the first timeout.
* S3 answering 503, stalling, or cutting an object mid-stream while a model is fetched: a clear 503 with
  Retry-After (code artifact_unavailable), nothing half-written in the cache, and the next fetch after S3
  recovers serves; a corrupted cache is verified at start and fetched again.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.hardening.conftest import (
    COOLDOWN_S,
    FIGURES,
    TRITON_TIMEOUT_S,
    assert_served,
    infer,
    lin_body,
    percentile,
    scale,
)


def _wait_gpu(stack: Any, within_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        answer = infer(stack, "lin", lin_body(16, seed=5))
        if answer.status == 200 and answer.headers.get("x-served-by") == "gpu" and "x-fallback" not in answer.headers:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"the GPU did not serve again within {within_s} s")


def test_triton_killed_under_load_loses_no_request_with_a_cpu_copy(stack) -> None:
    concurrency, down_s = scale(4, 16), scale(3.0, 20.0)
    _wait_gpu(stack, 30)
    stop = threading.Event()
    results: dict[str, list[tuple[int, float, str | None]]] = {"lin": [], "lin-gpu": []}

    def load(i: int) -> None:
        model = "lin" if i % 2 == 0 else "lin-gpu"
        while not stop.is_set():
            t0 = time.monotonic()
            answer = infer(stack, model, lin_body(16, seed=i))
            results[model].append((answer.status, time.monotonic() - t0, answer.headers.get("retry-after")))

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    killed_at = len(results["lin"]) + len(results["lin-gpu"])
    stack.triton.kill()
    time.sleep(down_s)
    stack.triton.restart()
    recovered_s = _wait_gpu(stack, COOLDOWN_S + 30)
    stop.set()
    for t in threads:
        t.join(60)
    lin, gpu_only = results["lin"], results["lin-gpu"]
    lost = [r for r in lin if r[0] != 200]
    refused = [r for r in gpu_only if r[0] != 200]
    FIGURES["triton kill: concurrency, seconds down"] = (concurrency, down_s)
    FIGURES["triton kill: requests (CPU copy), lost"] = (len(lin), len(lost))
    FIGURES["triton kill: GPU-only 503s, slowest 503 s"] = (len(refused), round(max((r[1] for r in refused),
                                                                                     default=0), 3))
    FIGURES["triton kill: GPU serving again after restart (s)"] = round(recovered_s, 2)
    # Then the model with a CPU copy lost nothing...
    assert lost == [], lost[:5]
    # ...and the GPU-only model got only 503s with Retry-After, fast once the circuit knew
    assert refused and all(r[0] == 503 and r[2] for r in refused), refused[:5]
    assert percentile([r[1] for r in refused], 90) < 1.0
    assert killed_at > 0


def test_a_frozen_triton_costs_each_request_one_gpu_timeout_at_most(stack) -> None:
    from tierserve.app import get_runtime

    _wait_gpu(stack, COOLDOWN_S + 30)
    wave = scale(8, 16)
    latencies: list[float] = []
    answers: list[Any] = []
    stack.triton.freeze()
    try:
        barrier = threading.Barrier(wave)

        def one(i: int) -> None:
            barrier.wait()
            t0 = time.monotonic()
            answer = infer(stack, "lin", lin_body(16, seed=100 + i))
            latencies.append(time.monotonic() - t0)
            answers.append(answer)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(wave)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        # the server check after the first timeout takes up to its 1 s ready timeout
        deadline = time.monotonic() + 3.0
        while get_runtime().dispatcher.state()["gpu"] != "open" and time.monotonic() < deadline:
            time.sleep(0.05)
        state = get_runtime().dispatcher.state()["gpu"]
    finally:
        stack.triton.thaw()
    FIGURES["SIGSTOP first wave: requests, slowest s, median s"] = (wave, round(max(latencies), 2),
                                                                    round(percentile(latencies, 50), 2))
    # Then every request was answered by the CPU copy...
    assert [a.status for a in answers] == [200] * wave, [a.body[:200] for a in answers if a.status != 200]
    assert all(a.headers["x-served-by"] == "cpu" for a in answers)
    # ...within one GPU timeout plus the CPU's time (the local router serves one request at a time, so the
    # last of the wave also waited for the ones before it: a generous 3 s for their CPU time on a shared machine)
    assert max(latencies) < TRITON_TIMEOUT_S + 3.0, sorted(latencies)
    # And the circuit opened after the first timeout, once the server failed its health check
    assert state == "open"
    _wait_gpu(stack, COOLDOWN_S + 30)
    assert_served(stack)


# --- S3 failing while a model is fetched ---------------------------------------------------------------------


@pytest.fixture
def s3_rig(stack, tmp_path: Path):
    """A store reading the stack's models through a FaultProxy in front of its moto_server."""
    import boto3
    from botocore.config import Config

    from tests.support.fault_proxy import FaultProxy
    from tierserve_tools.serve import BUCKET, MODEL_PREFIX

    with FaultProxy(stack.moto.url, only="/lin/1/") as proxy:
        proxy.hang_s = 3.0
        client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing",
                              config=Config(connect_timeout=1, read_timeout=1, retries={"total_max_attempts": 1}))
        yield proxy, client, f"s3://{BUCKET}/{MODEL_PREFIX}"


def _api(uri: str, client: Any, cache: Path):
    from tests.support.make_events import http_event
    from tierserve.api import handle_http
    from tierserve.app import build_runtime
    from tierserve.settings import Settings
    from tierserve.store import ModelStore

    store = ModelStore(uri, cache, s3_client=client)
    runtime = build_runtime(Settings(model_store_uri=uri, model_cache_dir=str(cache)), store=store)

    def call(path: str, body: dict | None = None) -> dict:
        import json

        method = "POST" if body is not None else "GET"
        event = http_event(method, path, f"{method} {path}", "", {}, {"content-type": "application/json"})
        event["body"] = json.dumps(body) if body is not None else None
        event["isBase64Encoded"] = False
        return handle_http(event, None, runtime)

    return call, store


@pytest.mark.parametrize("mode", ["error", "hang", "cut"])
def test_s3_failing_during_a_fetch_is_a_clear_503_and_leaves_no_half_written_cache(s3_rig, tmp_path: Path,
                                                                                  mode: str) -> None:
    import json

    proxy, client, uri = s3_rig
    cache = tmp_path / "cache"
    call, _ = _api(uri, client, cache)
    # Given S3 failing this way for the model's objects
    proxy.mode = mode
    t0 = time.monotonic()
    resp = call("/v2/models/lin/infer", lin_body(2))
    took = time.monotonic() - t0
    # Then the request is a 503 with Retry-After that says the store is unavailable, within seconds
    body = json.loads(resp["body"])
    assert (resp["statusCode"], body["code"]) == (503, "artifact_unavailable"), body
    assert resp["headers"]["retry-after"] == "5" and "nothing half-fetched" in body["error"]
    assert took < 10
    # And nothing half-written is in the cache (no model folder, no temp folder)
    assert not cache.exists() or list(cache.iterdir()) == []
    # And once S3 recovers the same runtime serves the model
    proxy.mode = "pass"
    resp = call("/v2/models/lin/infer", lin_body(2))
    assert resp["statusCode"] == 200, resp["body"]
    FIGURES.setdefault("S3 faults answered 503 (mode: seconds)", {})[mode] = round(took, 2)


def test_a_corrupted_cache_is_verified_at_start_and_fetched_again(s3_rig, tmp_path: Path) -> None:
    _, client, uri = s3_rig
    cache = tmp_path / "cache"
    call, _ = _api(uri, client, cache)
    assert call("/v2/models/lin/infer", lin_body(2))["statusCode"] == 200
    # Given the cached model corrupted on disk (/tmp survives between invocations of a Lambda instance)
    [folder] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    (folder / "model.onnx").write_bytes(b"corrupted")
    # When a new execution environment starts on the same /tmp
    call2, _ = _api(uri, client, cache)
    resp = call2("/v2/models/lin/infer", lin_body(2))
    # Then the cache is verified, fetched again, and the model serves
    assert resp["statusCode"] == 200, resp["body"]
    assert (folder / "model.onnx").read_bytes() != b"corrupted"
