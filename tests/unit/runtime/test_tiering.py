"""TierDispatcher, Deadline and pick_version: which tier serves a call, within what time, with one fallback.

Tiers are FakeBackends that record their calls and probes; the breaker, the health cache and each
deadline run on one FakeClock, so nothing sleeps and every timeout is exact.
"""

from __future__ import annotations

import pytest

from tests.support.fakes import FakeBackend, FakeClock, FakeLambdaContext, json_call, model_version, rows_of
from tierserve import errors
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.manifest import Manifest, ModelEntry
from tierserve.protocol.calls import InferenceCall
from tierserve.protocol.http_api import error_response
from tierserve.routing import Decision, Policy, RouteContext, size_aware
from tierserve.tiering import RESPONSE_MARGIN_S, Deadline, TierDispatcher, pick_version

BOTH = model_version("m", ("gpu", "cpu"), routing={"gpu_min_rows": 8})
GPU_ONLY = model_version("g", ("gpu",))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def dispatcher(cpu: FakeBackend | None, gpu: FakeBackend | None, clock: FakeClock, policy: Policy = size_aware,
               failure_threshold: int = 2, cooldown_s: float = 10.0) -> TierDispatcher:
    """GPU calls capped at 5 s, CPU calls at 30 s; the breaker opens after 2 failures and closes on one
    successful trial; a health probe is cached for 1 s."""
    breaker = CircuitBreaker(failure_threshold, cooldown_s, success_threshold=1, clock=clock)
    return TierDispatcher(cpu, gpu, policy, breaker, HealthCache(ttl_s=1.0, clock=clock), gpu_timeout_s=5.0)


# --- which tier ---------------------------------------------------------------------------------------


def test_small_batches_go_to_cpu_and_large_ones_to_gpu(clock) -> None:
    # Given a model on both tiers whose profile says the GPU pays off from 8 rows
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    d = dispatcher(cpu, gpu, clock)
    # When 2 rows and then 32 rows arrive
    small, large = d.dispatch(BOTH, json_call(2)), d.dispatch(BOTH, json_call(32))
    # Then the CPU serves the first and the GPU the second, neither as a fallback
    assert (small.served_by, small.fallback, large.served_by, large.fallback) == ("cpu", None, "gpu", None)
    assert (len(cpu.calls), len(gpu.calls)) == (1, 1)
    assert "32 rows >= gpu_min_rows 8" in large.decision.reason
    assert large.reply.decoded().outputs[0].data.shape == (32, 3)
    assert large.latency_ms >= 0


def test_a_client_hint_wins_whether_passed_in_or_in_parameters_target(clock) -> None:
    # Given both tiers up
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    d = dispatcher(cpu, gpu, clock)
    # When a GPU-sized batch carries a CPU hint, and a small one asks for the GPU in parameters.target
    # Then each goes where it asked, and the hint passed in (the x-target header) beats parameters.target
    assert d.dispatch(BOTH, json_call(32), hint="cpu").served_by == "cpu"
    assert d.dispatch(BOTH, json_call(2, target="gpu")).served_by == "gpu"
    assert d.dispatch(BOTH, json_call(2, target="gpu"), hint="cpu").served_by == "cpu"
    # And a hint for a tier the model is not on is the client's error
    with pytest.raises(errors.InvalidRequestError, match="not deployed on cpu"):
        d.dispatch(GPU_ONLY, json_call(2), hint="cpu")


def test_the_policy_sees_rows_tensor_bytes_hint_and_time_left_and_probes_only_if_it_asks(clock) -> None:
    # Given a policy that records its context and always picks the CPU
    seen: list[RouteContext] = []

    def recording(ctx: RouteContext) -> Decision:
        seen.append(ctx)
        return Decision("cpu", "recorded")

    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    d = dispatcher(cpu, gpu, clock, policy=recording)
    # When a 5-row request with a GPU hint in its parameters arrives with 2 s left
    d.dispatch(BOTH, json_call(5, target="gpu"), deadline=Deadline(2.0, clock))
    # Then the policy got the header's facts, and the GPU was not probed on its behalf
    [ctx] = seen
    assert (ctx.rows, ctx.tensor_bytes, ctx.hint, ctx.remaining_ms) == (5, 5 * 4 * 4, "gpu", 2000.0)
    assert gpu.ready_calls == []
    # And the probe runs only when the policy asks for it
    assert ctx.gpu_usable() is True
    assert gpu.ready_calls == ["m"]


def test_gpu_health_is_probed_only_when_the_policy_picks_the_gpu(clock) -> None:
    # Given a dual-target model and both tiers up
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    d = dispatcher(cpu, gpu, clock)
    # When a CPU-bound request is dispatched
    assert d.dispatch(BOTH, json_call(2)).served_by == "cpu"
    # Then the GPU tier saw no ready() call at all
    assert gpu.ready_calls == []
    # When a GPU-bound one follows, Then its model is probed once before the call
    assert d.dispatch(BOTH, json_call(32)).served_by == "gpu"
    assert gpu.ready_calls == ["m"]


def test_routing_reads_only_the_header_and_only_the_gpu_leg_materialises_a_call(clock) -> None:
    # Given JSON calls for each tier
    small, large = json_call(2), json_call(32)
    d = dispatcher(FakeBackend("cpu"), FakeBackend("gpu"), clock)
    # When they are routed, Then nothing is materialised
    d.decide(BOTH, large)
    assert large.materialized is False
    # When they are dispatched, Then the call forwarded to the CPU tier stays as it came, and the GPU-bound
    # one is materialised (once: the value checks and the GPU read the same arrays)
    d.dispatch(BOTH, small)
    d.dispatch(BOTH, large)
    assert (small.materialized, large.materialized) == (False, True)


# --- GPU failures, the breaker and the fallback ---------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [errors.BackendUnavailableError("connection refused"), errors.BackendTimeoutError("no answer in 2 s"),
     errors.InferenceError("CUDA error: out of memory")],
    ids=["unavailable", "timeout", "inference-error"],
)
def test_gpu_failure_falls_back_to_cpu_once_and_is_never_retried_on_the_gpu(clock, exc) -> None:
    # Given a GPU that fails every call
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=exc)
    d = dispatcher(cpu, gpu, clock)
    # When a GPU-sized request arrives
    done = d.dispatch(BOTH, json_call(16, "abc"))
    # Then the CPU serves it, flagged as a GPU-unavailable fallback that names the cause
    assert (done.served_by, done.fallback) == ("cpu", "gpu-unavailable")
    assert (done.decision.target, done.decision.fallback) == ("cpu", "gpu-unavailable")
    assert exc.message in done.decision.reason
    # And each tier saw the request exactly once
    assert (gpu.ids, cpu.ids) == (["abc"], ["abc"])
    # And the failure counted: one more opens a breaker whose threshold is 2
    d.breaker.record_failure()
    assert d.breaker.state == "open"


def test_after_threshold_failures_the_gpu_gets_no_calls_and_no_probes(clock) -> None:
    # Given a GPU that times out on every call
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=errors.BackendTimeoutError("timed out"))
    d = dispatcher(cpu, gpu, clock)
    # When two GPU-sized requests fail over
    for i in range(2):
        d.dispatch(BOTH, json_call(32, f"r{i}"))
    # Then the breaker is open
    assert d.breaker.state == "open"
    calls, probes = len(gpu.calls), len(gpu.ready_calls)
    # When five more arrive
    routed = [d.dispatch(BOTH, json_call(32, f"s{i}")) for i in range(5)]
    # Then each goes straight to the CPU as a fallback, without touching the GPU at all
    assert {(r.served_by, r.fallback) for r in routed} == {("cpu", "gpu-unavailable")}
    assert "circuit open" in routed[0].decision.reason
    assert (len(gpu.calls), len(gpu.ready_calls), len(cpu.calls)) == (calls, probes, 7)


def test_gpu_only_model_with_the_gpu_down_is_a_503_with_what_is_left_of_the_cooldown(clock) -> None:
    # Given a GPU-only model, a failing GPU and a 30 s cooldown
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=errors.BackendUnavailableError("down"))
    d = dispatcher(cpu, gpu, clock, cooldown_s=30.0)
    # When a request fails on the GPU while the breaker is still closed
    with pytest.raises(errors.BackendUnavailableError) as first:
        d.dispatch(GPU_ONLY, json_call(1))
    # Then the 503 names the fix and asks to retry after the whole cooldown
    assert first.value.retry_after_s == 30.0
    assert "GPU tier only" in first.value.message and "--target both" in first.value.message
    # When the breaker has opened and 10 s have passed
    with pytest.raises(errors.BackendUnavailableError):
        d.dispatch(GPU_ONLY, json_call(1))
    assert d.breaker.state == "open"
    clock.advance(10.0)
    with pytest.raises(errors.BackendUnavailableError) as later:
        d.dispatch(GPU_ONLY, json_call(1))
    # Then Retry-After is what is left of the cooldown, the GPU was not called again, the CPU never
    assert later.value.retry_after_s == pytest.approx(20.0)
    assert "circuit open" in later.value.message
    assert (len(gpu.calls), cpu.calls) == (2, [])
    resp = error_response(later.value)
    assert (resp["statusCode"], resp["headers"]["retry-after"]) == (503, "20")


def test_the_breaker_closes_again_after_the_cooldown_with_one_successful_trial(clock) -> None:
    # Given an open breaker over a GPU that has recovered
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", failures=[errors.BackendUnavailableError("down")] * 2)
    d = dispatcher(cpu, gpu, clock)
    d.dispatch(BOTH, json_call(32))
    d.dispatch(BOTH, json_call(32))
    assert d.breaker.state == "open"
    # When the cooldown has passed
    clock.advance(10.0)
    assert d.breaker.state == "half_open"
    done = d.dispatch(BOTH, json_call(32))
    # Then the trial goes to the GPU, succeeds, and closes the breaker
    assert (done.served_by, done.fallback) == ("gpu", None)
    assert d.breaker.state == "closed"


def test_an_unexpected_gpu_exception_releases_the_half_open_trial(clock) -> None:
    # Given a half-open breaker whose trial call raises something that is not a tierserve error
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=errors.BackendUnavailableError("down"))
    d = dispatcher(cpu, gpu, clock, failure_threshold=1, cooldown_s=5.0)
    d.dispatch(BOTH, json_call(32))
    clock.advance(5.0)
    gpu.fail = RuntimeError("bug in a backend")
    with pytest.raises(RuntimeError):
        d.dispatch(BOTH, json_call(32))
    # When the cooldown passes again and the GPU is healthy
    clock.advance(5.0)
    gpu.fail = None
    # Then the GPU gets its trial (the failed one was not left in flight for ever)
    assert d.dispatch(BOTH, json_call(32)).served_by == "gpu"


def test_a_failed_probe_of_a_dead_server_opens_the_breaker_at_once(clock) -> None:
    # Given a GPU server that is down (neither the model nor the server is ready), and a breaker needing 2 failures
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", model_ready=False, server_ready=False)
    d = dispatcher(cpu, gpu, clock)
    # When one GPU-sized request arrives
    done = d.dispatch(BOTH, json_call(32))
    # Then it is a CPU fallback, and the one probe opened the breaker: the GPU was never called
    assert (done.served_by, done.fallback) == ("cpu", "gpu-unavailable")
    assert (gpu.calls, d.breaker.state) == ([], "open")


def test_a_model_not_ready_on_a_live_server_does_not_open_the_breaker(clock) -> None:
    # Given a live GPU server on which the model is not loaded
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", model_ready=False, server_ready=True)
    d = dispatcher(cpu, gpu, clock)
    # When four GPU-sized requests arrive, each after the health TTL
    for _ in range(4):
        clock.advance(1.5)
        assert d.dispatch(BOTH, json_call(32)).fallback == "gpu-unavailable"
    # Then the breaker stays closed: the tier is up, the model is not there
    assert d.breaker.state == "closed"


def test_an_unready_gpu_is_probed_once_per_ttl_and_never_called(clock) -> None:
    # Given a GPU on which the model is not ready
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", model_ready=False)
    d = dispatcher(cpu, gpu, clock)
    # When two GPU-sized requests arrive within the health TTL
    a, b = d.dispatch(BOTH, json_call(16)), d.dispatch(BOTH, json_call(16))
    # Then both are CPU fallbacks, the model was probed once (then the server), and infer never ran
    assert (a.fallback, b.fallback) == ("gpu-unavailable", "gpu-unavailable")
    assert "not ready" in a.decision.reason
    assert gpu.ready_calls == ["m", None]
    assert gpu.calls == []


def test_an_invalid_request_on_the_gpu_is_the_clients_error_and_counts_as_a_healthy_answer(clock) -> None:
    # Given a GPU that failed once, then rejects the input as malformed
    cpu = FakeBackend("cpu")
    gpu = FakeBackend("gpu", failures=[errors.BackendUnavailableError("blip")],
                      fail=errors.InvalidRequestError("bad shape"))
    d = dispatcher(cpu, gpu, clock)
    assert d.dispatch(BOTH, json_call(32)).fallback == "gpu-unavailable"
    # When two requests are rejected
    for _ in range(2):
        with pytest.raises(errors.InvalidRequestError, match="bad shape") as refused:
            d.dispatch(BOTH, json_call(32))
        assert refused.value.served_by == "gpu"  # the GPU's answer: its response says x-served-by: gpu
    # Then they were not retried on the CPU, and the GPU's answers reset the failure count
    assert len(cpu.calls) == 1
    gpu.failures = [errors.BackendUnavailableError("blip")]
    d.dispatch(BOTH, json_call(32))
    assert d.breaker.state == "closed"


def test_values_the_manifest_refuses_never_reach_the_gpu_and_never_touch_the_breaker(clock) -> None:
    # Given a model whose input x must lie in [-100, 100], a GPU that failed once, and five requests with x = 1e9
    from dataclasses import replace

    from tierserve.manifest import TensorSpec

    bounded = replace(BOTH, inputs=(TensorSpec("x", "FP32", (-1, 4), value_range=(-100, 100)),))
    cpu = FakeBackend("cpu")
    gpu = FakeBackend("gpu", failures=[errors.BackendUnavailableError("blip")])
    d = dispatcher(cpu, gpu, clock)
    d.dispatch(bounded, json_call(32))
    for _ in range(5):
        with pytest.raises(errors.InvalidRequestError, match=r"input 'x' holds .* outside the range"):
            d.dispatch(bounded, InferenceCall.from_request(_scaled(32, 1e9)))
    # Then neither tier ran them, and the breaker still counts the one real failure (not reset, not opened)
    assert (len(gpu.calls), len(cpu.calls)) == (1, 1)
    assert (d.breaker.state, d.breaker._failures) == ("closed", 1)


def _scaled(rows: int, value: float):
    from tierserve.protocol.messages import InferRequest
    from tierserve.protocol.tensors import tensor_from_numpy

    return InferRequest([tensor_from_numpy("x", rows_of(rows) * 0 + value)])


def test_non_finite_inputs_are_the_clients_error_on_the_gpu_path(clock) -> None:
    import numpy as np

    from tierserve.protocol.messages import InferRequest
    from tierserve.protocol.tensors import tensor_from_numpy

    # Given both tiers up and a GPU-sized batch holding one NaN
    x = rows_of(32)
    x[3, 1] = np.nan
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    d = dispatcher(cpu, gpu, clock)
    # When dispatched, Then it is a 400 naming the index, and the GPU never saw it
    with pytest.raises(errors.InvalidRequestError, match=r"input 'x' holds nan at index \[3, 1\]"):
        d.dispatch(BOTH, InferenceCall.from_request(InferRequest([tensor_from_numpy("x", x)])))
    assert gpu.calls == []


@pytest.mark.parametrize(("server_answers", "state"), [(False, "open"), (True, "closed")],
                         ids=["frozen-server", "slow-call"])
def test_a_timeout_checks_the_server_once_and_opens_the_circuit_at_once_if_it_is_frozen(clock, server_answers,
                                                                                        state) -> None:
    # Given a breaker that needs 5 failures, a GPU whose calls time out, and health checks run inline
    cpu = FakeBackend("cpu")
    gpu = FakeBackend("gpu", fail=errors.BackendTimeoutError("no answer in 5 s"), server_ready=server_answers)
    d = dispatcher(cpu, gpu, clock, failure_threshold=5)
    d.run_in_background = lambda fn: fn()
    # When one GPU-sized request times out
    done = d.dispatch(BOTH, json_call(32))
    # Then it is served by the CPU, and one server health check decided the circuit: a frozen server
    # opens it on the first timeout; one that answers keeps it closed (a slow call counts as one failure)
    assert (done.served_by, done.fallback) == ("cpu", "gpu-unavailable")
    assert gpu.ready_calls == ["m", None]
    assert d.breaker.state == state


def test_after_a_timeout_nothing_more_goes_to_the_gpu_until_one_health_check_answers(clock) -> None:
    # Given a health check still running in the background
    pending: list = []
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu", fail=errors.BackendTimeoutError("slow"), server_ready=False)
    d = dispatcher(cpu, gpu, clock, failure_threshold=10)
    d.run_in_background = pending.append
    # When one request times out, and two more arrive before the check finishes
    for _ in range(3):
        d.dispatch(BOTH, json_call(32))
    # Then one check was started, the later requests went straight to the CPU (nothing more into a server that
    # may be frozen), and the check opens the circuit
    assert (len(pending), len(gpu.calls), len(cpu.calls)) == (1, 1, 3)
    pending[0]()
    assert d.breaker.state == "open"


def test_breaker_transitions_are_structured_log_events_and_metrics(caplog, monkeypatch) -> None:
    from tierserve import telemetry
    from tierserve.tiering import log_transition

    counted: list[tuple[str, str]] = []
    monkeypatch.setattr(telemetry, "breaker_transition", lambda old, new: counted.append((old, new)))
    # When the circuit opens
    log_transition("closed", "open", "5 consecutive failures")
    # Then a warning with the transition's fields is logged, and the BreakerTransitions metric is counted
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "circuit_breaker"]
    fields = (record.levelname, record.__dict__["from"], record.to, record.reason)
    assert fields == ("WARNING", "closed", "open", "5 consecutive failures")
    assert counted == [("closed", "open")]


def test_without_a_gpu_tier_a_dual_model_runs_on_cpu_and_a_gpu_only_model_is_a_503(clock) -> None:
    # Given a dispatcher with no GPU backend
    cpu = FakeBackend("cpu")
    d = dispatcher(cpu, None, clock)
    # When a GPU-sized request for a dual-target model arrives
    done = d.dispatch(BOTH, json_call(32))
    # Then the CPU serves it as a fallback that says why
    assert (done.served_by, done.fallback) == ("cpu", "gpu-unavailable")
    assert "no GPU tier is configured" in done.decision.reason
    # And a GPU-only model is a 503 that asks to retry after the breaker's cooldown
    with pytest.raises(errors.BackendUnavailableError, match="no GPU tier") as info:
        d.dispatch(GPU_ONLY, json_call(1))
    assert info.value.retry_after_s == 10.0


# --- deadlines ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "gpu_timeout", "cpu_timeout"),
    [(None, 5.0, 30.0), (1.75, 1.75, 1.75), (60.0, 5.0, 30.0)],
    ids=["no-deadline", "1.75s-left", "capped"],
)
def test_each_tier_gets_its_cap_or_what_is_left_of_the_deadline(clock, seconds, gpu_timeout, cpu_timeout) -> None:
    # Given tiers capped at 5 s (GPU) and 30 s (CPU)
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    d = dispatcher(cpu, gpu, clock)
    # When a GPU batch and a CPU batch are dispatched with `seconds` left
    d.dispatch(BOTH, json_call(32), deadline=Deadline(seconds, clock))
    d.dispatch(BOTH, json_call(1), deadline=Deadline(seconds, clock))
    # Then each call's timeout is the smaller of its cap and what is left
    assert (gpu.timeouts, cpu.timeouts) == ([gpu_timeout], [cpu_timeout])


def test_a_fallback_gets_what_is_left_of_the_deadline_not_a_fresh_timeout(clock) -> None:
    # Given a GPU that takes 1.5 s to time out
    cpu = FakeBackend("cpu")
    gpu = FakeBackend("gpu", fail=errors.BackendTimeoutError("no answer"), clock=clock, takes_s=1.5)
    d = dispatcher(cpu, gpu, clock)
    # When a GPU-sized request with 4 s left falls back
    d.dispatch(BOTH, json_call(32), deadline=Deadline(4.0, clock))
    # Then the GPU had 4 s and the CPU gets the 2.5 s that remain
    assert gpu.timeouts == [4.0]
    assert cpu.timeouts == [pytest.approx(2.5)]


def test_a_spent_deadline_is_a_504_before_any_tier_is_called(clock) -> None:
    # Given requests whose deadline is below the least time a call is given
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    d = dispatcher(cpu, gpu, clock)
    # When a CPU-bound and a GPU-bound one are dispatched
    for rows in (1, 32):
        with pytest.raises(errors.BackendTimeoutError, match="deadline has passed"):
            d.dispatch(BOTH, json_call(rows), deadline=Deadline(0.01, clock))
    # Then neither tier was called
    assert (cpu.calls, gpu.calls) == ([], [])


def test_a_spent_deadline_does_not_count_against_the_gpu_breaker(clock) -> None:
    # Given a healthy GPU and a breaker that opens after 2 failures
    d = dispatcher(FakeBackend("cpu"), FakeBackend("gpu"), clock)
    # When two GPU-bound requests arrive with no time left
    for _ in range(2):
        with pytest.raises(errors.BackendTimeoutError):
            d.dispatch(BOTH, json_call(32), deadline=Deadline(0.01, clock))
    # Then the breaker is still closed: the requests ran out of time, the GPU did not fail
    assert d.breaker.state == "closed"


def test_a_deadline_counts_down_on_its_clock_and_caps_each_call(clock) -> None:
    # Given a 3 s deadline
    deadline = Deadline(3.0, clock)
    # When 1.25 s pass
    clock.advance(1.25)
    # Then 1.75 s are left, and a call gets that or its own cap, whichever is smaller
    assert (deadline.remaining(), deadline.remaining_ms()) == (1.75, 1750.0)
    assert (deadline.budget(10.0), deadline.budget(1.0)) == (1.75, 1.0)
    # When almost all of it is gone, Then the next call is refused as a timeout
    clock.advance(1.72)
    with pytest.raises(errors.BackendTimeoutError, match="no time is left"):
        deadline.budget(10.0)


def test_no_deadline_gives_each_call_its_cap() -> None:
    # Given no limit, or a context that cannot tell the time left
    for deadline in (Deadline(None), Deadline.from_context(object())):
        # Then nothing is left to count and each call gets its cap
        assert (deadline.remaining(), deadline.remaining_ms(), deadline.budget(7.0)) == (None, None, 7.0)


def test_a_lambda_context_deadline_keeps_a_margin_for_the_response() -> None:
    # Given an invocation with 2 s left
    context = FakeLambdaContext(2000)
    # When its deadline is taken with the default and with a 0.5 s margin
    default, wide = Deadline.from_context(context), Deadline.from_context(context, margin_s=0.5)
    # Then what is left excludes the margin (nothing waits between the two reads)
    assert 2.0 - RESPONSE_MARGIN_S - 0.1 < default.remaining() <= 2.0 - RESPONSE_MARGIN_S
    assert 1.4 < wide.remaining() <= 1.5


# --- what the rest of the runtime asks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "cpu_loads", "gpu_ready", "expected", "gpu_probes"),
    [(("gpu", "cpu"), True, False, True, []), (("gpu", "cpu"), False, True, True, ["m"]),
     (("gpu",), True, True, True, ["m"]), (("gpu",), True, False, False, ["m", None])],
    ids=["cpu-copy-loads", "cpu-copy-broken-gpu-up", "gpu-only-up", "gpu-only-down"],
)
def test_ready_when_the_cpu_copy_loads_or_else_when_the_gpu_is_usable(clock, targets, cpu_loads, gpu_ready,
                                                                       expected, gpu_probes) -> None:
    # Given a model on `targets`, a CPU tier that can or cannot load it, and a GPU on which it is or is not ready
    cpu, gpu = FakeBackend("cpu", model_ready=cpu_loads), FakeBackend("gpu", model_ready=gpu_ready)
    d = dispatcher(cpu, gpu, clock)
    # When readiness is asked
    # Then the CPU copy answers first, and the GPU is probed only when it must
    assert d.ready(model_version("m", targets)) is expected
    assert gpu.ready_calls == gpu_probes
    assert cpu.ready_calls == (["m"] if "cpu" in targets else [])


def test_state_names_the_configured_tiers_and_the_circuit(clock) -> None:
    # Given a dispatcher with both tiers, and one with none
    d = dispatcher(FakeBackend("cpu"), FakeBackend("gpu"), clock)
    # Then the state says so, and follows the breaker
    assert d.state() == {"cpu": "configured", "gpu": "closed"}
    d.breaker.record_failure()
    d.breaker.record_failure()
    assert d.state() == {"cpu": "configured", "gpu": "open"}
    assert dispatcher(None, None, clock).state() == {"cpu": "none", "gpu": "none"}


def test_score_runs_numpy_arrays_through_the_same_tiers(clock) -> None:
    # Given both tiers up
    cpu, gpu = FakeBackend("cpu"), FakeBackend("gpu")
    d = dispatcher(cpu, gpu, clock)
    # When batch scoring sends 3 rows and then 32 rows as numpy arrays
    small, large = d.score(BOTH, {"x": rows_of(3)}), d.score(BOTH, {"x": rows_of(32, seed=1)})
    # Then each tier got a call built from the arrays, and every output comes back as an array
    assert (len(cpu.calls), len(gpu.calls)) == (1, 1)
    assert cpu.calls[0].call.materialized and cpu.calls[0].call.rows == 3
    assert (small["y"].shape, large["y"].shape) == ((3, 3), (32, 3))


# --- versions and the canary ------------------------------------------------------------------------------


def canary_manifest(percent: float | None) -> Manifest:
    versions = {v: model_version("m", ("cpu",), v) for v in ("1", "2")}
    canary = None if percent is None else {"version": "2", "percent": percent}
    return Manifest(models={"m": ModelEntry("m", "1", versions, canary)})


def test_no_version_means_the_default_and_a_named_version_bypasses_the_canary() -> None:
    # Given a model without a canary, and one with a 100 % canary on version 2
    plain, canary = canary_manifest(None), canary_manifest(100)
    # Then an unnamed version is the default (or the canary), a named one is served as named
    assert pick_version(plain, "m", None, "r1").version == "1"
    assert pick_version(canary, "m", None, "r1").version == "2"
    assert pick_version(canary, "m", "1", "r1").version == "1"
    # And a version the model does not have is a 404
    with pytest.raises(errors.ModelNotFoundError):
        pick_version(plain, "m", "3", None)


@pytest.mark.parametrize("percent", [0, 10, 30, 50, 100])
def test_the_canary_share_matches_its_percent(percent: float) -> None:
    # Given a canary at `percent`
    manifest = canary_manifest(percent)
    # When 4000 deterministic request ids are routed
    picks = [pick_version(manifest, "m", None, f"req-{i}").version for i in range(4000)]
    # Then the canary's share is the percent (binomial sd <= 0.8 %; band +-2.5 %), exactly at 0 and 100
    share = picks.count("2") / len(picks)
    assert share == pytest.approx(percent / 100, abs=0 if percent in (0, 100) else 0.025)


def test_the_canary_is_stable_per_request_id() -> None:
    # Given a 50 % canary
    manifest = canary_manifest(50)
    ids = [f"id-{i}" for i in range(200)]
    # When the same ids are routed three times
    runs = [[pick_version(manifest, "m", None, i).version for i in ids] for _ in range(3)]
    # Then each id always lands on the same version, and both versions occur
    assert runs[0] == runs[1] == runs[2]
    assert set(runs[0]) == {"1", "2"}


# --- the CPU tier throttled: the other way round ------------------------------------------------------


def test_a_throttled_cpu_tier_sends_a_dual_target_model_to_the_gpu(clock) -> None:
    # Given the CPU tier refusing for lack of concurrency (nothing ran) and a healthy GPU tier
    cpu = FakeBackend("cpu", fail=errors.TierThrottledError("CpuInferenceFunction is throttled"))
    gpu = FakeBackend("gpu")
    d = dispatcher(cpu, gpu, clock)
    # When a small batch (a CPU decision) arrives for a model both tiers serve
    done = d.dispatch(BOTH, json_call(2, "r1"))
    # Then the GPU served it, marked cpu-unavailable, after one CPU attempt
    assert done.served_by == "gpu" and done.fallback == "cpu-unavailable"
    assert "CPU tier unavailable" in done.decision.reason
    assert cpu.ids == ["r1"] and gpu.ids == ["r1"]


def test_a_throttled_cpu_tier_is_a_503_for_a_cpu_only_model_or_when_the_gpu_fails_too(clock) -> None:
    cpu_only = model_version("c", ("cpu",))
    throttled = errors.TierThrottledError("throttled", retry_after_s=1)
    d = dispatcher(FakeBackend("cpu", fail=throttled), FakeBackend("gpu"), clock)
    with pytest.raises(errors.TierThrottledError):
        d.dispatch(cpu_only, json_call(2))
    # the GPU fails as well: a 503, and the CPU is not tried a second time
    cpu = FakeBackend("cpu", fail=throttled)
    d = dispatcher(cpu, FakeBackend("gpu", fail=errors.BackendUnavailableError("refused")), clock)
    with pytest.raises(errors.BackendUnavailableError, match="CPU tier is throttled and the GPU tier failed"):
        d.dispatch(BOTH, json_call(2))
    assert len(cpu.calls) == 1
    assert error_response(errors.TierThrottledError("x", retry_after_s=1))["statusCode"] == 503


def test_any_other_cpu_failure_is_not_moved_to_the_gpu(clock) -> None:
    # the CPU function ran and failed (or timed out): it may have run, so it is never retried elsewhere
    cpu = FakeBackend("cpu", fail=errors.BackendTimeoutError("did not answer"))
    gpu = FakeBackend("gpu")
    with pytest.raises(errors.BackendTimeoutError):
        dispatcher(cpu, gpu, clock).dispatch(BOTH, json_call(2))
    assert gpu.calls == []


def test_the_tiers_state_serialises_with_orjson(clock) -> None:
    # Tier is a StrEnum: orjson takes it as a value but refuses it as a dict key
    import orjson

    d = dispatcher(FakeBackend("cpu"), FakeBackend("gpu"), clock)
    assert orjson.loads(orjson.dumps(d.state())) == {"cpu": "configured", "gpu": "closed"}
    assert orjson.loads(orjson.dumps(d.dispatch(BOTH, json_call(32)).served_by)) == "gpu"


# --- generation (issue 17) ----------------------------------------------------------------------------------


class _StreamClient:
    """invoke_with_response_stream answering a CPU function's NDJSON generation (HTTP-integration prelude)."""

    def __init__(self, lines: list[bytes] | None = None, exc: BaseException | None = None,
                 prelude: dict | None = None, body: bytes = b"") -> None:
        self.lines, self.exc, self.calls, self.closed, self.pulled = lines or [], exc, [], False, 0
        self.prelude = prelude or {"statusCode": 200, "headers": {"content-type": "application/x-ndjson"}}
        self.body = body

    def invoke_with_response_stream(self, **kwargs):
        import json as _json

        self.calls.append(kwargs)
        if self.exc is not None:
            raise self.exc
        client = self
        events = [{"PayloadChunk": {"Payload": _json.dumps(self.prelude).encode() + b"\x00" * 8 + self.body}},
                  *({"PayloadChunk": {"Payload": line}} for line in self.lines), {"InvokeComplete": {}}]

        class Stream:
            def __iter__(self):
                for ev in events:
                    client.pulled += 1
                    yield ev

            def close(self) -> None:
                client.closed = True

        return {"StatusCode": 200, "EventStream": Stream(),
                "ResponseStreamContentType": "application/vnd.awslambda.http-integration-response"}


def _lambda_dispatcher(client, clock=None) -> TierDispatcher:
    from tierserve.backends.lambda_invoke import LambdaInvokeBackend

    cpu = LambdaInvokeBackend("cpu-fn", client=client, functions={1769: "cpu-1769"})
    return TierDispatcher(cpu, None, size_aware)


def _request(version=None):
    from tierserve.generation.requests import KIND_COMPLETION, GenerationRequest, SamplingParams

    return GenerationRequest("m", version, KIND_COMPLETION, SamplingParams(max_tokens=3), prompt_ids=(1, 2, 3))


def _line(text: str, ids: tuple[int, ...], finish: str | None = None) -> bytes:
    import json as _json

    from tierserve.generation.events import GenerationEvent, Usage

    usage = Usage(3, 2) if finish else None
    return _json.dumps(GenerationEvent(text, ids, finish, usage, "cpu").to_json()).encode() + b"\n"


def test_a_generation_goes_to_the_models_cpu_function_over_a_response_stream_with_its_version_pinned() -> None:
    import json as _json

    # Given a router whose CPU tier is the CPU class functions, and a function streaming three events in pieces
    body = _line("He", (5,)) + _line("llo", (6,)) + _line("", (), "stop")
    client = _StreamClient([body[:7], body[7:30], body[30:]])
    d = _lambda_dispatcher(client)
    # When a generation for the model's default version runs
    events = list(d.generate_remote(BOTH, _request(), Deadline(60), lambda: False))
    # Then the model's memory-class function got {"generate": request} with the version the router picked
    call = client.calls[0]
    assert call["FunctionName"] == "cpu-1769"
    sent = _json.loads(call["Payload"])["generate"]
    assert sent["version"] == "1" and sent["prompt_ids"] == [1, 2, 3] and sent["params"]["max_tokens"] == 3
    # And the events came back whole, however the lines were split, the last with its usage
    assert [e.text for e in events] == ["He", "llo", ""] and events[-1].finish_reason == "stop"
    assert events[-1].usage is not None and events[-1].usage.total_tokens == 5 and client.closed


def test_a_throttled_cpu_function_is_a_429_with_retry_after_before_any_event() -> None:
    from botocore.exceptions import ClientError

    exc = ClientError({"Error": {"Code": "TooManyRequestsException", "Message": "Rate Exceeded."}},
                      "InvokeWithResponseStream")
    d = _lambda_dispatcher(_StreamClient(exc=exc))
    with pytest.raises(errors.TooManyRequestsError, match="concurrency limit") as info:
        next(d.generate_remote(BOTH, _request(), Deadline(60), lambda: False))
    assert info.value.retry_after_s == 1
    assert error_response(info.value)["statusCode"] == 429


def test_the_cpu_functions_4xx_keeps_its_status_code_and_retry_after() -> None:
    import json as _json

    # Given a CPU function that refused before its first event: at the model's cap (429), or a bad request (400)
    busy = _StreamClient(prelude={"statusCode": 429, "headers": {"retry-after": "3"}},
                         body=_json.dumps({"error": {"message": "at its cap", "code": "rate_limit_exceeded"}}).encode())
    with pytest.raises(errors.TooManyRequestsError, match="at its cap") as info:
        next(_lambda_dispatcher(busy).generate_remote(BOTH, _request(), Deadline(60), lambda: False))
    assert info.value.retry_after_s == 3.0 and info.value.code == "rate_limit_exceeded"
    bad = _StreamClient(prelude={"statusCode": 400, "headers": {}}, body=_json.dumps(
        {"error": {"message": "too long", "code": "context_length_exceeded", "param": "messages"}}).encode())
    with pytest.raises(errors.InvalidRequestError, match="too long") as info2:
        next(_lambda_dispatcher(bad).generate_remote(BOTH, _request(), Deadline(60), lambda: False))
    assert info2.value.code == "context_length_exceeded" and getattr(info2.value, "param", None) == "messages"


def test_cancelled_stops_reading_the_stream_after_the_event_in_hand() -> None:
    body = [_line("a", (1,)), _line("b", (2,)), _line("c", (3,)), _line("", (), "length")]
    client = _StreamClient(body)
    gone = {"yes": False}
    it = _lambda_dispatcher(client).generate_remote(BOTH, _request(), Deadline(60), lambda: gone["yes"])
    assert next(it).text == "a"
    gone["yes"] = True  # the client went away
    assert list(it) == [] and client.closed
    assert client.pulled <= 2  # the prelude chunk and the first line: nothing more was read


def test_a_generation_past_its_deadline_ends_with_a_timeout_and_closes_its_source(clock) -> None:
    # Given a CPU function streaming many events, 0.5 s apart, and a request with 2 s left
    client = _StreamClient([_line("x", (1,)) for _ in range(20)])

    def cancelled() -> bool:  # read after each event: the clock moves on by the gap between events
        clock.advance(0.5)
        return False

    got = []
    with pytest.raises(errors.BackendTimeoutError, match="past the request's time limit"):
        for event in _lambda_dispatcher(client).generate_remote(BOTH, _request(), Deadline(2.0, clock=clock),
                                                                cancelled):
            got.append(event)
    # Then it ended at the deadline, with the stream closed
    assert len(got) == 4 and client.closed


def test_generation_is_the_cpu_functions_and_none_in_process_and_refuses_a_gpu_only_model() -> None:
    # Given an in-process CPU tier and a GPU tier that does not generate: no generation backend of its own
    assert TierDispatcher(FakeBackend("cpu"), FakeBackend("gpu"), size_aware).generate is None
    # And with the CPU tier remote, a GPU-only model with no GPU tier that generates is a fast 503
    d = _lambda_dispatcher(_StreamClient())
    assert d.generate is not None
    with pytest.raises(errors.BackendUnavailableError, match="runs on the GPU tier only"):
        next(d.generate(_generative(GPU_ONLY), _request(), Deadline(60), lambda: False))


# --- generation across the tiers (issue 18) ------------------------------------------------------------------

#: A byte-level vocabulary: 4 and 5 are the two bytes of "é" (a character split across two tokens); 0 is EOS.
VOCAB = {0: b"", 1: b"He", 2: b"llo", 3: b" w", 4: b"\xc3", 5: b"\xa9", 6: b"!", 7: b" x", 8: b"ST", 9: b"OP"}


class _Tokenizer:
    """decode as a byte-level BPE does (invalid bytes as U+FFFD), the EOS skipped as a special token."""

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(VOCAB[int(i)] for i in ids if not (skip_special_tokens and int(i) == 0)).decode(
            "utf-8", "replace")


def _generative(mv, cpu_tps: float = 20.0):
    from dataclasses import replace as _replace

    from tierserve.manifest import GenerationSpec, TierFigures

    spec = GenerationSpec(context_length=4096, eos_token_ids=(0,), default_max_tokens=16, slo_total_ms=5000.0,
                          tiers={"cpu": TierFigures({16: 50.0, 1024: 3000.0}, cpu_tps, 5.0),
                                 "gpu": TierFigures({16: 20.0, 1024: 100.0}, 200.0, 1.0)})
    return _replace(mv, task="text-generation", generation=spec)


GEN = _generative(BOTH)


def _gen_request(ids=(1, 2), max_tokens: int = 8, hint: str | None = None, stop: tuple[str, ...] = ()):
    from tierserve.generation.requests import KIND_COMPLETION, GenerationRequest, SamplingParams

    return GenerationRequest("m", "1", KIND_COMPLETION, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                       stop=stop),
                             prompt="Hello", prompt_ids=tuple(ids), hint=hint)


def _event(tier: str, ids: tuple[int, ...], text: str | None = None, finish: str | None = None, prompt: int = 2):
    from tierserve.generation.events import GenerationEvent, Usage

    text = _Tokenizer().decode(ids) if text is None else text
    return GenerationEvent(text, ids, finish, Usage(prompt, 0) if finish else None, tier)


class _GenTier(FakeBackend):
    """A tier that generates: ``script`` (events, then an exception or nothing) per call, recorded."""

    def __init__(self, tier: str, scripts: list[tuple[list, BaseException | None]] | None = None, **kw) -> None:
        super().__init__(tier, **kw)
        self.scripts = list(scripts or [])
        self.generations: list = []
        self.text_inputs: list = []
        self.closed = 0

    def generate(self, model, request, deadline=None, cancelled=lambda: False, *, text_input=None):
        self.generations.append(request)
        self.text_inputs.append(text_input)
        events, exc = self.scripts.pop(0) if self.scripts else ([_event(self.tier, (6,), finish="stop")], None)
        return self._run(events, exc)

    def local(self, model, request, cancelled):
        return self.generate(model, request, None, cancelled)

    def _run(self, events, exc):
        try:
            yield from events
            if exc is not None:
                raise exc
        finally:
            self.closed += 1


def _tiers(cpu: _GenTier, gpu: _GenTier | None, clock, **kw) -> TierDispatcher:
    return dispatcher(cpu, gpu, clock, **kw)


def _run_tiers(d: TierDispatcher, cpu: _GenTier, request, model=GEN):
    gen = d.generate_tiers(model, request, Deadline(60), lambda: False, local=cpu.local,
                           tokenizer=lambda: _Tokenizer())
    return gen, list(gen)


def test_a_short_generation_goes_to_the_cpu_and_a_long_one_to_the_gpu(clock) -> None:
    # Given a model whose figures make the CPU meet a 5 s SLO for short answers only
    cpu, gpu = _GenTier("cpu"), _GenTier("gpu")
    d = _tiers(cpu, gpu, clock)
    # When a short completion and a long prompt with a large max_tokens arrive
    short, short_events = _run_tiers(d, cpu, _gen_request(max_tokens=16))
    long_, long_events = _run_tiers(d, cpu, _gen_request(ids=tuple(range(1, 10)) * 60, max_tokens=400))
    # Then the CPU serves the first and the GPU the second, each saying so, neither as a fallback
    assert (short.served_by, short.fallback, long_.served_by, long_.fallback) == ("cpu", None, "gpu", None)
    assert short.decision.target == "cpu" and long_.decision.target == "gpu"
    assert short_events[-1].served_by == "cpu" and long_events[-1].served_by == "gpu"
    # And the GPU got the completion's own text (the vLLM backend takes text)
    assert gpu.text_inputs == ["Hello"] and len(cpu.generations) == 1


def test_the_router_meters_the_gpu_tiers_stream_once_it_ends(clock, monkeypatch, capsys) -> None:
    # Given a generation the GPU tier serves (no other process sees its stream: the CPU tier meters its own)
    import json

    from tierserve.generation.events import GenerationEvent, Usage

    monkeypatch.setenv("TIERSERVE_METRICS", "true")
    last = GenerationEvent("b", (7,), "stop", Usage(2, 2), "gpu", tokens_per_s=100.0)
    first = GenerationEvent("a", (6,), None, None, "gpu", ttft_ms=12.0)
    cpu, gpu = _GenTier("cpu"), _GenTier("gpu", scripts=[([first, last], None)])
    d = _tiers(cpu, gpu, clock)
    capsys.readouterr()
    gen, events = _run_tiers(d, cpu, _gen_request(max_tokens=16, hint="gpu"))
    # Then the router emits the generation's figures once, for the GPU tier (what a rollout and the TTFT alarm read)
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    gen_docs = [doc for doc in docs if "CompletionTokens" in doc]
    assert gen.served_by == "gpu" and len(events) == 2
    assert [(doc["model"], doc["version"], doc["tier"], doc["CompletionTokens"], doc["TimeToFirstToken"])
            for doc in gen_docs] == [("m", "1", "gpu", 2, 12.0)]


def test_a_hint_overrides_the_token_rule(clock) -> None:
    cpu, gpu = _GenTier("cpu"), _GenTier("gpu")
    d = _tiers(cpu, gpu, clock)
    gen, _ = _run_tiers(d, cpu, _gen_request(max_tokens=16, hint="gpu"))
    assert gen.served_by == "gpu" and "client hint gpu" in gen.decision.reason
    gen, _ = _run_tiers(d, cpu, _gen_request(ids=(1,) * 600, max_tokens=400, hint="cpu"))
    assert gen.served_by == "cpu"


def test_a_gpu_failing_before_its_first_token_falls_back_to_the_cpu_and_counts_against_the_breaker(clock) -> None:
    # Given a GPU tier whose stream fails before any token (a 503, a refused connection)
    cpu = _GenTier("cpu")
    gpu = _GenTier("gpu", scripts=[([], errors.BackendUnavailableError("Triton is unreachable"))] * 2)
    d = _tiers(cpu, gpu, clock)
    # When a generation the GPU should serve runs
    gen, events = _run_tiers(d, cpu, _gen_request(max_tokens=16, hint="gpu"))
    # Then the CPU copy served all of it, marked gpu-unavailable, and the failure counted
    assert (gen.served_by, gen.fallback) == ("cpu", "gpu-unavailable") and events[-1].final
    assert cpu.generations[0].prompt_ids == (1, 2) and cpu.generations[0].params.max_tokens == 16
    assert "Triton is unreachable" in gen.decision.reason
    _run_tiers(d, cpu, _gen_request(max_tokens=16, hint="gpu"))
    assert d.breaker.state == "open"
    # And with the circuit open the GPU is not even asked
    gen, _ = _run_tiers(d, cpu, _gen_request(max_tokens=16, hint="gpu"))
    assert (gen.fallback, len(gpu.generations)) == ("gpu-unavailable", 2) and "circuit open" in gen.decision.reason


def test_an_input_error_from_the_gpu_is_the_clients_and_never_counts(clock) -> None:
    cpu = _GenTier("cpu")
    gpu = _GenTier("gpu", scripts=[([], errors.InvalidRequestError("maximum context length"))] * 3)
    d = _tiers(cpu, gpu, clock)
    for _ in range(3):
        with pytest.raises(errors.InvalidRequestError) as info:
            _run_tiers(d, cpu, _gen_request(max_tokens=16, hint="gpu"))
        assert info.value.served_by == "gpu"
    assert d.breaker.state == "closed" and cpu.generations == []


def test_a_gpu_only_model_whose_gpu_fails_gets_a_fast_503(clock) -> None:
    gpu = _GenTier("gpu", scripts=[([], errors.BackendUnavailableError("down"))])
    d = _tiers(_GenTier("cpu"), gpu, clock)
    with pytest.raises(errors.BackendUnavailableError, match="GPU tier only"):
        next(d.generate_tiers(_generative(GPU_ONLY), _gen_request(), Deadline(60), lambda: False))


def test_a_gpu_stream_broken_mid_way_goes_on_on_the_cpu_from_the_ids_already_sent(clock, monkeypatch) -> None:
    from tierserve import telemetry

    metrics: list = []
    monkeypatch.setattr(telemetry, "failover_mid_stream", lambda *a: metrics.append(a))
    # Given a GPU that streams "He", "llo" and the first byte of "é" (text held back), then breaks
    gpu = _GenTier("gpu", scripts=[([_event("gpu", (1,)), _event("gpu", (2,)), _event("gpu", (4,), "")],
                                    errors.BackendUnavailableError("the connection was cut"))])
    # And a CPU copy whose own detokenizer starts afresh (the second byte of "é" alone is U+FFFD)
    cpu = _GenTier("cpu", scripts=[([_event("cpu", (5,)), _event("cpu", (6,)),
                                     _event("cpu", (0,), "", finish="stop", prompt=5)], None)])
    d = _tiers(cpu, gpu, clock)
    # When the generation runs
    gen, events = _run_tiers(d, cpu, _gen_request(max_tokens=10, hint="gpu"))
    # Then the CPU was asked to continue from the prompt plus the 3 ids streamed, for the 7 tokens left
    cont = cpu.generations[0]
    assert cont.prompt_ids == (1, 2, 1, 2, 4) and cont.params.max_tokens == 7 and cont.params.greedy
    # And the client saw one stream whose text is the decode of every id, nothing lost or repeated
    assert "".join(e.text for e in events) == "Helloé!" == _Tokenizer().decode([1, 2, 4, 5, 6, 0])
    assert [t for e in events for t in e.token_ids] == [1, 2, 4, 5, 6, 0]
    # And the final event records the failover, the usage counts every token, the CPU tier finished
    final = events[-1]
    assert final.extra["failover"] == {"from": "gpu", "to": "cpu", "after_tokens": 3} == gen.failover
    assert final.usage is not None and (final.usage.prompt_tokens, final.usage.completion_tokens) == (2, 6)
    assert final.served_by == "cpu" and gen.served_by == "gpu" and gen.fallback is None
    assert metrics == [("m", "1", "gpu", "cpu", 3)] and gpu.closed == 1 and cpu.closed == 1
    assert d.breaker._failures == 1  # a tier failure, counted


def test_a_stop_string_that_spans_the_failover_still_stops_the_stream(clock) -> None:
    gpu = _GenTier("gpu", scripts=[([_event("gpu", (1,)), _event("gpu", (8,), "")],
                                    errors.InferenceError("the GPU tier failed mid-stream"))])
    cpu = _GenTier("cpu", scripts=[([_event("cpu", (9,)), _event("cpu", (7,)), _event("cpu", (6,), finish="length",
                                                                                       prompt=4)], None)])
    d = _tiers(cpu, gpu, clock)
    _, events = _run_tiers(d, cpu, _gen_request(max_tokens=10, hint="gpu", stop=("STOP",)))
    assert "".join(e.text for e in events) == "He" and events[-1].finish_reason == "stop"
    assert cpu.closed == 1  # the continuation was stopped at the stop string


def test_when_no_tier_can_continue_the_stream_ends_with_an_error_never_a_silent_truncation(clock) -> None:
    gpu = _GenTier("gpu", scripts=[([_event("gpu", (1,))], errors.BackendUnavailableError("cut"))])
    cpu = _GenTier("cpu", scripts=[([], errors.TooManyRequestsError("at its cap", retry_after_s=1))])
    d = _tiers(cpu, gpu, clock)
    gen = d.generate_tiers(GEN, _gen_request(max_tokens=10, hint="gpu"), Deadline(60), lambda: False,
                           local=cpu.local, tokenizer=lambda: _Tokenizer())
    assert next(gen).text == "He"
    with pytest.raises(errors.BackendUnavailableError, match=r"after 1 tokens .* could not continue"):
        next(gen)
    # And a GPU-only model has nothing to continue on
    gpu = _GenTier("gpu", scripts=[([_event("gpu", (1,))], errors.BackendUnavailableError("cut"))])
    d = _tiers(_GenTier("cpu"), gpu, clock)
    gen = d.generate_tiers(_generative(GPU_ONLY), _gen_request(), Deadline(60), lambda: False)
    assert next(gen).text == "He"
    with pytest.raises(errors.BackendUnavailableError, match="no CPU copy"):
        next(gen)


def test_a_stream_broken_after_its_last_token_ends_with_length_without_asking_the_cpu(clock) -> None:
    gpu = _GenTier("gpu", scripts=[([_event("gpu", (1,)), _event("gpu", (2,))], errors.BackendUnavailableError("cut"))])
    cpu = _GenTier("cpu")
    d = _tiers(cpu, gpu, clock)
    _, events = _run_tiers(d, cpu, _gen_request(max_tokens=2, hint="gpu"))
    assert events[-1].finish_reason == "length" and events[-1].extra["failover"]["after_tokens"] == 2
    assert cpu.generations == [] and "".join(e.text for e in events) == "Hello"


def test_a_cpu_tier_at_its_limit_moves_a_placed_generation_to_the_gpu(clock) -> None:
    cpu = _GenTier("cpu", scripts=[([], errors.TooManyRequestsError("at its cap", retry_after_s=1))] * 2)
    gpu = _GenTier("gpu")
    d = _tiers(cpu, gpu, clock)
    gen, events = _run_tiers(d, cpu, _gen_request(max_tokens=16))
    assert (gen.served_by, gen.fallback) == ("gpu", "cpu-unavailable") and events[-1].final
    # but a request that asked for the CPU gets the 429
    with pytest.raises(errors.TooManyRequestsError):
        _run_tiers(d, cpu, _gen_request(max_tokens=16, hint="cpu"))


def test_the_cpu_function_is_asked_to_generate_itself(clock) -> None:
    import json as _json

    body = _line("He", (5,)) + _line("", (), "stop")
    client = _StreamClient([body])
    list(_lambda_dispatcher(client).generate_remote(BOTH, _request(), Deadline(60), lambda: False))
    assert _json.loads(client.calls[0]["Payload"])["generate"]["hint"] == "cpu"
