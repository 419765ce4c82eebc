"""A circuit breaker for the GPU tier, and a TTL health cache with a single check in flight."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


#: Called with (from state, to state, why) after every transition, outside the breaker's lock.
Transition = Callable[[str, str, str], None]


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures, or at once when ``trip`` says the tier is
    down; half-opens after ``cooldown_s``; closes after ``success_threshold`` consecutive successes while
    half-open. Any failure while half-open re-opens it. While open, ``allow()`` is False: callers go
    straight to the fallback. Half-open admits one trial call at a time, so a sick backend sees one
    probe, not a stampede. Every transition is reported to ``on_transition`` (logs, metrics)."""

    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown_s: float = 30.0,
        success_threshold: int = 3,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Transition | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.success_threshold = success_threshold
        self.on_transition = on_transition
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._events: list[tuple[str, str, str]] = []

    @property
    def state(self) -> str:
        with self._lock:
            self._maybe_half_open()
            state = self._state
        self._emit()
        return state

    def retry_after_s(self) -> float:
        with self._lock:
            if self._state != OPEN:
                return 0.0
            return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def _move(self, new: str, why: str) -> None:
        """Change state (under the lock); the transition is reported by ``_emit`` once the lock is released."""
        if new != self._state:
            self._events.append((self._state, new, why))
            self._state = new

    def _emit(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        for old, new, why in events:
            if self.on_transition is not None:
                with contextlib.suppress(Exception):  # reporting must never break the breaker
                    self.on_transition(old, new, why)

    def _maybe_half_open(self) -> None:
        if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._move(HALF_OPEN, f"the {self.cooldown_s:g} s cooldown has passed; one trial call at a time")
            self._successes = 0
            self._trial_in_flight = False

    def allow(self) -> bool:
        with self._lock:
            self._maybe_half_open()
            if self._state == CLOSED:
                allowed = True
            elif self._state == HALF_OPEN and not self._trial_in_flight:
                self._trial_in_flight = allowed = True
            else:
                allowed = False
        self._emit()
        return allowed

    def record_success(self) -> None:
        with self._lock:
            self._trial_in_flight = False
            if self._state == HALF_OPEN:
                self._successes += 1
                if self._successes >= self.success_threshold:
                    self._move(CLOSED, f"{self._successes} successful trial call(s)")
                    self._failures = 0
            else:
                self._failures = 0
        self._emit()

    def record_failure(self, why: str = "") -> None:
        with self._lock:
            self._trial_in_flight = False
            if self._state == HALF_OPEN:
                self._open(f"the trial call failed{f': {why}' if why else ''}")
            else:
                self._failures += 1
                if self._state == CLOSED and self._failures >= self.failure_threshold:
                    self._open(f"{self._failures} consecutive failures{f', the last: {why}' if why else ''}")
        self._emit()

    def trip(self, why: str) -> None:
        """Open now (unless already open): the tier is known to be down, no need to count failures."""
        with self._lock:
            self._trial_in_flight = False
            if self._state != OPEN:
                self._open(why)
        self._emit()

    def _open(self, why: str) -> None:
        self._move(OPEN, why)
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
