"""TritonBackend without a server: error mapping, timeouts, lazy imports."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.support.fakes import model_version
from tierserve.backends.triton import HTTP_TIMEOUT_BUCKETS, TritonBackend, _bucket, _split_url, map_exception
from tierserve.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigurationError,
    InferenceError,
    InvalidRequestError,
)
from tierserve.protocol.calls import InferenceCall
from tierserve.protocol.messages import InferRequest, Tensor

MODEL = model_version("m", ("gpu",), max_batch_size=8)


def _request(rows: int = 2) -> InferenceCall:
    x = np.ones((rows, 4), np.float32)
    return InferenceCall.from_request(InferRequest(inputs=[Tensor("x", "FP32", (rows, 4), x)], id="r1"))


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the with block ends: nothing listens there


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_connection_refused_maps_to_unavailable(closed_port, protocol):
    backend = TritonBackend(f"127.0.0.1:{closed_port}", protocol=protocol, timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        backend.infer(MODEL, _request(), timeout_s=2)
    assert time.monotonic() - t0 < 3
    assert "Triton" in str(info.value)
    assert info.value.__cause__ is None  # nothing from tritonclient leaks
    assert backend.ready() is False
    assert backend.ready(MODEL) is False
    backend.close()


def test_blackhole_times_out():
    # A listening socket that never accepts/answers: the HTTP read must time out, not hang.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        backend = TritonBackend(f"127.0.0.1:{port}", protocol="http", timeout_s=5)
        t0 = time.monotonic()
        with pytest.raises(BackendTimeoutError):
            backend.infer(MODEL, _request(), timeout_s=0.3)
        assert time.monotonic() - t0 < 2
        assert backend.ready() is False


def test_a_frozen_server_costs_each_concurrent_split_batch_its_deadline_and_no_more():
    # Given a server that accepts connections and never answers (SIGSTOP), and 8 concurrent requests each
    # split into 4 parts by max_batch_size
    import threading
    from dataclasses import replace

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(128)
        backend = TritonBackend(f"127.0.0.1:{srv.getsockname()[1]}", protocol="http", timeout_s=5)
        split = replace(MODEL, max_batch_size=2)
        took: list[float] = []

        def one() -> None:
            t0 = time.monotonic()
            with pytest.raises(BackendTimeoutError):
                backend.infer(split, _request(rows=8), timeout_s=0.5)
            took.append(time.monotonic() - t0)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # When each is sent with a 0.5 s budget, Then each times out once its own budget is spent: no part
        # waits for a free thread behind another request's parts
        assert len(took) == 8
        assert max(took) < 1.0, took


def test_no_budget_left_fails_without_network():
    backend = TritonBackend("127.0.0.1:1", timeout_s=5)
    with pytest.raises(BackendTimeoutError):
        backend.infer(MODEL, _request(), timeout_s=0)


def test_bad_input_is_invalid_request(closed_port):
    backend = TritonBackend(f"127.0.0.1:{closed_port}")
    bad = InferRequest(inputs=[Tensor("x", "FP32", (2, 4), np.array([["a"] * 4] * 2, dtype=object))])
    with pytest.raises(InvalidRequestError):
        backend.infer(MODEL, InferenceCall.from_request(bad))
    unknown = InferRequest(inputs=[Tensor("x", "BF17", (1,), np.zeros(1))])
    with pytest.raises(InvalidRequestError):
        backend.infer(MODEL, InferenceCall.from_request(unknown))


def test_constructor_validation():
    with pytest.raises(ConfigurationError):
        TritonBackend("127.0.0.1:8000", protocol="tcp")
    with pytest.raises(ConfigurationError):
        TritonBackend("", protocol="http")
    with pytest.raises(ConfigurationError):
        TritonBackend("127.0.0.1:8000", timeout_s=0)
    assert TritonBackend("http://h:8000/").url == "h:8000"
    assert _split_url("https://h:443", "http") == ("h:443", True)
    assert TritonBackend("h:1").tier == "gpu"


def test_timeout_buckets_round_down_and_keep_configured():
    assert _bucket(10.0, 10.0) == 10.0
    assert _bucket(99.0, 7.5) == 7.5
    assert _bucket(3.0, 10.0) == 2.0
    assert _bucket(0.01, 10.0) == HTTP_TIMEOUT_BUCKETS[0]


class _FakeTritonError(Exception):
    def __init__(self, msg, status):
        super().__init__(msg)
        self._msg, self._status = msg, status

    def status(self):
        return self._status

    def message(self):
        return self._msg


@pytest.mark.parametrize(
    ("status", "msg", "expected"),
    [
        ("404", "Request for unknown model: 'nope' is not found", BackendUnavailableError),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'nope' is not found", BackendUnavailableError),
        ("400", "Request for unknown model: 'nope' version 3 is not found", BackendUnavailableError),
        ("400", "unexpected shape for input 'x'", InvalidRequestError),
        ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'x'", InvalidRequestError),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", BackendUnavailableError),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", BackendTimeoutError),
        ("503", "Server not ready", BackendUnavailableError),
        ("500", "onnxruntime failed: boom", InferenceError),
        # Triton's onnxruntime backend answers a bad input with 500 "onnx runtime error 2: ..." (issue 8, defect 1)
        ("500", "onnx runtime error 2: Non-zero status code returned while running Gather node. Name:'' Status "
                "Message: indices element out of data bounds, idx=1000000000 must be within the inclusive range "
                "[-30522,30521]", InvalidRequestError),
        ("500", "onnxruntime failed: Fail: [ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while "
                "running Mul node", InvalidRequestError),
        ("500", "onnx runtime error 1: Non-zero status code returned while running MatMul node: CUDA failure 700",
         InferenceError),
        ("StatusCode.INTERNAL", "onnx runtime error 2: Invalid rank for input: x", InvalidRequestError),
        ("StatusCode.INTERNAL", "onnxruntime failed: boom", InferenceError),
    ],
)
def test_map_triton_status(status, msg, expected):
    err = map_exception(_FakeTritonError(msg, status), "model 'm'")
    assert type(err) is expected
    assert msg in str(err)


def test_map_transport_errors():
    assert type(map_exception(ConnectionRefusedError(111, "refused"), "x")) is BackendUnavailableError
    assert type(map_exception(TimeoutError("timed out"), "x")) is BackendTimeoutError
    assert type(map_exception(ValueError("weird"), "x")) is InferenceError


def test_import_does_not_import_tritonclient():
    code = (
        "import sys, tierserve.backends.triton; "
        "assert 'tritonclient' not in sys.modules, 'tritonclient imported'; "
        "assert 'numpy' not in sys.modules, 'numpy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_calls_from_many_short_lived_threads_do_not_leak_descriptors(closed_port):
    # Given a backend used as a thread-per-connection server uses it: every request on a new thread (issue 8,
    # defect 10: an HTTP client, with its gevent hub's epoll and eventfd, was made per thread, never closed)
    import threading

    backend = TritonBackend(f"127.0.0.1:{closed_port}", protocol="http", timeout_s=5)

    def one() -> None:
        backend.ready()

    for _ in range(5):  # warm the pool
        t = threading.Thread(target=one)
        t.start()
        t.join()
    before = _open_fds()
    # When 200 requests each run on a thread of their own
    for _ in range(200):
        t = threading.Thread(target=one)
        t.start()
        t.join()
    # Then the process holds about as many descriptors as before (not 2 more per thread)
    assert _open_fds() - before < 20
    backend.close()
