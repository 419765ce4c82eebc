"""`tierserve models rollout`: start (or resume) a rollout and, unless ``--unattended``, drive it here.

The state machine is the one RolloutFunction runs in AWS (``tierserve.lifecycle.rollout``): state in
DynamoDB (``ROLLOUT_TABLE``), figures from CloudWatch ``GetMetricData``, changes through the registry.
Against ``tierserve serve`` (``--stack build/serve``) that is moto_server: its DynamoDB table, and the
metrics the serve process turns from the functions' EMF lines into ``PutMetricData``. ``--unattended``
only records the rollout and leaves it to the scheduled function; without it, this command ticks every
``--tick`` until the rollout ends. Interrupt it (Ctrl-C, a crash) and run it again: it resumes.

A text-generation model is also judged on its generations (issue 18): the canary's time-to-first-token p99
(``--max-ttft-p99-ms``, where it is also slower than the default's) and its mean decode tokens/s, which must
keep ``--min-tokens-per-s-ratio`` of the default's. Other models ignore both.

Exit status: 0 promoted, 1 rolled back or stopped, 2 refused.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any

from tierserve.errors import ConflictError, LifecycleError
from tierserve.lifecycle.objects import ObjectStore
from tierserve.lifecycle.registry import Registry
from tierserve.lifecycle.rollout import (
    DEFAULT_MAX_TTFT_P99_MS,
    DEFAULT_MIN_TOKENS_PER_S_RATIO,
    PROMOTED,
    RUNNING,
    CloudWatchMetrics,
    DynamoRollouts,
    RolloutState,
    Thresholds,
    advance,
    new_rollout,
)

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """``500ms``, ``5s``, ``5m``, ``1h`` or plain seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 30s, 5m, 1h")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def steps(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: steps are percents, e.g. 10,50,100") from None


def add_arguments(sub: Any) -> None:
    ro = sub.add_parser("rollout", help="shift traffic to VERSION step by step; promote, or roll back on a threshold",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ro.add_argument("name", help="the model")
    ro.add_argument("version", help="the published version to roll out")
    ro.add_argument("--steps", type=steps, default=[10.0, 50.0, 100.0], help="canary percents (default 10,50,100)")
    ro.add_argument("--interval", type=duration, default=300.0, help="how long each step is watched (default 5m)")
    ro.add_argument("--max-error-rate", type=float, default=0.01, help="server errors / requests (default 0.01)")
    ro.add_argument("--max-p99-ms", type=float, help="p99 latency bound in ms")
    ro.add_argument("--max-fallback-rate", type=float, help="GPU->CPU fallbacks / requests")
    ro.add_argument("--min-requests", type=int, default=20, help="canary requests needed to judge (default 20)")
    ro.add_argument("--max-ttft-p99-ms", type=float, default=DEFAULT_MAX_TTFT_P99_MS,
                    help=f"text-generation models: time-to-first-token p99 bound in ms (default "
                         f"{DEFAULT_MAX_TTFT_P99_MS:g})")
    ro.add_argument("--min-tokens-per-s-ratio", type=float, default=DEFAULT_MIN_TOKENS_PER_S_RATIO,
                    help=f"text-generation models: the share of the default's mean tokens/s the canary must keep, "
                         f"0 to 1; 0 = not judged (default {DEFAULT_MIN_TOKENS_PER_S_RATIO:g})")
    ro.add_argument("--tick", type=duration, help="how often to check (default: interval/5, at most 1m)")
    ro.add_argument("--table", default=None, help="DynamoDB table of rollouts (default ROLLOUT_TABLE)")
    ro.add_argument("--namespace", default=None, help="metrics namespace (default POWERTOOLS_METRICS_NAMESPACE)")
    ro.add_argument("--function", default=None,
                    help="the router function whose metrics are read (default ROUTER_FUNCTION_NAME or RouterFunction)")
    ro.add_argument("--unattended", action="store_true", help="record the rollout; RolloutFunction drives it")
    ro.add_argument("--why", default="", help="the reason, kept in the history")


def run_rollout(args: argparse.Namespace, objects: ObjectStore, registry: Registry) -> int:
    table = args.table or os.environ.get("ROLLOUT_TABLE", "")
    store = DynamoRollouts(table)
    state = store.get(args.name)
    if state is not None and state.status == RUNNING:
        if state.version != args.version:
            raise LifecycleError(f"a rollout of {args.name} v{state.version} is running; let it finish, or roll it "
                                 f"back (tierserve models rollback {args.name})")
        print(f"{args.name}: resuming the rollout of v{state.version} at step {state.step + 1}/{len(state.steps)} "
              f"({state.percent:g}%)", flush=True)
    else:
        thresholds = Thresholds(args.max_error_rate, args.max_p99_ms, args.max_fallback_rate, args.min_requests,
                                max_ttft_p99_ms=args.max_ttft_p99_ms,
                                min_tokens_per_s_ratio=args.min_tokens_per_s_ratio)
        state = store.put(new_rollout(registry, args.name, args.version, args.steps, args.interval, thresholds,
                                      time.time()))
        mv = registry.entry(args.name).versions.get(args.version)
        generation = (f", max TTFT p99 {thresholds.max_ttft_p99_ms:g} ms, min tokens/s "
                      f"{thresholds.min_tokens_per_s_ratio:g}x the default's"
                      if mv is not None and mv.generative else "")
        print(f"{args.name}: rollout of v{state.version} over default v{state.baseline}: steps "
              f"{','.join(f'{s:g}' for s in state.steps)}%, {state.interval_s:g} s each, max error rate "
              f"{thresholds.max_error_rate:g}, max p99 {thresholds.max_p99_ms or '-'} ms, max fallback rate "
              f"{thresholds.max_fallback_rate if thresholds.max_fallback_rate is not None else '-'}{generation}",
              flush=True)
    if args.unattended:
        print(f"recorded in {table}; RolloutFunction advances it every minute", flush=True)
        return 0
    metrics = CloudWatchMetrics(args.namespace or os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or "tierserve",
                                args.function or os.environ.get("ROUTER_FUNCTION_NAME") or "RouterFunction")
    tick_s = args.tick or min(60.0, max(0.2, state.interval_s / 5))
    shown = len(state.events)
    while True:
        try:
            current = advance(store, registry, metrics, args.name)
        except ConflictError:
            current = store.get(args.name)  # another driver advanced it: follow
        assert current is not None
        shown = _show(current, shown)
        if current.status != RUNNING:
            print(f"{args.name}: {current.status}: {current.reason}", flush=True)
            return 0 if current.status == PROMOTED else 1
        time.sleep(tick_s)


def _show(state: RolloutState, shown: int) -> int:
    for e in state.events[shown:]:
        at = time.strftime("%H:%M:%S", time.localtime(e["at"]))
        figures = e.get("figures") or {}
        canary, default = figures.get("canary") or {}, figures.get("default") or {}
        detail = (f" canary {canary.get('requests')} req, {canary.get('error_rate', 0):.2%} errors, p99 "
                  f"{canary.get('p99_ms')} ms{_generation(canary)} | default {default.get('requests')} req, "
                  f"{default.get('error_rate', 0):.2%} errors, p99 {default.get('p99_ms')} ms"
                  f"{_generation(default)}") if canary else ""
        what = f"{e['event']}" + (f" {e['percent']:g}%" if "percent" in e else "")
        print(f"  {at} {what}{detail}{'  ' + e['why'] if e.get('why') else ''}", file=sys.stdout, flush=True)
    return len(state.events)


def _generation(figures: dict[str, Any]) -> str:
    """A text-generation version's TTFT p99 and tokens/s, as the rollout recorded them (none: '')."""
    if "ttft_p99_ms" not in figures and "tokens_per_s" not in figures:
        return ""
    return f", TTFT p99 {figures.get('ttft_p99_ms', '-')} ms, {figures.get('tokens_per_s', '-')} tokens/s"
