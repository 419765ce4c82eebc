"""CircuitBreaker and HealthCache on a FakeClock: state transitions, then the same guarantees under threads.

No sleeps decide an outcome: where threads must overlap, an Event holds a probe open until they do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.fakes import FakeClock
from tierserve.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, HealthCache


def opened(clock: FakeClock, **kw: Any) -> CircuitBreaker:
    b = CircuitBreaker(clock=clock, **kw)
    for _ in range(b.failure_threshold):
        b.record_failure()
    assert b.state == OPEN
    return b


def together(n: int, fn: Callable[[], Any]) -> list[Any]:
    """Run ``fn`` on ``n`` threads released at the same instant; their results, in thread order."""
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = fn()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# --- CircuitBreaker ---------------------------------------------------------------------------------


def test_every_transition_is_reported_once_with_its_reason() -> None:
    # Given a breaker that reports its transitions, opening after 2 failures and closing after 1 trial
    clock, seen = FakeClock(), []
    b = CircuitBreaker(2, 10.0, 1, clock=clock, on_transition=lambda *t: seen.append(t))
    # When it fails twice, cools down, and its trial succeeds
    b.record_failure("backend_timeout")
    b.record_failure("backend_timeout")
    clock.advance(10)
    assert b.allow()
    b.record_success()
    # Then it reported closed -> open -> half_open -> closed, each once, saying why
    assert [(old, new) for old, new, _ in seen] == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    assert seen[0][2] == "2 consecutive failures, the last: backend_timeout"
    assert "10 s cooldown" in seen[1][2]


def test_trip_opens_at_once_without_counting_and_a_failing_reporter_changes_nothing() -> None:
    # Given a breaker that needs 5 failures, whose reporter raises
    def broken(*_: str) -> None:
        raise RuntimeError("log sink down")

    b = CircuitBreaker(5, 10.0, clock=FakeClock(), on_transition=broken)
    # When it is tripped, Then it is open with the whole cooldown ahead, and a second trip is no transition
    b.trip("the server did not answer a health check")
    assert (b.state, b.allow(), b.retry_after_s()) == (OPEN, False, 10.0)
    b.trip("again")
    assert b.state == OPEN


def test_defaults() -> None:
    # Given a breaker with default settings
    b = CircuitBreaker()
    # Then it is closed, lets calls through, and uses 5 / 30 s / 3
    assert (b.state, b.allow(), b.retry_after_s()) == (CLOSED, True, 0.0)
    assert (b.failure_threshold, b.cooldown_s, b.success_threshold) == (5, 30.0, 3)


def test_every_transition_is_told_once() -> None:
    # Given a breaker that reports its transitions (the BreakerTransitions metric)
    clock, seen = FakeClock(), []
    b = CircuitBreaker(failure_threshold=2, cooldown_s=10, success_threshold=1, clock=clock,
                       on_transition=lambda old, new, why: seen.append((old, new)))
    # When it opens, half-opens after the cooldown, and closes on a success
    b.record_failure()
    b.record_failure()
    clock.advance(10)
    assert b.state == HALF_OPEN
    assert b.allow()
    b.record_success()
    # Then each change was told once, in order
    assert seen == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


@pytest.mark.parametrize("threshold", [5, 2], ids=["default", "custom"])
def test_opens_after_threshold_consecutive_failures(threshold: int) -> None:
    # Given a closed breaker
    b = CircuitBreaker(failure_threshold=threshold, clock=FakeClock())
    # When it records one failure fewer than its threshold
    for _ in range(threshold - 1):
        b.record_failure()
    # Then it is still closed
    assert b.state == CLOSED and b.allow()
    # When it records one more
    b.record_failure()
    # Then it opens and refuses calls
    assert b.state == OPEN
    assert b.allow() is False


def test_a_success_resets_the_failure_count() -> None:
    # Given four failures, a success, then four more failures
    b = CircuitBreaker(clock=FakeClock())
    for _ in range(4):
        b.record_failure()
    b.record_success()
    for _ in range(4):
        b.record_failure()
    # Then the breaker is still closed (the failures were not consecutive)
    assert b.state == CLOSED
    # When one more failure arrives
    b.record_failure()
    # Then five consecutive failures open it
    assert b.state == OPEN


def test_retry_after_counts_down_with_the_clock() -> None:
    # Given a breaker opened with a 30 s cooldown
    clock = FakeClock()
    b = opened(clock, cooldown_s=30.0)
    # Then retry-after is the full cooldown, and shrinks as time passes
    assert b.retry_after_s() == pytest.approx(30.0)
    clock.advance(12.5)
    assert b.retry_after_s() == pytest.approx(17.5)
    assert b.allow() is False


def test_half_opens_after_cooldown() -> None:
    # Given an open breaker
    clock = FakeClock()
    b = opened(clock, cooldown_s=30.0)
    # When just under the cooldown has passed
    clock.advance(29.999)
    # Then it is still open
    assert b.state == OPEN and not b.allow()
    # When the cooldown has passed
    clock.advance(0.001)
    # Then it is half-open and retry-after is 0
    assert b.state == HALF_OPEN
    assert b.retry_after_s() == 0.0


def test_closes_after_success_threshold_trials() -> None:
    # Given a half-open breaker that needs 3 successes
    clock = FakeClock()
    b = opened(clock, cooldown_s=1.0, success_threshold=3)
    clock.advance(1.0)
    # When two trials succeed
    for _ in range(2):
        assert b.allow()
        b.record_success()
    # Then it is still half-open
    assert b.state == HALF_OPEN
    # When the third succeeds
    assert b.allow()
    b.record_success()
    # Then it is closed and lets everything through; the failure count starts from zero
    assert b.state == CLOSED
    assert all(b.allow() for _ in range(10))
    for _ in range(4):
        b.record_failure()
    assert b.state == CLOSED


def test_failure_while_half_open_reopens_with_a_fresh_cooldown() -> None:
    # Given a half-open breaker with one successful trial behind it
    clock = FakeClock()
    b = opened(clock, cooldown_s=10.0, success_threshold=3)
    clock.advance(10.0)
    assert b.allow()
    b.record_success()
    # When the next trial fails
    assert b.allow()
    b.record_failure()
    # Then it re-opens at once, with the whole cooldown ahead
    assert b.state == OPEN
    assert b.allow() is False
    assert b.retry_after_s() == pytest.approx(10.0)
    # And the earlier success does not count after the next half-open
    clock.advance(10.0)
    for _ in range(2):
        assert b.allow()
        b.record_success()
    assert b.state == HALF_OPEN


# --- CircuitBreaker under threads -------------------------------------------------------------------


def test_concurrent_failures_open_it_once_with_the_whole_cooldown_ahead() -> None:
    # Given a breaker opening after 5 failures, with a 30 s cooldown
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=5, cooldown_s=30, success_threshold=3, clock=clock)
    # When 32 threads record a failure at the same instant
    together(32, b.record_failure)
    # Then it is open once: the later failures did not push the cooldown back or shorten it
    assert b.state == OPEN and b.retry_after_s() == pytest.approx(30)


def test_half_open_admits_exactly_one_trial_among_many_threads() -> None:
    # Given a half-open breaker that needs 2 successful trials
    clock = FakeClock()
    b = opened(clock, failure_threshold=1, cooldown_s=5.0, success_threshold=2)
    clock.advance(5.0)
    # When 16 threads ask at once
    admitted = together(16, b.allow)
    # Then one trial is admitted and the breaker stays half-open
    assert admitted.count(True) == 1 and b.state == HALF_OPEN
    # And each success admits the next single trial, until the threshold closes it for everyone
    b.record_success()
    assert together(16, b.allow).count(True) == 1
    b.record_success()
    assert b.state == CLOSED and all(together(8, b.allow))


# --- HealthCache ------------------------------------------------------------------------------------


class CountingProbe:
    def __init__(self, value: bool = True) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.value


def test_health_cache_caches_for_ttl() -> None:
    # Given a cache with a 2 s TTL and a counting probe
    clock = FakeClock()
    cache = HealthCache(ttl_s=2.0, clock=clock)
    probe = CountingProbe(True)
    # When it is asked three times within the TTL
    results = [cache.get("m/1", probe) for _ in range(3)]
    clock.advance(1.999)
    results.append(cache.get("m/1", probe))
    # Then the probe ran once
    assert results == [True] * 4
    assert probe.calls == 1
    # When the TTL has passed
    clock.advance(0.001)
    probe.value = False
    # Then the probe runs again and its new answer is returned
    assert cache.get("m/1", probe) is False
    assert probe.calls == 2


def test_probe_exception_counts_as_unhealthy() -> None:
    # Given a probe that raises
    cache = HealthCache(ttl_s=2.0, clock=FakeClock())
    calls = []

    def boom() -> bool:
        calls.append(1)
        raise ConnectionError("refused")

    # When the cache asks it
    # Then the answer is False (cached), and no exception escapes
    assert cache.get("m/1", boom) is False
    assert cache.get("m/1", boom) is False
    assert len(calls) == 1


def test_invalidate_one_key_and_all() -> None:
    # Given two cached keys
    cache = HealthCache(ttl_s=60.0, clock=FakeClock())
    a, b = CountingProbe(), CountingProbe()
    cache.get("a", a)
    cache.get("b", b)
    # When one key is invalidated
    cache.invalidate("a")
    cache.get("a", a)
    cache.get("b", b)
    # Then only that key is probed again
    assert (a.calls, b.calls) == (2, 1)
    # When everything is invalidated
    cache.invalidate()
    cache.get("a", a)
    cache.get("b", b)
    # Then both are probed again
    assert (a.calls, b.calls) == (3, 2)


# --- HealthCache under threads ----------------------------------------------------------------------


def test_one_probe_per_key_is_in_flight_however_many_threads_ask() -> None:
    # Given probes for two keys that block until every asking thread has arrived
    clock = FakeClock()
    cache = HealthCache(ttl_s=2.0, clock=clock)
    release = threading.Event()
    calls = {"a": 0, "b": 0}
    lock = threading.Lock()

    def probe(key: str, value: bool) -> Callable[[], bool]:
        def run() -> bool:
            with lock:
                calls[key] += 1
            assert release.wait(timeout=30)
            return value
        return run

    def ask_both() -> tuple[bool, bool]:
        return cache.get("a", probe("a", True)), cache.get("b", probe("b", False))

    # When 16 threads ask for both keys while nothing is cached yet
    releaser = threading.Timer(0.2, release.set)
    releaser.start()
    results = together(16, ask_both)
    releaser.join()
    # Then each key was probed once, and every caller got that key's own answer
    assert calls == {"a": 1, "b": 1}
    assert set(results) == {(True, False)}


def test_stale_value_is_served_while_a_refresh_is_in_flight() -> None:
    # Given a key cached as healthy whose TTL has passed, and a refresh probe that blocks
    clock = FakeClock()
    cache = HealthCache(ttl_s=2.0, clock=clock)
    cache.get("m/1", CountingProbe(True))
    clock.advance(5.0)
    started, release = threading.Event(), threading.Event()
    refresh_calls = []

    def slow_false() -> bool:
        refresh_calls.append(1)
        started.set()
        assert release.wait(timeout=30)
        return False

    t = threading.Thread(target=cache.get, args=("m/1", slow_false))
    t.start()
    assert started.wait(timeout=30)
    # When another caller asks during the refresh
    second = CountingProbe(True)
    during = cache.get("m/1", second)
    release.set()
    t.join(timeout=30)
    # Then it gets the last known value without probing, and the refresh result lands afterwards
    assert during is True
    assert second.calls == 0
    assert len(refresh_calls) == 1
    assert cache.get("m/1", second) is False
