"""The composition root: build_runtime wires every part from Settings; get/set/reset_runtime hold it while warm.

Nothing here touches the network: backends and boto3 clients are built lazily and never called.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.support.fakes import FakeBackend, write_linear
from tierserve.app import Runtime, build_runtime, get_runtime, reset_runtime, set_runtime
from tierserve.backends.lambda_invoke import LambdaInvokeBackend
from tierserve.backends.onnx import OnnxBackend
from tierserve.backends.triton import TritonBackend
from tierserve.routing import cpu_first
from tierserve.settings import get_settings, parse_settings
from tierserve.store import ModelStore


def runtime_from(tmp_path: Path, **env: str) -> Runtime:
    return build_runtime(parse_settings({"MODEL_STORE_URI": str(tmp_path), **env}))


# --- build_runtime ---------------------------------------------------------------------------------------


def test_cpu_backend_lambda_invokes_the_cpu_function_by_name(tmp_path: Path) -> None:
    # Given the router's settings in AWS
    # When its runtime is built
    rt = runtime_from(tmp_path, CPU_BACKEND="lambda", CPU_FUNCTION_NAME="tierserve-CpuInferenceFunction")
    # Then the CPU tier is a synchronous Invoke of that function
    cpu = rt.dispatcher.cpu
    assert isinstance(cpu, LambdaInvokeBackend)
    assert (cpu.function_name, cpu.tier) == ("tierserve-CpuInferenceFunction", "cpu")


def test_cpu_backend_inprocess_runs_onnxruntime_on_the_runtimes_own_store(tmp_path: Path) -> None:
    # Given the CPU function's settings, with 2 onnxruntime threads
    # When its runtime is built
    rt = runtime_from(tmp_path, CPU_BACKEND="inprocess", ORT_THREADS="2")
    # Then the CPU tier runs onnxruntime here, on artifacts from the runtime's store
    cpu = rt.dispatcher.cpu
    assert isinstance(cpu, OnnxBackend)
    assert (cpu.store, cpu.threads) == (rt.store, 2)


def test_triton_url_builds_the_gpu_tier_and_without_it_there_is_none(tmp_path: Path) -> None:
    # Given settings with and without TRITON_URL
    with_gpu = runtime_from(tmp_path, TRITON_URL="http://triton:8001", TRITON_PROTOCOL="grpc", TRITON_TIMEOUT_S="2.5")
    without = runtime_from(tmp_path)
    # Then the first has a Triton tier with those settings, and GPU calls are capped at its timeout
    gpu = with_gpu.dispatcher.gpu
    assert isinstance(gpu, TritonBackend)
    assert (gpu.url, gpu.protocol, gpu.timeout_s) == ("triton:8001", "grpc", 2.5)
    assert with_gpu.dispatcher.gpu_timeout_s == 2.5
    # And the second has no GPU tier, as its state says
    assert without.dispatcher.gpu is None
    assert without.dispatcher.state() == {"cpu": "configured", "gpu": "none"}


def test_the_breaker_health_cache_store_and_policy_follow_the_settings(tmp_path: Path) -> None:
    # Given settings for every tunable part
    rt = runtime_from(tmp_path, BREAKER_FAILURE_THRESHOLD="3", BREAKER_COOLDOWN_S="12", BREAKER_SUCCESS_THRESHOLD="2",
                      HEALTH_TTL_S="4", MANIFEST_TTL_S="9", MODEL_CACHE_DIR=str(tmp_path / "cache"),
                      ROUTING_POLICY="cpu-first")
    # Then each part was built with them
    d = rt.dispatcher
    assert (d.breaker.failure_threshold, d.breaker.cooldown_s, d.breaker.success_threshold) == (3, 12.0, 2)
    assert d.health.ttl_s == 4.0 and d.policy is cpu_first
    assert (rt.store.uri, rt.store.cache_dir, rt.store.manifest_ttl_s) == (str(tmp_path), tmp_path / "cache", 9.0)


def test_tests_and_the_emulator_may_pass_their_own_tiers_and_store(tmp_path: Path) -> None:
    # Given fake tiers and a store built elsewhere
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    store = ModelStore(str(tmp_path), tmp_path / "cache")
    # When a runtime is built with them, from settings that name other tiers
    settings = parse_settings({"CPU_BACKEND": "lambda", "CPU_FUNCTION_NAME": "f", "TRITON_URL": "h:1"})
    rt = build_runtime(settings, cpu=cpu, gpu=gpu, store=store)
    # Then those are the ones wired in
    assert (rt.dispatcher.cpu, rt.dispatcher.gpu, rt.store) == (cpu, gpu, store)


def test_aws_clients_are_built_once_per_execution_environment(runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given a runtime (no call is made: boto3 clients connect lazily)
    rt = runtime_from(tmp_path)
    # When the same service is asked for twice, and other services once
    s3 = rt.aws("s3")
    # Then the client is built once and reused (by other runtimes too: one cache, tierserve.aws); each
    # service gets its own; DynamoDB also as a resource
    assert rt.aws("s3") is s3 and runtime_from(tmp_path).aws("s3") is s3
    assert rt.aws("sqs") is not s3 and rt.aws("sqs").meta.service_model.service_name == "sqs"
    assert hasattr(rt.aws("dynamodb-resource"), "Table")
    # And the one reset forgets them: the next invocation's environment may differ
    reset_runtime()
    assert rt.aws("s3") is not s3


# --- one runtime per execution environment ------------------------------------------------------------


def test_get_runtime_builds_from_the_environment_once_and_reuses_it(runtime_env: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    # Given a function's environment
    runtime_env.setenv("MODEL_STORE_URI", str(tmp_path))
    # When 8 invocations ask for the runtime at once, and one more later
    barrier = threading.Barrier(8)
    seen: list[Runtime] = []

    def invocation() -> None:
        barrier.wait()
        seen.append(get_runtime())

    threads = [threading.Thread(target=invocation) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Then one runtime was built, from the environment, and every invocation got it
    assert len(seen) == 8 and all(rt is seen[0] for rt in seen)
    assert get_runtime() is seen[0] and seen[0].settings.model_store_uri == str(tmp_path)


def test_set_runtime_installs_a_runtime_built_elsewhere(runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given a runtime built by a test or the local emulator
    custom = runtime_from(tmp_path, ROUTING_POLICY="cpu-first")
    # When it is installed
    set_runtime(custom)
    # Then every handler gets it
    assert get_runtime() is custom


def test_reset_runtime_forgets_settings_runtime_and_sessions(runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given a warm runtime that has loaded a model's onnxruntime session
    mv, _, _ = write_linear(tmp_path / "store")
    runtime_env.setenv("MODEL_STORE_URI", str(tmp_path / "store"))
    warm = get_runtime()
    session = warm.dispatcher.cpu.session(mv)  # type: ignore[union-attr]
    # When the environment changes, nothing changes until the runtime is reset
    runtime_env.setenv("ROUTING_POLICY", "cpu-first")
    assert get_runtime() is warm and get_settings().routing_policy == "size-aware"
    reset_runtime()
    # Then settings and runtime are rebuilt from the new environment, and sessions are loaded afresh
    cold = get_runtime()
    assert cold is not warm and cold.dispatcher.policy is cpu_first
    assert get_settings().routing_policy == "cpu-first"
    assert cold.dispatcher.cpu.session(mv) is not session  # type: ignore[union-attr]
