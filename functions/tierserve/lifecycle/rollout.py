"""Progressive delivery with automatic rollback: a canary shifted step by step, judged on its own metrics.

A rollout is a small state machine kept in a table (DynamoDB; :class:`DynamoRollouts`), advanced by
:func:`tick`, which is idempotent and safe to call at any time, by anyone: the scheduled RolloutFunction in
AWS (``handlers/rollout.py``, every minute), or ``tierserve models rollout`` in the foreground locally. An
interrupted driver loses nothing: the next tick reads the state and carries on where it was.

Each tick, for the running step (canary at ``steps[step]`` percent since ``step_started_at``):

1. the step's traffic share is applied if it is not yet (``Registry.canary``; a share of 100 is the
   promotion itself);
2. the canary's and the baseline's (the default's) figures over the step so far are read from the
   per-version metrics (:class:`CloudWatchMetrics`: ``GetMetricData`` on the EMF metrics RouterFunction
   emits with ``model`` and ``version`` dimensions): requests, server errors, fallbacks, p99 latency; for a
   text-generation model also the time to first token's p99 and the mean decode tokens/s (issue 18), from
   the generation metrics of whichever function ran the engine (``service, model, version``);
3. **as soon as** the canary has ``min_requests`` requests and crosses a threshold, it is rolled back
   (``Registry.rollback``: the canary share goes to the default at once), with the figures in the history;
4. when the interval has passed with enough traffic and no threshold crossed, the next step starts, and
   after the last one the version is promoted. Without enough canary traffic the step is held.

A threshold counts against the canary only if the canary is also worse than the baseline over the same
window (``canary > baseline``): an outage that hits every version (the GPU tier down) is not the canary's
fault. Tokens/s is judged against the baseline alone: a canary slower than ``min_tokens_per_s_ratio`` times
the default's tokens/s is rolled back (an absolute floor would depend on the model and the tier). If someone
else changes the model while a rollout runs (promotes, rolls back, moves the canary), the
rollout stops (``aborted``) rather than fight them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tierserve.dynamo import from_dynamo, to_dynamo
from tierserve.errors import ConflictError, LifecycleError
from tierserve.lifecycle.registry import Registry

RUNNING, PROMOTED, ROLLED_BACK, ABORTED = "running", "promoted", "rolled_back", "aborted"
#: CloudWatch accepts these periods below a minute (high-resolution), then multiples of 60.
_PERIODS = (1, 5, 10, 30, 60)
#: A text-generation canary's defaults (issue 18): p99 time to first token, and the share of the default's
#: decode tokens/s it must keep. 2 s is a common interactive bound (it applies only where the canary is also
#: slower than the default); 0.8 tolerates the noise of a few hundred generations on shared Lambda CPUs.
DEFAULT_MAX_TTFT_P99_MS = 2000.0
DEFAULT_MIN_TOKENS_PER_S_RATIO = 0.8


@dataclass(frozen=True)
class Thresholds:
    max_error_rate: float = 0.01
    max_p99_ms: float | None = None
    max_fallback_rate: float | None = None
    #: Canary requests needed before a rate or a p99 is trusted, for a rollback as for a step.
    min_requests: int = 20
    #: Text-generation models only (the figures exist for no other model): TTFT p99 bound (ms), and the share of
    #: the default's mean tokens/s the canary must keep (0: not judged).
    max_ttft_p99_ms: float | None = DEFAULT_MAX_TTFT_P99_MS
    min_tokens_per_s_ratio: float | None = DEFAULT_MIN_TOKENS_PER_S_RATIO


@dataclass(frozen=True)
class Figures:
    """One version's traffic over a window."""

    requests: float = 0.0
    errors: float = 0.0
    fallbacks: float = 0.0
    p99_ms: float | None = None
    client_errors: float = 0.0
    #: A text-generation model's (None for the others, or without a generation in the window).
    ttft_p99_ms: float | None = None
    tokens_per_s: float | None = None

    @property
    def failed(self) -> float:
        """Requests that did not succeed: server errors, and client errors (see :func:`breaches`)."""
        return self.errors + self.client_errors

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": int(self.requests), "errors": int(self.errors), "client_errors": int(self.client_errors),
            "error_rate": round(self.error_rate, 4),
            "fallbacks": int(self.fallbacks), "fallback_rate": round(self.fallback_rate, 4),
            "p99_ms": None if self.p99_ms is None else round(self.p99_ms, 2)}
        if self.ttft_p99_ms is not None:
            out["ttft_p99_ms"] = round(self.ttft_p99_ms, 2)
        if self.tokens_per_s is not None:
            out["tokens_per_s"] = round(self.tokens_per_s, 2)
        return out


def breaches(canary: Figures, baseline: Figures, t: Thresholds) -> list[str]:
    """What the canary crossed, worse than the baseline too; empty when it is fine (or not judged yet).

    The error rate counts every request that failed, 4xx included: onnxruntime failing on values that
    passed the manifest's checks is answered 400 (the input's values made the graph fail), and a version
    that refuses what the default serves, on the same traffic, is a regression. Clients' own mistakes
    fall on both versions alike and do not count, since the canary must also be worse than the default."""
    if canary.requests < t.min_requests:
        return []
    out = []
    if canary.error_rate > t.max_error_rate and canary.error_rate > baseline.error_rate:
        out.append(f"error rate {canary.error_rate:.2%} > {t.max_error_rate:.2%} "
                   f"(default: {baseline.error_rate:.2%})")
    if (t.max_p99_ms is not None and canary.p99_ms is not None and canary.p99_ms > t.max_p99_ms
            and canary.p99_ms > (baseline.p99_ms or 0.0)):
        out.append(f"p99 {canary.p99_ms:.1f} ms > {t.max_p99_ms:g} ms (default: "
                   f"{'-' if baseline.p99_ms is None else f'{baseline.p99_ms:.1f}'} ms)")
    if (t.max_fallback_rate is not None and canary.fallback_rate > t.max_fallback_rate
            and canary.fallback_rate > baseline.fallback_rate):
        out.append(f"fallback rate {canary.fallback_rate:.2%} > {t.max_fallback_rate:.2%} "
                   f"(default: {baseline.fallback_rate:.2%})")
    if (t.max_ttft_p99_ms is not None and canary.ttft_p99_ms is not None and canary.ttft_p99_ms > t.max_ttft_p99_ms
            and canary.ttft_p99_ms > (baseline.ttft_p99_ms or 0.0)):
        out.append(f"TTFT p99 {canary.ttft_p99_ms:.1f} ms > {t.max_ttft_p99_ms:g} ms (default: "
                   f"{'-' if baseline.ttft_p99_ms is None else f'{baseline.ttft_p99_ms:.1f}'} ms)")
    if (t.min_tokens_per_s_ratio and canary.tokens_per_s is not None and baseline.tokens_per_s
            and canary.tokens_per_s < t.min_tokens_per_s_ratio * baseline.tokens_per_s):
        out.append(f"tokens/s {canary.tokens_per_s:.1f} < {t.min_tokens_per_s_ratio:g} x the default's "
                   f"{baseline.tokens_per_s:.1f} ({canary.tokens_per_s / baseline.tokens_per_s:.2f}x)")
    return out


@dataclass
class RolloutState:
    model: str
    version: str
    baseline: str
    steps: list[float]
    interval_s: float
    thresholds: Thresholds
    started_at: float
    status: str = RUNNING
    step: int = 0
    step_started_at: float | None = None  # None: the step's share is not applied yet
    reason: str = ""
    updated_at: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    rev: int = 0

    @property
    def percent(self) -> float:
        return self.steps[self.step]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["thresholds"] = dataclasses.asdict(self.thresholds)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RolloutState:
        d = from_dynamo(d)
        d["thresholds"] = Thresholds(**d["thresholds"])
        d["steps"] = [float(s) for s in d["steps"]]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def new_rollout(registry: Registry, model: str, version: str, steps: list[float], interval_s: float,
                thresholds: Thresholds, now: float) -> RolloutState:
    """A rollout of ``version`` against the model's current default (checked: published, not the default)."""
    entry = registry.entry(model)
    if not steps or any(not 0 < s <= 100 for s in steps) or sorted(steps) != steps or steps[-1] != 100:
        raise LifecycleError(f"steps must rise within (0, 100] and end at 100 (the promotion), got {steps}")
    if interval_s <= 0:
        raise LifecycleError(f"the interval must be positive, got {interval_s} s")
    if thresholds.max_ttft_p99_ms is not None and not thresholds.max_ttft_p99_ms > 0:
        raise LifecycleError(f"the TTFT p99 bound must be positive, got {thresholds.max_ttft_p99_ms} ms")
    ratio = thresholds.min_tokens_per_s_ratio
    if ratio is not None and not 0 <= ratio <= 1:
        raise LifecycleError(f"the tokens/s ratio is the share of the default's tokens/s the canary must keep, "
                             f"within [0, 1] (0: not judged), got {ratio}")
    mv = entry.versions.get(version)
    if mv is None or mv.retired:
        raise LifecycleError(f"{model} has no published version {version}; publish it first")
    if version == entry.default_version:
        raise LifecycleError(f"{model} v{version} is already the default")
    if entry.canary and str(entry.canary["version"]) != version:
        raise LifecycleError(f"{model} has a canary of v{entry.canary['version']} running; roll it back first")
    return RolloutState(model, version, entry.default_version, steps, interval_s, thresholds, started_at=now,
                        updated_at=now)


class MetricsSource(Protocol):
    def figures(self, model: str, versions: list[str], start: float, end: float, *,
                generative: bool = False) -> dict[str, Figures]:
        """Each version's figures over [start, end) (epoch seconds); with ``generative`` (a text-generation model)
        also its TTFT p99 and mean tokens/s."""


def tick(state: RolloutState, registry: Registry, metrics: MetricsSource, now: float | None = None) -> RolloutState:
    """Advance ``state`` by what the store and the metrics say now; returns the new state (the caller saves it)."""
    now = time.time() if now is None else now
    if state.status != RUNNING:
        return state
    s = dataclasses.replace(state, events=list(state.events), updated_at=now)
    manifest = registry.manifest()
    entry = registry.entry(s.model, manifest)
    canary = entry.canary
    ours = canary is not None and str(canary["version"]) == s.version
    if entry.default_version == s.version:  # promoted (by a driver that died before saving, or by hand)
        return _finish(s, PROMOTED, "promoted", now)
    last = manifest.change or {}
    ours_rolled_back = (last.get("model") == s.model and last.get("action") == "rollback"
                        and (last.get("details") or {}).get("rollout", {}).get("version") == s.version)
    if canary is None and s.step_started_at is not None and ours_rolled_back:
        return _finish(s, ROLLED_BACK, str(last.get("why")), now)  # rolled back by a driver that died before saving
    if entry.default_version != s.baseline or (canary is not None and not ours) or (
            canary is None and s.step_started_at is not None):
        return _finish(s, ABORTED, f"{s.model} was changed by someone else (default v{entry.default_version}, "
                                   f"canary {canary}); the rollout stopped", now)
    if s.step_started_at is None or float(canary["percent"]) != s.percent:  # type: ignore[index]
        return _start_step(s, registry, now)  # a new step, or one whose share was not saved: (re)start it
    mv = entry.versions.get(s.version)
    figures = metrics.figures(s.model, [s.version, s.baseline], s.step_started_at, now,
                              generative=mv is not None and mv.generative)
    mine, base = figures.get(s.version, Figures()), figures.get(s.baseline, Figures())
    crossed = breaches(mine, base, s.thresholds)
    judged = {"canary": mine.to_json(), "default": base.to_json(), "step_percent": s.percent,
              "window_s": round(now - s.step_started_at, 1)}
    if crossed:
        why = f"automatic rollback at {s.percent:g}%: " + "; ".join(crossed)
        registry.rollback(s.model, why=why, details={"rollout": _rollout_ref(s), "figures": judged})
        s.events.append({"at": now, "event": "rolled_back", "figures": judged, "why": why})
        return _finish(s, ROLLED_BACK, why, now)
    if now - s.step_started_at < s.interval_s:
        return s
    if mine.requests < s.thresholds.min_requests:
        s.events.append({"at": now, "event": "held", "figures": judged,
                         "why": f"{int(mine.requests)} canary requests < min {s.thresholds.min_requests}"})
        return s
    s.events.append({"at": now, "event": "step_passed", "figures": judged})
    s.step += 1
    s.step_started_at = None
    return _start_step(s, registry, now, judged)


def _start_step(s: RolloutState, registry: Registry, now: float, judged: dict[str, Any] | None = None) -> RolloutState:
    ref = {"rollout": _rollout_ref(s)}
    if judged is not None:
        ref["figures"] = judged
    if s.percent >= 100:
        try:
            registry.promote(s.model, s.version, why=f"rollout passed every step ({_steps(s)})", details=ref)
        except LifecycleError as exc:
            return _finish(s, ABORTED, f"promotion refused: {exc.message}", now)
        s.events.append({"at": now, "event": "promoted"})
        return _finish(s, PROMOTED, f"promoted after {_steps(s)}", now)
    try:
        registry.canary(s.model, s.version, s.percent, why=f"rollout step {s.step + 1}/{len(s.steps)}",
                        details={"rollout": _rollout_ref(s)})
    except LifecycleError as exc:
        return _finish(s, ABORTED, f"canary refused: {exc.message}", now)
    s.step_started_at = now
    s.events.append({"at": now, "event": "step_started", "percent": s.percent})
    return s


def _finish(s: RolloutState, status: str, reason: str, now: float) -> RolloutState:
    s.status, s.reason, s.updated_at = status, reason, now
    return s


def _steps(s: RolloutState) -> str:
    return ",".join(f"{p:g}" for p in s.steps) + "%"


def _rollout_ref(s: RolloutState) -> dict[str, Any]:
    return {"version": s.version, "baseline": s.baseline, "steps": s.steps, "interval_s": s.interval_s,
            "thresholds": dataclasses.asdict(s.thresholds)}


# --- where the state lives: DynamoDB ----------------------------------------------------------------------


class DynamoRollouts:
    """Rollout states in a DynamoDB table keyed by ``id`` (the model name), written with a condition on
    ``rev`` so that two drivers never both advance one rollout."""

    def __init__(self, table: str, client: Any = None) -> None:
        if not table:
            from tierserve.errors import ConfigurationError

            raise ConfigurationError("no rollout table: set ROLLOUT_TABLE (template.yaml's RolloutTable)")
        self.table_name = table
        self._client = client

    @property
    def table(self) -> Any:
        if self._client is None:
            from tierserve import aws

            self._client = aws.resource("dynamodb")
        return self._client.Table(self.table_name)

    def get(self, model: str) -> RolloutState | None:
        item = self.table.get_item(Key={"id": model}, ConsistentRead=True).get("Item")
        return RolloutState.from_json(item["state"]) if item else None

    def put(self, state: RolloutState) -> RolloutState:
        """Save ``state`` over revision ``state.rev`` (0: only if there is none, or it is not running)."""
        new = dataclasses.replace(state, rev=state.rev + 1)
        item = {"id": state.model, "rev": new.rev, "status": new.status, "state": to_dynamo(new.to_json())}
        try:
            if state.rev == 0:
                self.table.put_item(Item=item, ConditionExpression="attribute_not_exists(id) OR #s <> :running",
                                    ExpressionAttributeNames={"#s": "status"},
                                    ExpressionAttributeValues={":running": RUNNING})
            else:
                self.table.put_item(Item=item, ConditionExpression="rev = :rev",
                                    ExpressionAttributeValues={":rev": state.rev})
        except Exception as exc:
            if "ConditionalCheckFailed" in type(exc).__name__ or "ConditionalCheckFailed" in str(exc):
                raise ConflictError(f"the rollout of {state.model} was changed by another driver") from exc
            raise
        return new

    def running(self) -> list[RolloutState]:
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"FilterExpression": "#s = :running", "ExpressionAttributeNames": {"#s": "status"},
                                  "ExpressionAttributeValues": {":running": RUNNING}, "ConsistentRead": True}
        while True:
            page = self.table.scan(**kwargs)
            items += page.get("Items") or []
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return [RolloutState.from_json(i["state"]) for i in items]


def advance(store: DynamoRollouts, registry: Registry, metrics: MetricsSource, model: str,
            clock: Callable[[], float] = time.time) -> RolloutState | None:
    """One tick of ``model``'s rollout, saved; None when there is none. A driver that lost the race to
    another (ConflictError) leaves it to the other one."""
    state = store.get(model)
    if state is None or state.status != RUNNING:
        return state
    new = tick(state, registry, metrics, clock())
    if new == state:
        return state
    return store.put(new)


# --- the metrics: CloudWatch GetMetricData on the EMF metrics -----------------------------------------------


class CloudWatchMetrics:
    """Per-version figures from the metrics RouterFunction emits (``tierserve.telemetry``): dimensions
    ``service``, ``function``, ``model``, ``version``; Sum of Requests, Errors, ClientErrors and Fallbacks,
    p99 of Latency. For a text-generation model also (dimensions ``service``, ``model``, ``version``: the
    generation metrics of whichever function ran the engine) the p99 of TimeToFirstToken and the mean of
    TokensPerSecond (its Sum over its SampleCount: exact over any number of datapoints)."""

    def __init__(self, namespace: str, function: str, service: str = "tierserve", client: Any = None) -> None:
        self.namespace = namespace
        self.function = function
        self.service = service
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from tierserve import aws

            self._client = aws.client("cloudwatch")
        return self._client

    def queries(self, model: str, versions: list[str], period: int, generative: bool = False) -> list[dict[str, Any]]:
        out = []
        for i, v in enumerate(versions):
            dims = [{"Name": "service", "Value": self.service}, {"Name": "function", "Value": self.function},
                    {"Name": "model", "Value": model}, {"Name": "version", "Value": v}]
            for metric, stat in (("Requests", "Sum"), ("Errors", "Sum"), ("ClientErrors", "Sum"), ("Fallbacks", "Sum"),
                                 ("Latency", "p99")):
                out.append({"Id": f"{metric.lower()}_{i}", "ReturnData": True, "MetricStat": {
                    "Metric": {"Namespace": self.namespace, "MetricName": metric, "Dimensions": dims},
                    "Period": period, "Stat": stat}})
            if generative:
                gen_dims = [{"Name": "service", "Value": self.service}, {"Name": "model", "Value": model},
                            {"Name": "version", "Value": v}]
                for qid, metric, stat in (("ttft", "TimeToFirstToken", "p99"), ("tpssum", "TokensPerSecond", "Sum"),
                                          ("tpsn", "TokensPerSecond", "SampleCount")):
                    out.append({"Id": f"{qid}_{i}", "ReturnData": True, "MetricStat": {
                        "Metric": {"Namespace": self.namespace, "MetricName": metric, "Dimensions": gen_dims},
                        "Period": period, "Stat": stat}})
        return out

    def figures(self, model: str, versions: list[str], start: float, end: float, *,
                generative: bool = False) -> dict[str, Figures]:
        begin = int(start)
        finish = max(int(end) + 1, begin + 1)
        period = next((p for p in _PERIODS if p >= finish - begin), 60 * -(-(finish - begin) // 60))
        result = self.client.get_metric_data(
            MetricDataQueries=self.queries(model, versions, period, generative),
            StartTime=dt.datetime.fromtimestamp(begin, dt.UTC), EndTime=dt.datetime.fromtimestamp(finish, dt.UTC))
        values = {r["Id"]: [float(x) for x in r.get("Values") or []] for r in result["MetricDataResults"]}
        out = {}
        for i, v in enumerate(versions):
            p99 = values.get(f"latency_{i}") or []
            ttft = values.get(f"ttft_{i}") or []
            tps_n = sum(values.get(f"tpsn_{i}") or [])
            out[v] = Figures(requests=sum(values.get(f"requests_{i}") or []),
                             errors=sum(values.get(f"errors_{i}") or []),
                             fallbacks=sum(values.get(f"fallbacks_{i}") or []), p99_ms=max(p99) if p99 else None,
                             client_errors=sum(values.get(f"clienterrors_{i}") or []),
                             ttft_p99_ms=max(ttft) if ttft else None,
                             tokens_per_s=sum(values.get(f"tpssum_{i}") or []) / tps_n if tps_n else None)
        return out


# --- unattended, in AWS: RolloutFunction on an EventBridge schedule ---------------------------------------


def run_scheduled(settings: Any, *, objects: Any = None, store: DynamoRollouts | None = None,
                  metrics: MetricsSource | None = None, clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Advance every running rollout by one tick (what RolloutFunction does each minute)."""
    from tierserve.errors import TierserveError
    from tierserve.lifecycle.objects import open_objects
    from tierserve.observability import logger

    registry = Registry(objects or open_objects(settings.model_store_uri))
    store = store or DynamoRollouts(settings.rollout_table)
    metrics = metrics or CloudWatchMetrics(settings.metrics_namespace, settings.router_function_name,
                                           settings.service_name)
    out: dict[str, Any] = {}
    for state in store.running():
        try:
            new = advance(store, registry, metrics, state.model, clock)
        except ConflictError:
            out[state.model] = "left to another driver"
            continue
        except TierserveError as exc:
            logger.warning("rollout tick failed", extra={"model": state.model, "error": exc.message})
            out[state.model] = f"error: {exc.message}"
            continue
        out[state.model] = {"status": new.status if new else "gone", "step": new.step if new else None,
                            "reason": new.reason if new else ""}
        if new is not None and new.status != RUNNING:
            logger.info("rollout finished", extra={"model": state.model, "status": new.status, "reason": new.reason})
    return {"rollouts": out}
