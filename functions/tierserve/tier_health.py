"""The GPU tier's health, shared by a fleet of router instances through one DynamoDB item.

Why: each warm router instance has its own circuit breaker. In an outage every instance discovers it
alone, paying ``BREAKER_FAILURE_THRESHOLD`` failed GPU calls to open its own circuit, and after each
cooldown every instance sends its own trial call into the dead tier: with 1,000 instances, 5,000 failed
attempts to open and 1,000 more per cooldown. Sharing the state makes the fleet pay about once:

* **publish**: the instance whose breaker opens writes ``{"id": "tier-health#gpu", "state": "open",
  "until": now + cooldown, "expiration": TTL}`` (the JobTable's TTL removes stale items); the one whose
  trial closes it writes ``state = closed``;
* **read, cheaply**: an instance reads the item before a GPU call at most once per ``TIER_HEALTH_TTL_S``
  (an eventually consistent GetItem: half a read unit), and again right after any failed GPU call, so a
  closed local breaker opens at the fleet's first word (one failed call per instance at most, usually
  none);
* **one trial for the fleet**: when the cooldown has passed, an instance may send the half-open trial
  only if it wins a conditional update (``trial_until`` lease); the others keep falling back until the
  winner closes the item, or reopens it.

``SharedCircuitBreaker`` is a ``CircuitBreaker``; the tier dispatcher is unchanged. A store error never
breaks a request: the instance then behaves as a lone breaker would. ``MemoryHealthStore`` has the same
semantics as ``DynamoHealthStore`` without AWS (``tooling/tierserve_tools/bench/shared_health_sim.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tierserve.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker

ITEM_ID = "tier-health#gpu"
#: How long a published state outlives its ``until`` before DynamoDB's TTL removes the item.
TTL_MARGIN_S = 3600
#: How long the instance that won the half-open trial holds it before another may try.
TRIAL_LEASE_S = 10.0


@dataclass(frozen=True)
class SharedState:
    state: str = CLOSED  # "open" or "closed"
    until: float = 0.0  # wall-clock seconds: the cooldown's end
    by: str = ""


class HealthStore(Protocol):
    def read(self) -> SharedState: ...

    def publish_open(self, until: float, by: str, why: str) -> None: ...

    def publish_closed(self, by: str) -> None: ...

    def take_trial(self, now: float, lease_s: float, by: str) -> bool:
        """True for exactly one caller per lease while the item says open and its cooldown has passed."""
        ...


class DynamoHealthStore:
    """The item in a DynamoDB table keyed by ``id`` with a TTL attribute ``expiration`` (the JobTable)."""

    def __init__(self, table: str, client: Any, item_id: str = ITEM_ID) -> None:
        """``client``: a boto3 DynamoDB client, or a callable making one on first use (cold starts stay lean)."""
        self.table, self.key = table, {"id": {"S": item_id}}
        self._client = client

    @property
    def client(self) -> Any:
        if callable(self._client) and not hasattr(self._client, "get_item"):
            self._client = self._client()
        return self._client

    def read(self) -> SharedState:
        item = self.client.get_item(TableName=self.table, Key=self.key).get("Item")
        if not item:
            return SharedState()
        return SharedState(item.get("state", {}).get("S", CLOSED), float(item.get("until", {}).get("N", "0")),
                           item.get("by", {}).get("S", ""))

    def publish_open(self, until: float, by: str, why: str) -> None:
        self.client.update_item(
            TableName=self.table, Key=self.key,
            UpdateExpression="SET #s = :open, #u = :until, #b = :by, #w = :why, #e = :exp REMOVE #t",
            ExpressionAttributeNames={"#s": "state", "#u": "until", "#b": "by", "#w": "why", "#e": "expiration",
                                      "#t": "trial_until"},
            ExpressionAttributeValues={":open": {"S": OPEN}, ":until": {"N": f"{until:.3f}"}, ":by": {"S": by},
                                       ":why": {"S": why[:500]}, ":exp": {"N": str(int(until + TTL_MARGIN_S))}})

    def publish_closed(self, by: str) -> None:
        self.client.update_item(
            TableName=self.table, Key=self.key, UpdateExpression="SET #s = :closed, #b = :by REMOVE #t",
            ExpressionAttributeNames={"#s": "state", "#b": "by", "#t": "trial_until"},
            ExpressionAttributeValues={":closed": {"S": CLOSED}, ":by": {"S": by}})

    def take_trial(self, now: float, lease_s: float, by: str) -> bool:
        try:
            self.client.update_item(
                TableName=self.table, Key=self.key, UpdateExpression="SET #t = :lease, #b = :by",
                ConditionExpression="#s = :open AND #u <= :now AND (attribute_not_exists(#t) OR #t < :now)",
                ExpressionAttributeNames={"#s": "state", "#u": "until", "#t": "trial_until", "#b": "by"},
                ExpressionAttributeValues={":open": {"S": OPEN}, ":now": {"N": f"{now:.3f}"},
                                           ":lease": {"N": f"{now + lease_s:.3f}"}, ":by": {"S": by}})
            return True
        except Exception as exc:
            if type(exc).__name__ == "ConditionalCheckFailedException" or "ConditionalCheckFailed" in str(exc):
                return False
            raise


class MemoryHealthStore:
    """``DynamoHealthStore``'s semantics in one process (the simulation, tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.item: dict[str, Any] = {}
        self.reads = self.writes = 0

    def read(self) -> SharedState:
        with self._lock:
            self.reads += 1
            i = self.item
            return SharedState(i.get("state", CLOSED), i.get("until", 0.0), i.get("by", "")) if i else SharedState()

    def publish_open(self, until: float, by: str, why: str) -> None:
        with self._lock:
            self.writes += 1
            self.item = {"state": OPEN, "until": until, "by": by, "why": why}

    def publish_closed(self, by: str) -> None:
        with self._lock:
            self.writes += 1
            self.item = {**self.item, "state": CLOSED, "by": by}
            self.item.pop("trial_until", None)

    def take_trial(self, now: float, lease_s: float, by: str) -> bool:
        with self._lock:
            self.writes += 1
            i = self.item
            if i.get("state") != OPEN or i.get("until", 0.0) > now or i.get("trial_until", 0.0) >= now:
                return False
            i["trial_until"], i["by"] = now + lease_s, by
            return True


class SharedCircuitBreaker(CircuitBreaker):
    """A circuit breaker whose openings and closings the fleet shares (see the module docstring)."""

    def __init__(self, store: HealthStore, failure_threshold: int = 5, cooldown_s: float = 30.0,
                 success_threshold: int = 3, clock: Callable[[], float] = time.monotonic,
                 on_transition: Any = None, *, read_ttl_s: float = 2.0, wall: Callable[[], float] = time.time,
                 instance: str = "", trial_lease_s: float = TRIAL_LEASE_S) -> None:
        self.store = store
        self.read_ttl_s = read_ttl_s
        self.wall = wall
        self.instance = instance or f"router-{id(self):x}"
        self.trial_lease_s = trial_lease_s
        self._shared = SharedState()
        self._read_at: float | None = None
        self._read_lock = threading.Lock()
        self._publishing = False
        self._no_trial_until = 0.0
        local = on_transition

        def transition(old: str, new: str, why: str) -> None:
            if local is not None:
                local(old, new, why)
            if not self._publishing:
                self._publish(old, new, why)

        super().__init__(failure_threshold, cooldown_s, success_threshold, clock, transition)

    # --- the shared item -------------------------------------------------------------------------

    def _shared_state(self, fresh: bool = False) -> SharedState:
        now = self._clock()
        with self._read_lock:
            if not fresh and self._read_at is not None and now - self._read_at < self.read_ttl_s:
                return self._shared
        try:
            shared = self.store.read()
        except Exception:  # the store is down: behave as a lone breaker
            shared = SharedState()
        with self._read_lock:
            self._shared, self._read_at = shared, now
        return shared

    def _publish(self, old: str, new: str, why: str) -> None:
        try:
            if new == OPEN:
                self.store.publish_open(self.wall() + self.cooldown_s, self.instance, why)
            elif new == CLOSED and old == HALF_OPEN:
                self.store.publish_closed(self.instance)
        except Exception:  # noqa: S110 - sharing is best effort; the local breaker still works
            pass
        with self._read_lock:
            self._read_at = None  # read our own word (and anyone else's) on the next look

    def _follow(self, shared: SharedState) -> None:
        """Open a closed local circuit when the fleet says the tier is down."""
        if shared.state == OPEN and shared.until > self.wall() and super().state == CLOSED:
            self._publishing = True  # our own trip is the fleet's news, not new news
            try:
                self.trip(f"another router instance ({shared.by}) opened the GPU circuit")
            finally:
                self._publishing = False

    # --- CircuitBreaker ------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        self._follow(self._shared_state())
        return super().state

    def allow(self) -> bool:
        shared = self._shared_state()
        self._follow(shared)
        if super().state != HALF_OPEN:
            return super().allow()
        if shared.state == OPEN:
            now = self.wall()
            if shared.until > now or now < self._no_trial_until:
                return False  # the fleet's cooldown is still running, or another instance holds its trial
            try:
                won = self.store.take_trial(now, self.trial_lease_s, self.instance)
            except Exception:  # the store is down: our own trial, as a lone breaker
                won = True
            if not won:
                # Ask again when that trial's lease could have run out, or when our next read may say closed.
                self._no_trial_until = now + min(self.trial_lease_s, self.read_ttl_s)
                return False
        return super().allow()

    def record_failure(self, why: str = "") -> None:
        super().record_failure(why)
        self._follow(self._shared_state(fresh=True))  # the tier failed us: has the fleet already said so?
