"""backends/base.py: what every backend shares - remembered readiness, the shared pools, clients by timeout."""

from __future__ import annotations

import pytest

from tests.support.fakes import FakeClock
from tierserve import errors
from tierserve.backends.base import ClientsByTimeout, Readiness, ready_by, shared_pool


def test_a_success_stands_for_its_ttl_and_a_failure_is_retried_after_retry_s() -> None:
    # Given readiness remembered 30 s when ready and 5 s when not, and a probe that fails once
    clock = FakeClock()
    readiness = Readiness(ok_ttl_s=30.0, retry_s=5.0, clock=clock)
    answers = [errors.InferenceError("not loaded"), None]
    probes: list[int] = []

    def probe() -> errors.TierserveError | None:
        probes.append(1)
        return answers.pop(0)

    # When it is checked, the failure is raised and remembered: no second probe within 5 s
    for _ in range(2):
        with pytest.raises(errors.InferenceError, match="not loaded"):
            readiness.check("m/1", probe)
    assert len(probes) == 1
    # Then after 5 s the probe runs again, and its success stands for 30 s
    clock.advance(5.0)
    readiness.check("m/1", probe)
    clock.advance(29.0)
    readiness.check("m/1", probe)
    assert len(probes) == 2
    clock.advance(1.0)
    answers.append(None)
    readiness.check("m/1", probe)
    assert len(probes) == 3


def test_a_success_without_ttl_stands_for_good_and_ready_by_never_raises() -> None:
    clock = FakeClock()
    readiness = Readiness(ok_ttl_s=None, retry_s=5.0, clock=clock)
    readiness.check("sha", lambda: None)
    clock.advance(1e9)
    readiness.check("sha", lambda: errors.InferenceError("would fail"))  # not probed again

    def failing(model: object) -> None:
        raise errors.BackendUnavailableError("down")

    assert ready_by(failing, object()) is False  # type: ignore[arg-type]
    assert ready_by(failing, None) is True  # server readiness: no model to check


def test_shared_pools_are_one_per_name_and_made_on_first_use() -> None:
    a = shared_pool("test-base-pool", 2)
    assert shared_pool("test-base-pool", 8) is a and a._max_workers == 2
    assert shared_pool("test-base-other", 2) is not a
    assert a.submit(lambda: 41 + 1).result(timeout=5) == 42


def test_clients_are_one_per_timeout_without_retries_and_an_injected_one_serves_all(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    injected = object()
    assert ClientsByTimeout("lambda", injected).get(1.0) is injected
    clients = ClientsByTimeout("lambda")
    one, again, other = clients.get(1.0), clients.get(1.0), clients.get(5.0)
    assert one is again and one is not other
    cfg = one.meta.config
    assert cfg.read_timeout == 1.0 and cfg.connect_timeout == 1.0 and cfg.retries["total_max_attempts"] == 1
