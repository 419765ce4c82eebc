"""CircuitBreaker and HealthCache, driven by a fake clock (no sleeps, no timing assertions)."""

from __future__ import annotations

import threading

import pytest

from tierserve.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, HealthCache


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def opened(clock: FakeClock, **kw) -> CircuitBreaker:
    b = CircuitBreaker(clock=clock, **kw)
    for _ in range(b.failure_threshold):
        b.record_failure()
    assert b.state == OPEN
    return b


# --- CircuitBreaker --------------------------------------------------------------------------------


def test_defaults() -> None:
    # Given a breaker with default settings
    b = CircuitBreaker()
    # Then it is closed, lets calls through, and uses 5 / 30 s / 3
    assert (b.state, b.allow(), b.retry_after_s()) == (CLOSED, True, 0.0)
    assert (b.failure_threshold, b.cooldown_s, b.success_threshold) == (5, 30.0, 3)


def test_opens_after_default_five_consecutive_failures() -> None:
    # Given a closed breaker
    b = CircuitBreaker(clock=FakeClock())
    # When it records four failures
    for _ in range(4):
        b.record_failure()
    # Then it is still closed
    assert b.state == CLOSED and b.allow()
    # When it records the fifth
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


def test_half_open_admits_one_trial_at_a_time() -> None:
    # Given a half-open breaker
    clock = FakeClock()
    b = opened(clock, cooldown_s=1.0)
    clock.advance(1.0)
    # When several callers ask at once
    answers = [b.allow() for _ in range(5)]
    # Then only the first gets through
    assert answers == [True, False, False, False, False]
    # When the trial succeeds
    b.record_success()
    # Then the next caller gets the next trial (and only it)
    assert [b.allow(), b.allow()] == [True, False]


def test_half_open_trial_admission_under_threads() -> None:
    # Given a half-open breaker and 8 threads that call allow() together
    clock = FakeClock()
    b = opened(clock, cooldown_s=1.0)
    clock.advance(1.0)
    barrier = threading.Barrier(8)
    results: list[bool] = []
    lock = threading.Lock()

    def ask() -> None:
        barrier.wait()
        ok = b.allow()
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then exactly one trial was admitted
    assert sorted(results) == [False] * 7 + [True]


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


def test_custom_failure_threshold() -> None:
    # Given a breaker with failure_threshold 2
    b = CircuitBreaker(failure_threshold=2, clock=FakeClock())
    # When two failures arrive
    b.record_failure()
    b.record_failure()
    # Then it is open
    assert b.state == OPEN


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


def test_health_cache_keys_are_independent() -> None:
    # Given two keys
    cache = HealthCache(ttl_s=2.0, clock=FakeClock())
    a, b = CountingProbe(True), CountingProbe(False)
    # When each is asked
    # Then each has its own probe and value
    assert (cache.get("a/1", a), cache.get("b/1", b)) == (True, False)
    assert (a.calls, b.calls) == (1, 1)


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


def test_single_probe_in_flight_under_eight_threads() -> None:
    # Given a probe that blocks until released, and 8 threads asking for the same (never-probed) key
    cache = HealthCache(ttl_s=60.0)
    started, release = threading.Event(), threading.Event()
    calls = []
    calls_lock = threading.Lock()

    def slow_probe() -> bool:
        with calls_lock:
            calls.append(1)
        started.set()
        assert release.wait(timeout=30)
        return True

    results: list[bool] = []
    results_lock = threading.Lock()

    def ask() -> None:
        ok = cache.get("m/1", slow_probe)
        with results_lock:
            results.append(ok)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    # When all 8 ask while the first probe is still running
    threads[0].start()
    assert started.wait(timeout=30)
    for t in threads[1:]:
        t.start()
    release.set()
    for t in threads:
        t.join(timeout=30)
    # Then the probe ran once and every caller got its answer
    assert len(calls) == 1
    assert results == [True] * 8


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
