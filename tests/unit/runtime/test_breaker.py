"""CircuitBreaker and HealthCache under concurrency, on an injectable clock.

Single-threaded state transitions are in test_circuit_breaker.py; here: many threads failing at
once open the breaker exactly once, half-open admits exactly one trial among many threads, and the
health cache runs one probe per key per TTL however many threads ask.
"""

from __future__ import annotations

import threading
import time

import pytest

from tierserve.breaker import CircuitBreaker, HealthCache


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _run(n: int, fn) -> list:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = fn()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_failures_open_once_and_the_cooldown_starts_at_the_threshold() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=5, cooldown_s=30, success_threshold=3, clock=clock)
    # Given 32 threads failing at the same instant
    _run(32, b.record_failure)
    # Then the breaker is open, with the full cool-down left
    assert b.state == "open" and b.retry_after_s() == pytest.approx(30)
    clock.t = 29.9
    assert not b.allow() and b.retry_after_s() == pytest.approx(0.1)


def test_half_open_admits_exactly_one_trial_among_many_threads() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown_s=5, success_threshold=2, clock=clock)
    b.record_failure()
    clock.t = 5.0
    # When 16 threads ask at once after the cool-down
    admitted = _run(16, b.allow)
    # Then one trial is admitted
    assert admitted.count(True) == 1 and b.state == "half_open"
    # And each success admits the next single trial until success_threshold closes it
    b.record_success()
    assert _run(16, b.allow).count(True) == 1
    b.record_success()
    assert b.state == "closed" and all(_run(8, b.allow))


def test_health_cache_single_flight_per_key_under_threads() -> None:
    clock = Clock()
    cache = HealthCache(ttl_s=2.0, clock=clock)
    calls = {"a": 0, "b": 0}
    lock = threading.Lock()

    def probe(key: str, value: bool):
        def run() -> bool:
            with lock:
                calls[key] += 1
            time.sleep(0.05)  # slow enough that every thread arrives while it is in flight
            return value
        return run

    # Given 16 threads asking for two keys at once, nothing cached yet
    results = _run(16, lambda: (cache.get("a", probe("a", True)), cache.get("b", probe("b", False))))
    # Then each key was probed once and every caller got its value
    assert calls == {"a": 1, "b": 1}
    assert set(results) == {(True, False)}
    # When the TTL passes, one refresh per key again
    clock.t = 2.0
    _run(16, lambda: cache.get("a", probe("a", True)))
    assert calls["a"] == 2


def test_health_cache_invalidate_forces_the_next_probe() -> None:
    clock = Clock()
    cache = HealthCache(ttl_s=60, clock=clock)
    values = iter([True, False])
    assert cache.get("k", lambda: next(values)) is True
    assert cache.get("k", lambda: pytest.fail("cached")) is True
    cache.invalidate("k")
    assert cache.get("k", lambda: next(values)) is False
