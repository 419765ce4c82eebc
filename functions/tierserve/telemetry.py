"""Operational metrics as CloudWatch Embedded Metric Format (EMF) lines, with ``model`` and ``version``.

Why EMF written here rather than through Powertools' ``Metrics`` singleton: one request's figures must land
in several dimension sets at once, and each set costs money, so the sets are chosen per metric, explicitly:

=====================================  =====================================================================
dimension set                          what reads it
=====================================  =====================================================================
``service, function``                  alarms: p99 latency and errors per function
``service, function, model, version``  the rollout (canary vs default), the dashboard's per-version widgets
``service, function, model, tier``     the dashboard's per-tier widgets (cpu / gpu, fallbacks)
``service, function, code``            errors by code (``ErrorsByCode``), a document of its own
``service, function, state``           circuit breaker transitions (``BreakerTransitions``)
``service, model, version``            generation's figures per version whichever function generated
                                       (the rollout's TTFT p99 and tokens/s: the CPU function, or the router
                                       with its CPU tier in process)
``service``                            generation's figures service-wide (the TTFT p99 alarm)
=====================================  =====================================================================

EMF allows 30 dimensions per set and 100 metrics per document; we use at most 4 and 7. Cost: CloudWatch
bills each distinct (metric name, dimension values) as one custom metric (about $0.30 a month), so a
model with two live versions on two tiers costs ``6 metrics x (1 + 2 + 2)`` per function, about $9 a
month; retired versions stop emitting and stop costing after their data ages out. Only values from the
manifest and fixed sets ever become dimensions, never a name from a request: an unknown model's 404
counts only in ``ErrorsByCode``.

Metrics: ``Requests``, ``Errors`` (5xx), ``ClientErrors`` (4xx), ``Latency`` (ms, successes), ``Rows``,
``Fallbacks``; ``ErrorsByCode``; ``BreakerTransitions``; ``ModelLoadTime`` (ms, a session built on a cold
cache); the batch function's ``BatchRows``, ``BatchErrors``, ``BatchJobDuration``, ``BatchJobsCompleted``,
``BatchJobsFailed``; generation's ``TimeToFirstToken``, ``InterTokenLatency`` (ms), ``PromptTokens``,
``CompletionTokens`` and ``TokensPerSecond`` (:func:`generation`), and each generation a function answers counted
like a request (:func:`generation_request`, ``Generations``: the rollout's error rate, the failover rate's
denominator); Powertools adds ``ColdStart``. Each line
goes to stdout, which Lambda sends to CloudWatch Logs, which extracts the metrics; ``tierserve serve`` does the
same locally (``tierserve_tools.emf_bridge``: PutMetricData into moto_server, and its ``/metrics`` page).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

SERVICE_ENV = "POWERTOOLS_SERVICE_NAME"
NAMESPACE_ENV = "POWERTOOLS_METRICS_NAMESPACE"
#: Set to "false" to emit nothing (tests that read stdout).
ENABLED_ENV = "TIERSERVE_METRICS"

COUNT, MS = "Count", "Milliseconds"


def function_name() -> str:
    return os.environ.get("AWS_LAMBDA_FUNCTION_NAME") or "local"


def base() -> dict[str, str]:
    return {"service": os.environ.get(SERVICE_ENV) or "tierserve", "function": function_name()}


def emit(values: dict[str, str], dimension_sets: list[list[str]], metrics: dict[str, tuple[str, float]]) -> None:
    """Write one EMF document: ``metrics`` (name -> (unit, value)) in every dimension set."""
    if os.environ.get(ENABLED_ENV, "").lower() in ("0", "false", "off"):
        return
    doc: dict[str, Any] = {
        "_aws": {"Timestamp": int(time.time() * 1000), "CloudWatchMetrics": [{
            "Namespace": os.environ.get(NAMESPACE_ENV) or "tierserve",
            "Dimensions": dimension_sets,
            "Metrics": [{"Name": name, "Unit": unit} for name, (unit, _) in metrics.items()]}]},
        **values,
        **{name: value for name, (_, value) in metrics.items()},
    }
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def request(model: str, version: str, *, tier: str | None, latency_ms: float, rows: int = 0,
            fallback: bool = False, status: int = 200) -> None:
    """One inference request for a model version the manifest lists (successful or not)."""
    values = {**base(), "model": model, "version": version}
    sets = [["service", "function"], ["service", "function", "model", "version"]]
    if tier:
        values["tier"] = tier
        sets.append(["service", "function", "model", "tier"])
    metrics: dict[str, tuple[str, float]] = {
        "Requests": (COUNT, 1), "Errors": (COUNT, int(status >= 500)),
        "ClientErrors": (COUNT, int(400 <= status < 500)), "Fallbacks": (COUNT, int(fallback)), "Rows": (COUNT, rows)}
    if status < 400:
        metrics["Latency"] = (MS, round(latency_ms, 3))
    emit(values, sets, metrics)


def error_code(code: str) -> None:
    """One error response, by its code (a fixed set: ``tierserve.errors``)."""
    emit({**base(), "code": code}, [["service", "function", "code"]], {"ErrorsByCode": (COUNT, 1)})


def breaker_transition(old: str, new: str) -> None:
    emit({**base(), "state": new}, [["service", "function"], ["service", "function", "state"]],
         {"BreakerTransitions": (COUNT, 1)})


def model_loaded(model: str, version: str, ms: float) -> None:
    emit({**base(), "model": model, "version": version},
         [["service", "function"], ["service", "function", "model", "version"]],
         {"ModelLoadTime": (MS, round(ms, 3))})


def batch_job(model: str, version: str, *, rows: int, errors: int, seconds: float) -> None:
    """A batch job completed: its rows, its error lines and how long it took (across invocations)."""
    emit({**base(), "model": model, "version": version},
         [["service", "function"], ["service", "function", "model", "version"]],
         {"BatchRows": (COUNT, rows), "BatchErrors": (COUNT, errors),
          "BatchJobDuration": (MS, round(seconds * 1000, 1)), "BatchJobsCompleted": (COUNT, 1)})


def batch_job_failed() -> None:
    """A batch job failed (its message goes back to the queue, then to the DLQ): function-wide only, since
    the model named by a failed job may not exist."""
    emit(base(), [["service", "function"]], {"BatchJobsFailed": (COUNT, 1)})


def generation(model: str, version: str, tier: str, *, ttft_ms: float | None, itl_ms: float | None,
               prompt_tokens: int, completion_tokens: int, tokens_per_s: float | None) -> None:
    """One generation (issue 17), emitted once its last event is out (a stream's metrics are known only then;
    Powertools' decorators would flush them when the handler returns, before the stream ends): time to first
    token, mean inter-token latency (ms), prompt and completion tokens, decode tokens/s; per model and version,
    and per model and tier. A figure that does not exist (no token came out) is left out.

    Also (issue 18) per model and version without the function (``service, model, version``: what a rollout
    judges, whichever function ran the engine) and service-wide (``service``: what an alarm can name, since
    an alarm's dimensions are fixed). Only the process that runs the engine emits these, once per generation,
    so neither set counts a generation twice. Cost: 5 metrics more per listed version and 5 for the service."""
    metrics: dict[str, tuple[str, float]] = {"PromptTokens": (COUNT, prompt_tokens),
                                             "CompletionTokens": (COUNT, completion_tokens)}
    if ttft_ms is not None:
        metrics["TimeToFirstToken"] = (MS, round(ttft_ms, 3))
    if itl_ms is not None:
        metrics["InterTokenLatency"] = (MS, round(itl_ms, 3))
    if tokens_per_s is not None:
        metrics["TokensPerSecond"] = ("Count/Second", round(tokens_per_s, 3))
    emit({**base(), "model": model, "version": version, "tier": tier},
         [["service", "function", "model", "version"], ["service", "function", "model", "tier"],
          ["service", "model", "version"], ["service"]], metrics)


def generation_request(model: str, version: str, *, tier: str | None, status: int, fallback: bool = False) -> None:
    """One generation this function answered, counted as :func:`request` counts an inference (issue 18): ``Requests``,
    ``Errors`` (5xx), ``ClientErrors`` (4xx), ``Fallbacks`` per function, per model version (the rollout's error
    rate) and per model and tier, and ``Generations`` (the mid-stream failover rate's denominator). No
    ``Latency``: a generation lasts as long as its answer, which would swamp the p99 of the inferences (its
    figures are :func:`generation`'s time to first token and tokens/s)."""
    values = {**base(), "model": model, "version": version}
    sets = [["service", "function"], ["service", "function", "model", "version"]]
    if tier:
        values["tier"] = tier
        sets.append(["service", "function", "model", "tier"])
    emit(values, sets, {"Requests": (COUNT, 1), "Errors": (COUNT, int(status >= 500)),
                        "ClientErrors": (COUNT, int(400 <= status < 500)), "Fallbacks": (COUNT, int(fallback)),
                        "Generations": (COUNT, 1)})


class CountedGeneration:
    """Counts one generation with :func:`generation_request` once its outcome is known: a refusal before it starts
    (:meth:`guard`), the end of its stream (200), an error the stream raised (its status), or :meth:`close`
    before the end (the client went away: not the version's failure). The tier is the last event's
    ``served_by``; ``fallback`` is read from the wrapped stream. Other attributes pass through to the stream."""

    def __init__(self, model: str, version: str, status_of: Callable[[BaseException], int]) -> None:
        self._model, self._version, self._status_of = model, version, status_of
        self._events: Iterator[Any] | None = None
        self._tier: str | None = None
        self._done = False

    def guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; an exception it raises counts (with its status) before it propagates."""
        try:
            return fn(*args)
        except Exception as exc:
            self._count(self._status_of(exc))
            raise

    def stream(self, events: Iterator[Any]) -> CountedGeneration:
        self._events = events
        return self

    def __iter__(self) -> CountedGeneration:
        return self

    def __next__(self) -> Any:
        if self._done or self._events is None:
            raise StopIteration
        try:
            event = next(self._events)
        except StopIteration:
            self._count(200)
            raise
        except Exception as exc:
            self._count(self._status_of(exc))
            raise
        self._tier = getattr(event, "served_by", None) or self._tier
        return event

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        try:
            if close is not None:
                close()
        finally:
            self._count(200)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._events, name)

    def _count(self, status: int) -> None:
        if self._done:
            return
        self._done = True
        generation_request(self._model, self._version, tier=self._tier, status=status,
                           fallback=bool(getattr(self._events, "fallback", None)))


def caller_usage(caller: str, model: str, version: str, tier: str, prompt_tokens: int, completion_tokens: int) -> None:
    """One generation's tokens, per caller (issue 18, ``tierserve.usage``): ``CallerPromptTokens`` and
    ``CallerCompletionTokens`` with the caller as their one dimension besides the service (each caller is a
    custom metric: a few per caller, not per model), and model, version and tier as properties for Logs
    Insights."""
    emit({"service": base()["service"], "function": function_name(), "caller": caller, "model": model,
          "version": version, "tier": tier}, [["service", "caller"]],
         {"CallerPromptTokens": (COUNT, prompt_tokens), "CallerCompletionTokens": (COUNT, completion_tokens)})


def budget_refused(caller: str, window: str) -> None:
    """A request refused for its caller's token budget (a 429): ``BudgetRefusals`` per caller, ``window``
    ("minute" or "day") as a property."""
    emit({"service": base()["service"], "caller": caller, "window": window}, [["service"], ["service", "caller"]],
         {"BudgetRefusals": (COUNT, 1)})


def failover_mid_stream(model: str, version: str, from_tier: str, to_tier: str, after_tokens: int) -> None:
    """A generation whose tier failed after ``after_tokens`` tokens went on on another tier (issue 18, ``tiering``):
    ``FailoverMidStream`` (count; alarm on its rate) and ``FailoverAfterTokens`` per model version and per tier
    (the tier it left), ``to`` as a property."""
    emit({**base(), "model": model, "version": version, "tier": from_tier, "to": to_tier},
         [["service", "function"], ["service", "function", "model", "version"],
          ["service", "function", "model", "tier"]],
         {"FailoverMidStream": (COUNT, 1), "FailoverAfterTokens": (COUNT, after_tokens)})
