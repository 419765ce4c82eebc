"""The field's own clients against `tierserve serve`: tritonclient's config, statistics, repository index
and compression calls, and NVIDIA's perf_analyzer, unchanged, as they work against Triton.

One stack for the module (API Gateway emulation -> RouterFunction -> CpuInferenceFunction workers, and
the real local tritonserver when the nvidia-pytriton wheel is installed) over a tiny linear model on
both tiers, y = x @ W + b.
"""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.support.models import write_dual_tier_linear
from tierserve_tools import perf_analyzer

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from tierserve_tools.serve import LocalStack

    root = tmp_path_factory.mktemp("protocol-models")
    w, b = write_dual_tier_linear(root, seed=33)
    with LocalStack(root, port=0, s3=False, batch=False, workdir=tmp_path_factory.mktemp("serve")) as s:
        s.weights = (w, b)
        yield s


@pytest.fixture
def client(stack):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(stack.url.removeprefix("http://"))
    yield c
    c.close()


def _infer(client, x: np.ndarray, **kwargs):
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=kwargs.pop("binary", True))
    return client.infer("lin", [inp], outputs=[httpclient.InferRequestedOutput("y", binary_data=True)], **kwargs)


def test_get_model_config_answers_what_triton_answers_for_the_same_model(stack, client) -> None:
    # When tritonclient asks the gateway for the model's configuration
    cfg = client.get_model_config("lin")
    # Then it is Triton's configuration JSON for the model, built from the manifest
    assert (cfg["name"], cfg["platform"], cfg["max_batch_size"]) == ("lin", "onnxruntime_onnx", 16)
    assert client.get_model_config("lin", "1") == cfg
    # And names, datatypes and dims are those the real tritonserver reports for the same model
    if stack.triton is None:
        pytest.skip("no local tritonserver (nvidia-pytriton not installed) to compare with")
    import tritonclient.http as httpclient

    direct = httpclient.InferenceServerClient(stack.triton.http_url).get_model_config("lin")
    for key in ("input", "output"):
        assert [(t["name"], t["data_type"], t["dims"]) for t in cfg[key]] == \
               [(t["name"], t["data_type"], t["dims"]) for t in direct[key]]
    assert cfg["max_batch_size"] == direct["max_batch_size"]
    assert set(direct) - set(cfg) <= {"dynamic_batching", "sequence_batching", "ensemble_scheduling",
                                      "response_cache", "model_transaction_policy", "model_operations",
                                      "model_repository_agents"}


def test_get_inference_statistics_counts_the_requests_it_served(client) -> None:
    # Given the counters before, and three requests (1, 2 and 3 rows)
    def stats() -> dict:
        (s,) = client.get_inference_statistics("lin")["model_stats"]
        return s

    before = stats()
    for rows in (1, 2, 3):
        _infer(client, np.ones((rows, 4), np.float32))
    # When tritonclient asks for the model's statistics
    after = stats()
    # Then Triton's format counts them: 3 more executions, 6 more inferences, all successes
    assert after["execution_count"] - before["execution_count"] == 3
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    # And the server-wide and versioned forms list the same model
    assert [s["name"] for s in client.get_inference_statistics()["model_stats"]] == ["lin"]
    assert client.get_inference_statistics("lin", "1")["model_stats"][0]["version"] == "1"


def test_get_model_repository_index_lists_the_model_ready(client) -> None:
    assert client.get_model_repository_index() == [{"name": "lin", "version": "1", "state": "READY"}]


@pytest.mark.parametrize("request_coding", [None, "gzip", "deflate"])
@pytest.mark.parametrize("response_coding", [None, "gzip", "deflate"])
def test_request_and_response_compression(stack, client, request_coding, response_coding) -> None:
    # Given 3 rows, sent as JSON (compresses well) or binary
    w, b = stack.weights
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
    # When tritonclient compresses the request and asks for a compressed response
    result = _infer(client, x, binary=request_coding != "gzip", request_compression_algorithm=request_coding,
                    response_compression_algorithm=response_coding)
    # Then the outputs are right
    np.testing.assert_allclose(result.as_numpy("y"), x @ w + b, rtol=1e-4, atol=1e-5)


def test_a_decompression_bomb_is_refused_with_413(stack) -> None:
    # Given 16 MiB of zeros gzipped into a few KB (the body limit is 4 MiB)
    bomb = gzip.compress(b"0" * (16 << 20), 9)
    req = urllib.request.Request(f"{stack.url}/v2/models/lin/infer", data=bomb, method="POST",
                                 headers={"content-type": "application/json", "content-encoding": "gzip"})
    # When it is posted, Then the answer is 413 with the protocol's error body
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 413 and json.loads(err.value.read())["code"] == "payload_too_large"


def test_unknown_routes_are_never_model_names(stack) -> None:
    with urllib.request.urlopen(f"{stack.url}/v2/models/stats", timeout=30) as resp:
        assert "model_stats" in json.loads(resp.read())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{stack.url}/v2/models/lin/nonsense", timeout=30)
    assert err.value.code == 404 and json.loads(err.value.read())["code"] == "route_not_found"


def test_perf_analyzer_runs_against_the_gateway_unchanged(stack, tmp_path) -> None:
    # Given NVIDIA's perf_analyzer (skipped, with the reason, where its binary cannot run)
    found = perf_analyzer.find()
    if found.command is None:
        pytest.skip(found.reason)
    # When it loads the gateway (it asks for the model's metadata and config first) at concurrency 2
    rows, out = perf_analyzer.run(found.command, stack.url.removeprefix("http://"), "lin", [2],
                                  tmp_path / "pa.csv", window_ms=1000, stability_pct=1000,
                                  extra=["--measurement-mode", "count_windows", "--measurement-request-count",
                                         "40"])
    # Then it measures throughput and latency with no errors
    (row,) = rows
    assert row.concurrency == 2 and row.throughput > 0 and row.p50_ms > 0 and row.count >= 40, out
