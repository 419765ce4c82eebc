"""Tokens as the unit of account (issue 18): every generation's usage per caller, and token budgets per caller.

Why: a generative model is paid for by the token, and LLM gateway users ask for two things most: usage they can
bill, and budgets that stop one caller from spending everyone's capacity. This module is both, for the router
(and any process that runs a generation): :func:`admit` before a generation starts, :meth:`Reservation.finish`
(or :class:`Metered` around its events) when it ends; :func:`run_metered` is both, the one call in
``DataPlane.generate``.

Who is a caller. What the gateway's authorizer says (:func:`caller_of`): a tierserve API key's caller (the
name `tierserve keys create --caller` gave it, so every key of one caller shares its budget, as LiteLLM's
virtual keys of one user do), else a JWT's ``sub``, else the IAM principal (the signer's ARN); ``anonymous``
when there is none (a local stack without auth). Each has its own usage and its own budget.

Usage. :meth:`Ledger.record` adds a generation's prompt and completion tokens to the caller's counters of the
UTC day, per model, version and tier (one ``UpdateItem ... ADD``: increments from any number of routers at once
are never lost), and emits them as EMF metrics per caller (``tierserve.telemetry.caller_usage``).

Budgets. Per caller: tokens per minute and tokens per day. The default is the router's environment
(``TOKENS_PER_MINUTE``, ``TOKENS_PER_DAY``: template.yaml's ``TokensPerMinute`` / ``TokensPerDay``; 0 = no
limit); an item per caller in the table overrides it (:meth:`Ledger.set_budget`, `tierserve usage --caller X
--set-tokens-per-minute N`), read with ``GetItem`` and cached ``OVERRIDE_TTL_S`` per router.

* Windows are FIXED: the UTC minute (``12:34:00``-``12:34:59``) and the UTC day (``00:00``-``23:59:59``), each
  a counter item that DynamoDB's TTL deletes after it has ended (``expires_at``). A fixed window lets a caller
  spend up to twice its per-minute budget across a minute's boundary; it needs one item per window and no
  clock agreement between routers beyond their UTC time.
* :func:`admit` reserves the prompt plus ``max_tokens`` (the most a generation can use) in the day's window,
  then the minute's, each with a conditional ``UpdateItem`` (``ADD tokens :n`` if ``tokens <= limit - n``): the
  counter is exact under any number of concurrent routers (no read-modify-write anywhere). A window without
  room refuses with :class:`tierserve.errors.TooManyRequestsError` (429, OpenAI's ``rate_limit_exceeded``) whose
  ``retry_after_s`` is the time until that window ends: a fixed window frees all its tokens then, not before.
  When the day had room and the minute had none, the day's reservation is given back (``ADD -n``) before the
  429; meanwhile another request of the same caller may see the day fuller than it is (the error is on the
  refusing side: never an overspend).
* A request that could never fit (it asks for more than the whole minute's or day's budget) is a 400 naming
  ``max_tokens``, not a 429: retrying it could never succeed.
* :meth:`Reservation.settle` gives back what the generation did not use (``ADD`` the difference to the same
  windows); a generation that ends early (a stop, a disconnect, an error) is charged what it used.

A failure of DynamoDB while admitting is the request's error (a budget that cannot be checked is not waived);
while settling or recording, it is logged and the generation's answer stands (the reservation then stays
charged in full: the error again on the refusing side).

Without ``USAGE_TABLE`` (local runs, tests) the ledger counts nothing in DynamoDB: no budget is enforced, and
usage goes out as metrics only.

The table (template.yaml's ``UsageTable``; ``tierserve_tools.usage_cli.create_table`` locally): partition key
``caller``, sort key ``sk``:

* ``budget``: the caller's override (``tokens_per_minute``, ``tokens_per_day``; absent = the default, 0 = none);
* ``window#m#2026-05-01T12:34`` / ``window#d#2026-05-01``: ``tokens`` reserved in that window, ``expires_at``;
* ``usage#2026-05-01#MODEL#VERSION#TIER``: ``prompt_tokens``, ``completion_tokens``, ``requests`` of that day,
  with ``model``, ``version``, ``tier``, ``day`` as attributes and ``expires_at`` ``USAGE_RETENTION_DAYS`` on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tierserve import errors, telemetry
from tierserve.generation.events import HeldEvents

if TYPE_CHECKING:
    from tierserve.generation.events import GenerationEvent
    from tierserve.generation.requests import GenerationRequest
    from tierserve.manifest import ModelVersion

logger = logging.getLogger(__name__)

#: The caller of a request no authorizer named.
ANONYMOUS = "anonymous"
#: How long a router keeps a caller's budget override before it reads it again.
OVERRIDE_TTL_S = 60.0
#: How long a budget window's item outlives its window (TTL deletes it some time after that).
WINDOW_GRACE_S = 3600
BUDGET_SK = "budget"
MINUTE, DAY = "minute", "day"
_WINDOW_S = {MINUTE: 60, DAY: 86_400}
_WINDOW_TAG = {MINUTE: "m", DAY: "d"}
_MAX_CALLER = 512


# --- who is calling ---------------------------------------------------------------------------------------------


def caller_of(event: Mapping[str, Any]) -> str:
    """The caller of an API Gateway event: a tierserve API key's caller, else a JWT's ``sub`` (``keys.caller_of``),
    else the IAM principal that signed it (a REST API's ``identity.userArn``, an HTTP API's
    ``authorizer.iam.userArn``); ``anonymous`` when none."""
    from tierserve import keys

    found = keys.caller_of(event)
    if found:
        return found
    ctx = event.get("requestContext") or {}
    iam = ((ctx.get("authorizer") or {}).get("iam") or {}).get("userArn") or (ctx.get("identity") or {}).get("userArn")
    return str(iam) if iam else ANONYMOUS


def check_caller(caller: str) -> str:
    """``caller`` as the table keeps it (``anonymous`` for ""); ValueError-free: a name that cannot be a key is a
    400 saying what a caller may be."""
    caller = caller or ANONYMOUS
    if len(caller) > _MAX_CALLER or any(ord(c) < 32 for c in caller):
        raise errors.InvalidRequestError(f"caller {caller[:64]!r}... is not a caller name: at most {_MAX_CALLER} "
                                         "printable characters (an API key's caller, a JWT sub or an IAM ARN)")
    return caller


# --- windows ----------------------------------------------------------------------------------------------------


def day_of(now: float) -> str:
    """The UTC day of an epoch time, ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def window_key(window: str, now: float) -> str:
    """The sort key of the fixed UTC ``window`` (minute or day) that ``now`` falls in."""
    fmt = "%Y-%m-%dT%H:%M" if window == MINUTE else "%Y-%m-%d"
    return f"window#{_WINDOW_TAG[window]}#{time.strftime(fmt, time.gmtime(now))}"


def window_end(window: str, now: float) -> float:
    """When the fixed UTC window that ``now`` falls in ends (epoch seconds)."""
    size = _WINDOW_S[window]
    return (math.floor(now / size) + 1) * size


def usage_key(day: str, model: str, version: str, tier: str) -> str:
    return f"usage#{day}#{model}#{version}#{tier}"


@dataclass(frozen=True)
class Budget:
    """A caller's limits: tokens per minute and per day (0: no limit); ``source`` says whose ("default" or
    "override")."""

    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    source: str = "default"

    def limit(self, window: str) -> int:
        return self.tokens_per_minute if window == MINUTE else self.tokens_per_day

    @property
    def unlimited(self) -> bool:
        return self.tokens_per_minute <= 0 and self.tokens_per_day <= 0

    def to_json(self) -> dict[str, Any]:
        return {"tokens_per_minute": self.tokens_per_minute, "tokens_per_day": self.tokens_per_day,
                "source": self.source}


def _check_budget_value(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.ConfigurationError(f"{name} must be a whole number of tokens, 0 for no limit, not {value!r}")
    return value


# --- a reservation ------------------------------------------------------------------------------------------------


@dataclass
class Reservation:
    """Tokens held for one generation in its caller's windows (``windows``: the sort keys charged). Settle it once
    the generation ends; settling again changes nothing."""

    ledger: Ledger
    caller: str
    model: str
    version: str
    reserved: int
    windows: tuple[str, ...] = ()
    settled: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def settle(self, actual_tokens: int) -> int:
        """Charge ``actual_tokens`` instead of what was reserved: gives back the difference (or charges the excess)
        in the windows it was reserved in. Returns the change applied (negative: given back)."""
        with self._lock:
            if self.settled:
                return 0
            self.settled = True
        delta = max(0, int(actual_tokens)) - self.reserved
        if delta and self.windows:
            self.ledger._adjust(self.caller, self.windows, delta)
        return delta

    def finish(self, prompt_tokens: int, completion_tokens: int, tier: str) -> None:
        """The generation ended having used these tokens on ``tier``: record its usage, then settle."""
        self.ledger.record(self.caller, self.model, self.version, tier, prompt_tokens, completion_tokens)
        self.settle(prompt_tokens + completion_tokens)


# --- the ledger ------------------------------------------------------------------------------------------------------


class Ledger:
    """Usage and budgets in ``table`` (no table: metrics only, nothing enforced). ``client`` is a boto3 DynamoDB
    client (default: the process's, ``tierserve.aws``); ``clock`` returns epoch seconds (tests move it)."""

    def __init__(self, table: str, default: Budget | None = None, retention_days: int = 400, client: Any = None,
                 clock: Callable[[], float] = time.time, override_ttl_s: float = OVERRIDE_TTL_S) -> None:
        self.table = table
        self.default = default or Budget()
        _check_budget_value("tokens per minute", self.default.tokens_per_minute)
        _check_budget_value("tokens per day", self.default.tokens_per_day)
        if retention_days <= 0:
            raise errors.ConfigurationError(f"USAGE_RETENTION_DAYS must be positive, not {retention_days}")
        self.retention_days = retention_days
        self.clock = clock
        self.override_ttl_s = override_ttl_s
        self._client = client
        self._overrides: dict[str, tuple[float, Budget]] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            from tierserve import aws

            self._client = aws.client("dynamodb")
        return self._client

    # budgets ---------------------------------------------------------------------------------------------------------

    def budget(self, caller: str, fresh: bool = False) -> Budget:
        """``caller``'s budget: its override item's limits where it has one, else the default (cached
        ``override_ttl_s`` unless ``fresh``)."""
        caller = check_caller(caller)
        if not self.table:
            return self.default
        now = time.monotonic()
        cached = self._overrides.get(caller)
        if cached is not None and not fresh and now - cached[0] < self.override_ttl_s:
            return cached[1]
        item = self.client.get_item(TableName=self.table, Key=_key(caller, BUDGET_SK), ConsistentRead=True).get("Item")
        found = self.default
        if item is not None:
            def limit(name: str, default: int) -> int:
                return int(item[name]["N"]) if name in item else default

            found = Budget(limit("tokens_per_minute", self.default.tokens_per_minute),
                           limit("tokens_per_day", self.default.tokens_per_day), "override")
        self._overrides[caller] = (now, found)
        return found

    def set_budget(self, caller: str, tokens_per_minute: int | None = None,
                   tokens_per_day: int | None = None) -> Budget:
        """Override ``caller``'s limits (None: keep the current override's, or the default; 0: no limit)."""
        caller = check_caller(caller)
        self._need_table()
        sets, values = [], {}
        for name, value in (("tokens_per_minute", tokens_per_minute), ("tokens_per_day", tokens_per_day)):
            if value is not None:
                _check_budget_value(name.replace("_", " "), value)
                sets.append(f"{name} = :{name}")
                values[f":{name}"] = {"N": str(value)}
        if not sets:
            raise errors.InvalidRequestError("set_budget needs tokens_per_minute or tokens_per_day")
        self.client.update_item(TableName=self.table, Key=_key(caller, BUDGET_SK),
                                UpdateExpression="SET " + ", ".join(sets), ExpressionAttributeValues=values)
        self._overrides.pop(caller, None)
        return self.budget(caller, fresh=True)

    def clear_budget(self, caller: str) -> Budget:
        """Remove ``caller``'s override: the default applies again."""
        caller = check_caller(caller)
        self._need_table()
        self.client.delete_item(TableName=self.table, Key=_key(caller, BUDGET_SK))
        self._overrides.pop(caller, None)
        return self.default

    # admission -------------------------------------------------------------------------------------------------------

    def admit(self, caller: str, model: ModelVersion | str, reserve_tokens: int, version: str = "") -> Reservation:
        """Reserve ``reserve_tokens`` (the prompt plus ``max_tokens``) of ``caller``'s budget for one generation of
        ``model`` (a ModelVersion, or a name with ``version``). Raises TooManyRequestsError (429, Retry-After)
        when a window has no room, InvalidParameterError (400, ``max_tokens``) when the request is larger than a
        whole window's budget."""
        caller = check_caller(caller)
        name, version = (model, version) if isinstance(model, str) else (model.name, model.version)
        reserve = max(0, int(reserve_tokens))
        reservation = Reservation(self, caller, name, version, reserve)
        if not self.table:
            return reservation
        budget = self.budget(caller)
        if budget.unlimited or reserve == 0:
            return reservation
        now = self.clock()
        for window in (DAY, MINUTE):
            limit = budget.limit(window)
            if 0 < limit < reserve:
                raise errors.InvalidParameterError(
                    f"this request needs up to {reserve:,} tokens (its prompt plus max_tokens), more than caller "
                    f"{caller!r}'s whole budget of {limit:,} tokens per {window} ({budget.source}): lower max_tokens "
                    "or shorten the prompt, or ask the operator for a larger budget", "max_tokens",
                    "request_too_large")
        charged: list[str] = []
        try:
            for window in (DAY, MINUTE):
                limit = budget.limit(window)
                if limit <= 0:
                    continue
                sk = window_key(window, now)
                if not self._reserve(caller, sk, reserve, limit, window_end(window, now)):
                    telemetry.budget_refused(caller, window)
                    retry = max(1.0, window_end(window, now) - self.clock())
                    raise errors.TooManyRequestsError(
                        f"caller {caller!r} is over its budget of {limit:,} tokens per {window} ({budget.source}; "
                        f"this request reserves {reserve:,}: its prompt plus max_tokens); the UTC {window} window "
                        f"frees in {math.ceil(retry)} s: retry after that, or lower max_tokens", retry)
                charged.append(sk)
        except BaseException:
            if charged:
                self._adjust(caller, tuple(charged), -reserve)
            raise
        reservation.windows = tuple(charged)
        return reservation

    def _reserve(self, caller: str, sk: str, n: int, limit: int, ends: float) -> bool:
        """``ADD tokens :n`` to one window if it stays within ``limit``; False when it would not."""
        client = self.client
        try:
            client.update_item(
                TableName=self.table, Key=_key(caller, sk),
                UpdateExpression="ADD tokens :n SET expires_at = if_not_exists(expires_at, :ttl)",
                ConditionExpression="attribute_not_exists(tokens) OR tokens <= :room",
                ExpressionAttributeValues={":n": {"N": str(n)}, ":room": {"N": str(limit - n)},
                                           ":ttl": {"N": str(int(ends) + WINDOW_GRACE_S)}})
        except client.exceptions.ConditionalCheckFailedException:
            return False
        return True

    def _adjust(self, caller: str, windows: tuple[str, ...], delta: int) -> None:
        """``ADD tokens :delta`` to each window (settling or undoing a reservation); failures are logged."""
        for sk in windows:
            try:
                self.client.update_item(TableName=self.table, Key=_key(caller, sk), UpdateExpression="ADD tokens :d",
                                        ExpressionAttributeValues={":d": {"N": str(delta)}})
            except Exception:  # the answer stands; the window stays charged (an error on the refusing side)
                logger.exception("could not adjust %s's budget window %s by %d tokens", caller, sk, delta)

    # usage ---------------------------------------------------------------------------------------------------------

    def record(self, caller: str, model: str, version: str, tier: str, prompt_tokens: int,
               completion_tokens: int) -> None:
        """Add one generation's tokens to ``caller``'s counters of the UTC day (per model, version and tier) and
        emit them as metrics. A failure to write is logged, never raised (the generation has happened)."""
        caller = check_caller(caller)
        prompt, completion = max(0, int(prompt_tokens)), max(0, int(completion_tokens))
        telemetry.caller_usage(caller, model, version, tier or "unknown", prompt, completion)
        if not self.table:
            return
        now = self.clock()
        day = day_of(now)
        ttl = int(window_end(DAY, now)) + self.retention_days * 86_400
        try:
            self.client.update_item(
                TableName=self.table, Key=_key(caller, usage_key(day, model, version, tier or "unknown")),
                UpdateExpression="ADD prompt_tokens :p, completion_tokens :c, requests :one "
                                 "SET #model = :model, #version = :version, #tier = :tier, #day = :day, "
                                 "expires_at = :ttl",
                ExpressionAttributeNames={"#model": "model", "#version": "version", "#tier": "tier", "#day": "day"},
                ExpressionAttributeValues={":p": {"N": str(prompt)}, ":c": {"N": str(completion)}, ":one": {"N": "1"},
                                           ":model": {"S": model}, ":version": {"S": version},
                                           ":tier": {"S": tier or "unknown"}, ":day": {"S": day},
                                           ":ttl": {"N": str(ttl)}})
        except Exception:
            logger.exception("could not record %s's usage of %s:%s (%d + %d tokens)", caller, model, version,
                             prompt, completion)

    # reading (the operator's `tierserve usage`: Query and Scan, never on a request's path) ---------------------------

    def usage(self, caller: str | None = None, since: str | None = None) -> list[UsageRow]:
        """Usage counters, one row per caller, day, model, version and tier, from ``since`` (``YYYY-MM-DD``, UTC)
        on; one caller's (a Query) or everyone's (a Scan)."""
        self._need_table()
        since_sk = f"usage#{since or ''}"
        rows: list[UsageRow] = []
        if caller is not None:
            pages = self.client.get_paginator("query").paginate(
                TableName=self.table, ConsistentRead=True,
                KeyConditionExpression="#c = :c AND sk BETWEEN :lo AND :hi",
                ExpressionAttributeNames={"#c": "caller"},
                ExpressionAttributeValues={":c": {"S": check_caller(caller)}, ":lo": {"S": since_sk},
                                           ":hi": {"S": "usage#\uffff"}})
        else:
            pages = self.client.get_paginator("scan").paginate(
                TableName=self.table, ConsistentRead=True, FilterExpression="sk BETWEEN :lo AND :hi",
                ExpressionAttributeValues={":lo": {"S": since_sk}, ":hi": {"S": "usage#\uffff"}})
        for page in pages:
            rows.extend(UsageRow.from_item(item) for item in page.get("Items", []))
        return sorted(rows, key=lambda r: (r.caller, r.day, r.model, r.version, r.tier))

    def window_tokens(self, caller: str, window: str, now: float | None = None) -> int:
        """Tokens charged to ``caller``'s current (or ``now``'s) ``window``: what admission compares."""
        self._need_table()
        sk = window_key(window, self.clock() if now is None else now)
        item = self.client.get_item(TableName=self.table, Key=_key(check_caller(caller), sk),
                                    ConsistentRead=True).get("Item") or {}
        return int(item.get("tokens", {}).get("N", "0"))

    def _need_table(self) -> None:
        if not self.table:
            raise errors.ConfigurationError("no usage table: set USAGE_TABLE (the stack's UsageTableName output)")


@dataclass(frozen=True)
class UsageRow:
    caller: str
    day: str
    model: str
    version: str
    tier: str
    prompt_tokens: int
    completion_tokens: int
    requests: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> UsageRow:
        def s(name: str) -> str:
            return str((item.get(name) or {}).get("S", ""))

        def n(name: str) -> int:
            return int((item.get(name) or {}).get("N", "0"))

        return cls(s("caller"), s("day"), s("model"), s("version"), s("tier"), n("prompt_tokens"),
                   n("completion_tokens"), n("requests"))

    def to_json(self) -> dict[str, Any]:
        return {"caller": self.caller, "day": self.day, "model": self.model, "version": self.version,
                "tier": self.tier, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "requests": self.requests}


def _key(caller: str, sk: str) -> dict[str, dict[str, str]]:
    return {"caller": {"S": caller}, "sk": {"S": sk}}


# --- the process's ledger, and the hook into a generation ---------------------------------------------------------

_ledger: Ledger | None = None
_ledger_lock = threading.Lock()


def ledger() -> Ledger:
    """The ledger of this process's settings (``USAGE_TABLE``, ``TOKENS_PER_MINUTE``, ``TOKENS_PER_DAY``,
    ``USAGE_RETENTION_DAYS``), made once per execution environment (again when the settings change)."""
    global _ledger
    from tierserve.settings import get_settings

    s = get_settings()
    key = (s.usage_table, s.tokens_per_minute, s.tokens_per_day, s.usage_retention_days)
    with _ledger_lock:
        current = _ledger
        if current is None or (current.table, current.default.tokens_per_minute, current.default.tokens_per_day,
                               current.retention_days) != key:
            current = _ledger = Ledger(s.usage_table, Budget(s.tokens_per_minute, s.tokens_per_day),
                                       s.usage_retention_days)
    return current


def reset() -> None:
    """Forget the process's ledger (tests, and the local emulator when it changes the environment)."""
    global _ledger
    with _ledger_lock:
        _ledger = None


def admit(caller: str, model: ModelVersion | str, reserve_tokens: int, version: str = "") -> Reservation:
    """:meth:`Ledger.admit` on the process's ledger."""
    return ledger().admit(caller, model, reserve_tokens, version)


def reserve_for(request: GenerationRequest) -> int:
    """What a prepared request may use at most: its prompt's tokens plus its (resolved) ``max_tokens``."""
    return len(request.prompt_ids or ()) + int(request.params.max_tokens or 0)


def admit_request(request: GenerationRequest, model: ModelVersion) -> Reservation:
    """Admit a prepared generation request (its ``caller``, its prompt plus ``max_tokens``)."""
    return admit(request.caller, model, reserve_for(request))


class Metered(HeldEvents):
    """A generation's events as they come (an iterator with ``close``); when they end (the final event, the end
    of the stream, an error, or :meth:`close`: the client went away) the generation's usage is recorded and its
    reservation settled, once: the final event's ``usage`` when it came, else ``prompt_tokens`` plus the token
    ids seen. A generation that failed before its first event is charged nothing. :meth:`close` closes the
    wrapped stream too (its own release: a concurrency slot, a remote stream); any other attribute is the wrapped
    stream's (``fallback``); see :class:`HeldEvents`."""

    def __init__(self, events: Iterator[GenerationEvent], reservation: Reservation, prompt_tokens: int = 0) -> None:
        super().__init__(events)
        self.reservation = reservation
        self.prompt_tokens, self.completion_tokens, self.tier = prompt_tokens, 0, ""
        self._seen_any = False
        self._ended = False
        self._lock = threading.Lock()

    def _seen(self, event: GenerationEvent) -> None:
        self._seen_any = True
        self.completion_tokens += len(event.token_ids)
        self.tier = event.served_by or self.tier
        if event.usage is not None:
            self.prompt_tokens, self.completion_tokens = event.usage.prompt_tokens, event.usage.completion_tokens

    def _end(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        if self._seen_any:
            self.reservation.finish(self.prompt_tokens, self.completion_tokens, self.tier)
        else:
            self.reservation.settle(0)


def metered(events: Iterator[GenerationEvent], reservation: Reservation, prompt_tokens: int = 0) -> Metered:
    """``events`` wrapped in :class:`Metered`."""
    return Metered(events, reservation, prompt_tokens)


def run_metered(request: GenerationRequest, model: ModelVersion,
                start: Callable[[], Iterator[GenerationEvent]]) -> Iterator[GenerationEvent]:
    """THE HOOK for a generation's path (``DataPlane.generate``): admit the prepared ``request`` against its
    caller's budget (429 before any work), then ``start()`` the generation and meter its events (usage recorded
    and the reservation settled when they end; given back whole when ``start`` raises).

    Only a process with a usage table meters (the router: ``USAGE_TABLE``); elsewhere this is ``start()`` as it
    is. That keeps a generation counted once when the router relays it from the CPU function, whose own
    ``DataPlane.generate`` runs it again without a table."""
    led = ledger()
    if not led.table:
        return start()
    reservation = led.admit(request.caller, model, reserve_for(request))
    try:
        events = start()
    except BaseException:
        reservation.settle(0)
        raise
    return Metered(events, reservation, len(request.prompt_ids or ()))
