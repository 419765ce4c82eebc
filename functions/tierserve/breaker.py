"""A circuit breaker for the GPU tier, and a TTL health cache with a single check in flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; half-opens after ``cooldown_s``;
    closes after ``success_threshold`` consecutive successes while half-open. Any failure while
    half-open re-opens it. While open, ``allow()`` is False: callers go straight to the fallback.
    Half-open admits one trial call at a time, so a sick backend sees one probe, not a stampede."""

    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown_s: float = 30.0,
        success_threshold: int = 3,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[str, str], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        #: Told (old, new) on every state change: the BreakerTransitions metric.
        self.on_transition = on_transition
        self.cooldown_s = cooldown_s
        self.success_threshold = success_threshold
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> str:
        with self._lock:
            self._maybe_half_open()
            return self._state

    def retry_after_s(self) -> float:
        with self._lock:
            if self._state != OPEN:
                return 0.0
            return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def _maybe_half_open(self) -> None:
        if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._set(HALF_OPEN)
            self._successes = 0
            self._trial_in_flight = False

    def allow(self) -> bool:
        with self._lock:
            self._maybe_half_open()
            if self._state == CLOSED:
                return True
            if self._state == HALF_OPEN and not self._trial_in_flight:
                self._trial_in_flight = True
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._trial_in_flight = False
            if self._state == HALF_OPEN:
                self._successes += 1
                if self._successes >= self.success_threshold:
                    self._set(CLOSED)
                    self._failures = 0
            else:
                self._failures = 0

    def record_failure(self) -> None:
        with self._lock:
            self._trial_in_flight = False
            if self._state == HALF_OPEN:
                self._open()
                return
            self._failures += 1
            if self._state == CLOSED and self._failures >= self.failure_threshold:
                self._open()

    def _set(self, state: str) -> None:
        old, self._state = self._state, state
        if old != state and self.on_transition is not None:
            self.on_transition(old, state)

    def _open(self) -> None:
        self._set(OPEN)
        self._opened_at = self._clock()
        self._successes = 0


class HealthCache:
    """Caches a boolean health probe per key for ``ttl_s``; only one probe per key runs at a time
    (other callers get the last known value, or wait for the first one ever)."""

    def __init__(self, ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[str, tuple[bool, float]] = {}
        self._inflight: dict[str, threading.Event] = {}

    def get(self, key: str, probe: Callable[[], bool]) -> bool:
        with self._lock:
            cached = self._values.get(key)
            if cached is not None and self._clock() - cached[1] < self.ttl_s:
                return cached[0]
            event = self._inflight.get(key)
            if event is not None:
                if cached is not None:
                    return cached[0]
                owner = False
            else:
                event = self._inflight[key] = threading.Event()
                owner = True
        if not owner:
            event.wait(timeout=self.ttl_s + 5)
            with self._lock:
                value = self._values.get(key)
                return bool(value and value[0])
        try:
            try:
                ok = bool(probe())
            except Exception:
                ok = False
            with self._lock:
                self._values[key] = (ok, self._clock())
            return ok
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            event.set()

    def invalidate(self, key: str | None = None) -> None:
        with self._lock:
            if key is None:
                self._values.clear()
            else:
                self._values.pop(key, None)
