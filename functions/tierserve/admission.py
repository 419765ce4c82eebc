"""A model's cap on concurrent generations, shared by the router fleet (issue 17: admission).

Why: a streamed CPU generation holds two Lambda execution environments (the router's and the CPU function's) for
its whole length, and a new account gets 10 concurrent executions, so each model has a cap on generations in
flight (``GenerationSpec.max_concurrency``, overridden by ``GENERATION_MAX_CONCURRENCY``). Counted per process
(``generation.service.Admission``) it never refuses in Lambda: an execution environment runs one invocation at a
time, so the streams past the cap land in other environments. The count must live where every router sees it:
one DynamoDB item per model version in the router's usage table (``USAGE_TABLE``, beside ``tierserve.usage``'s
budgets), partition ``model#NAME``, sort key ``concurrency#VERSION`` (no caller's item has that sort key).

The item holds a map ``slots``: one entry per generation in flight, ``slot id -> lease expiry`` (epoch seconds).

* Taking a slot is one conditional ``UpdateItem``: ``SET slots.#id = :expiry`` if ``size(slots) < :cap``
  (``attribute_exists(slots) AND`` first: ``size`` of a missing attribute is an error in moto).
  DynamoDB applies the writes to one item one at a time, so any number of routers at once never admit more than
  the cap. When it fails, the item is read (consistently): no ``slots`` yet creates it (``attribute_not_exists``);
  entries whose lease has expired are reclaimed in the same conditional update that takes the new slot (each
  reclaimed entry conditioned on its expiry being unchanged); a full map of live leases is a 429
  (:class:`tierserve.errors.TooManyRequestsError`, OpenAI's ``rate_limit_exceeded``, ``Retry-After``) before any
  work.
* Releasing is ``REMOVE slots.#id`` (conditioned on the entry still being there: a reclaimed slot is not
  removed twice), when the generation ends: its last event, an error, or ``close`` (the client went away).
* The lease: a router that dies mid-stream never releases, so each entry expires. A slot's lease is the time its
  router's invocation has left (the Lambda context's ``get_remaining_time_in_millis``, plus a grace): the router
  relays the stream, and no generation outlives the invocation that streams it, since Lambda ends it at its
  timeout. So a lease never needs renewing (no heartbeat writes during a stream) and a slot leaked by a dead
  router comes back at most one function timeout later. Without a context (a local call) the lease is
  :data:`DEFAULT_LEASE_S`, Lambda's longest timeout.

Why a map in one item rather than a counter plus an item per slot with a TTL: DynamoDB's TTL deletes expired items
up to days late and never decrements a counter, so a counter would leak the dead router's slots anyway; the map
keeps the count and the leases in one item, read and changed atomically, with no second table or stream to
clean up.

A failure of DynamoDB while taking a slot is the request's error (a cap that cannot be checked is not waived);
while releasing, it is logged and the lease frees the slot later.

Without ``USAGE_TABLE`` (the CPU function, tests) nothing is counted here, and the edge never counts here
(``DataPlane.generate`` skips it: one process serves all of a device's generations at once, and its KV memory is
its own): the per-environment ``generation.service.Admission`` caps what runs in process.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from tierserve import errors
from tierserve.generation.events import HeldEvents

if TYPE_CHECKING:
    from tierserve.generation.events import GenerationEvent
    from tierserve.manifest import ModelVersion

logger = logging.getLogger(__name__)

#: A slot's lease when the caller has no Lambda context: Lambda's longest function timeout.
DEFAULT_LEASE_S = 900.0
#: Added to the invocation's remaining time: a router's clock and DynamoDB's order of writes need not agree.
LEASE_GRACE_S = 30.0
#: The Retry-After of a refusal: a slot frees when a generation ends, which nothing here can predict.
RETRY_AFTER_S = 1.0
#: Rounds of take / read / reclaim before a refusal (each lost only to another router's write).
MAX_ROUNDS = 8
#: Expired entries reclaimed in one update (DynamoDB's expressions are bounded in size).
MAX_RECLAIM = 32


def item_key(model: str, version: str) -> dict[str, dict[str, str]]:
    return {"caller": {"S": f"model#{model}"}, "sk": {"S": f"concurrency#{version}"}}


def cap_of(model: ModelVersion, override: int = 0) -> int:
    """The model version's cap: ``override`` (``GENERATION_MAX_CONCURRENCY``) when positive, else the manifest's
    ``max_concurrency``."""
    if override > 0:
        return int(override)
    if model.generation is None:
        raise errors.InvalidRequestError(f"model {model.name!r} is not a text-generation model; use "
                                         f"/v2/models/{model.name}/infer")
    return int(model.generation.max_concurrency)


class Slot:
    """One generation's place under its model's cap; :meth:`release` once it ends (again: nothing)."""

    def __init__(self, cap: ConcurrencyCap, model: str, version: str, slot_id: str, expires_at: float) -> None:
        self.cap, self.model, self.version, self.id, self.expires_at = cap, model, version, slot_id, expires_at
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self.cap._release(self)


class ConcurrencyCap:
    """Generations in flight per model version in ``table`` (a DynamoDB client ``client``, default the process's;
    ``clock`` returns epoch seconds: tests move it)."""

    def __init__(self, table: str, client: Any = None, clock: Callable[[], float] = time.time) -> None:
        if not table:
            raise errors.ConfigurationError("a shared concurrency cap needs a table: set USAGE_TABLE")
        self.table = table
        self.clock = clock
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from tierserve import aws

            self._client = aws.client("dynamodb")
        return self._client

    def acquire(self, model: str, version: str, cap: int, lease_s: float = DEFAULT_LEASE_S) -> Slot:
        """A slot for one generation of ``model`` ``version``, leased ``lease_s``; 429 when ``cap`` live slots
        are taken."""
        if cap <= 0:
            raise errors.ConfigurationError(f"model {model!r} v{version}'s cap on concurrent generations must be "
                                            f"positive, not {cap}: fix max_concurrency or GENERATION_MAX_CONCURRENCY")
        slot_id = uuid.uuid4().hex
        key = item_key(model, version)
        live = cap
        for _ in range(MAX_ROUNDS):
            now = self.clock()
            expires = round(now + lease_s, 3)
            if self._update(key, "SET slots.#id = :exp", "attribute_exists(slots) AND size(slots) < :cap",
                            {"#id": slot_id}, {":exp": _n(expires), ":cap": _n(cap)}):
                return Slot(self, model, version, slot_id, expires)
            item = self.client.get_item(TableName=self.table, Key=key, ConsistentRead=True).get("Item") or {}
            if "slots" not in item:
                if self._update(key, "SET slots = :m", "attribute_not_exists(slots)", None,
                                {":m": {"M": {slot_id: _n(expires)}}}):
                    return Slot(self, model, version, slot_id, expires)
                continue
            slots = {k: float(v["N"]) for k, v in item["slots"]["M"].items()}
            expired = sorted((k for k, at in slots.items() if at <= now), key=slots.__getitem__)[:MAX_RECLAIM]
            live = len(slots) - len(expired)
            if not expired:
                if len(slots) >= cap:
                    break
                continue  # a slot was released meanwhile: take it
            names = {"#id": slot_id, **{f"#o{i}": k for i, k in enumerate(expired)}}
            values = {":exp": _n(expires), ":cap": _n(cap + len(expired)),
                      **{f":o{i}": item["slots"]["M"][k] for i, k in enumerate(expired)}}
            removes = ", ".join(f"slots.#o{i}" for i in range(len(expired)))
            unchanged = " AND ".join(f"slots.#o{i} = :o{i}" for i in range(len(expired)))
            if self._update(key, f"SET slots.#id = :exp REMOVE {removes}", f"size(slots) < :cap AND {unchanged}",
                            names, values):
                logger.warning("reclaimed %d expired generation slot(s) of %s v%s (a router ended without "
                               "releasing them)", len(expired), model, version)
                return Slot(self, model, version, slot_id, expires)
        raise errors.TooManyRequestsError(
            f"model {model!r} v{version} is generating for {live} requests, its cap on concurrent generations "
            f"({cap}); retry after the Retry-After seconds", retry_after_s=RETRY_AFTER_S)

    def in_flight(self, model: str, version: str) -> dict[str, float]:
        """The slots held now (slot id -> lease expiry), expired ones included."""
        item = self.client.get_item(TableName=self.table, Key=item_key(model, version),
                                    ConsistentRead=True).get("Item") or {}
        return {k: float(v["N"]) for k, v in (item.get("slots") or {}).get("M", {}).items()}

    def _release(self, slot: Slot) -> None:
        try:
            self._update(item_key(slot.model, slot.version), "REMOVE slots.#id", "attribute_exists(slots.#id)",
                         {"#id": slot.id}, None)
        except Exception:  # the answer stands; the lease frees the slot later
            logger.exception("could not release generation slot %s of %s v%s", slot.id, slot.model, slot.version)

    def _update(self, key: dict[str, Any], update: str, condition: str, names: dict[str, str] | None,
                values: dict[str, Any] | None) -> bool:
        """One conditional UpdateItem; False when its condition failed."""
        client = self.client
        kwargs: dict[str, Any] = {"TableName": self.table, "Key": key, "UpdateExpression": update,
                                  "ConditionExpression": condition}
        if names:
            kwargs["ExpressionAttributeNames"] = names
        if values:
            kwargs["ExpressionAttributeValues"] = values
        try:
            client.update_item(**kwargs)
        except client.exceptions.ConditionalCheckFailedException:
            return False
        return True


def _n(value: float) -> dict[str, str]:
    return {"N": str(round(value, 3))}


# --- the process's cap, and the hook into a generation -------------------------------------------------------


_cap: ConcurrencyCap | None = None
_cap_lock = threading.Lock()


def shared_cap() -> ConcurrencyCap | None:
    """The cap of this process's ``USAGE_TABLE`` (None without one)."""
    global _cap
    from tierserve.settings import get_settings

    table = get_settings().usage_table
    if not table:
        return None
    with _cap_lock:
        if _cap is None or _cap.table != table:
            _cap = ConcurrencyCap(table)
        return _cap


def reset() -> None:
    """Forget the process's cap (tests, and the local emulator when it changes the environment)."""
    global _cap
    with _cap_lock:
        _cap = None


class Capped(HeldEvents):
    """A generation's events holding a slot, released once when they end (see :class:`HeldEvents`)."""

    def __init__(self, events: Iterator[GenerationEvent], slot: Slot) -> None:
        super().__init__(events)
        self.slot = slot

    def _end(self) -> None:
        self.slot.release()


def run_capped(model: ModelVersion, lease_s: float | None,
               start: Callable[[], Iterator[GenerationEvent]]) -> Iterator[GenerationEvent]:
    """THE HOOK in ``DataPlane.generate`` (the router): take a slot under ``model``'s cap shared by every router
    (429 before any work), then ``start()`` the generation and release the slot when its events end (at once when
    ``start`` raises). ``lease_s``: what the invocation has left (None: :data:`DEFAULT_LEASE_S`). Without a usage
    table this is ``start()`` as it is."""
    cap = shared_cap()
    if cap is None:
        return start()
    from tierserve.settings import get_settings

    lease = (DEFAULT_LEASE_S if lease_s is None else max(1.0, lease_s)) + LEASE_GRACE_S
    slot = cap.acquire(model.name, model.version, cap_of(model, int(get_settings().generation_max_concurrency or 0)),
                       lease)
    try:
        events = start()
    except BaseException:
        slot.release()
        raise
    return Capped(events, slot)
