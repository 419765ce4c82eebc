"""`tierserve usage`: tokens used per caller, model, version and tier, what they cost, and callers' budgets.

    tierserve usage [--table NAME | --stack-name STACK | --stack build/serve] [--store URI]
        [--caller X] [--since YYYY-MM-DD] [--json] [--prices FILE]
    tierserve usage --caller X --set-tokens-per-minute N [--set-tokens-per-day N]   (0: no limit)
    tierserve usage --caller X --clear-budget                                      (back to the default)

Why: a generative model is paid for by the token (issue 18). The router counts every generation's tokens per
caller and UTC day in the stack's usage table (``tierserve.usage``); this command reads those counters, and
prices them per tier: the estimated cost per 1M tokens of each tier, from ``compiler/prices.json`` (or
``--prices``) and the tokens/s the compiler measured (or, for the GPU tier, estimated from its cited table) for
each model version, in its manifest (``generation.tiers``):

* cpu: Lambda's GB-seconds for 1M tokens at the version's memory class and tokens/s, plus one request per
  default completion (the compiler's placement formula);
* gpu: the instance's hourly price over 1M tokens at its tokens/s x the cited concurrency gain x the
  utilisation in prices.json;
* edge: none (the device is yours: no per-token price).

A prompt token is priced as a generated one: an upper bound (prefill costs less per token than decode).

The table is ``--table``, else ``USAGE_TABLE``, else the ``UsageTableName`` output of ``--stack-name``'s
CloudFormation stack; ``--stack DIR`` targets a running ``tierserve serve`` (its ``DIR/env.json``: its
moto_server and its store), where the table is created on first use. The manifest (for prices) is ``--store``,
else the stack's store, else ``MODEL_STORE_URI``; without one, usage is shown without costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tierserve import usage
from tierserve.errors import ConfigurationError, InvalidRequestError
from tierserve_tools import stack_tables

#: The usage table of a local stack (`tierserve serve`), unless its env.json names one (USAGE_TABLE).
LOCAL_TABLE = "tierserve-usage"
#: The stack output that names the deployed table.
TABLE_OUTPUT = "UsageTableName"
#: template.yaml's UsageTable key schema: the caller, then what the item is (budget, window or usage row).
KEY_SCHEMA = (("caller", "HASH"), ("sk", "RANGE"))
#: Default reach of --since: the last 7 UTC days, today included.
DEFAULT_DAYS = 7


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("usage", help="tokens per caller, model and tier, their estimated cost, and budgets",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--table", help="the usage table's name (default: USAGE_TABLE)")
    where.add_argument("--stack-name", help="a deployed stack: its UsageTableName output names the table")
    where.add_argument("--stack", type=Path, metavar="DIR",
                       help="a running `tierserve serve` (its workdir, e.g. build/serve): a table on its moto_server")
    p.add_argument("--store", metavar="URI",
                   help="the model store whose manifest gives each tier's tokens/s (default: the stack's store, "
                        "else MODEL_STORE_URI; none: no costs)")
    p.add_argument("--prices", type=Path, metavar="FILE",
                   help="prices for the cost estimate (default: the compiler's prices.json)")
    p.add_argument("--caller", help="one caller only (an API key's caller, a JWT sub or an IAM ARN); also shows "
                                    "its budget and what its current minute and day hold")
    p.add_argument("--since", metavar="YYYY-MM-DD",
                   help=f"the first UTC day counted (default: the last {DEFAULT_DAYS} days, today included)")
    p.add_argument("--by-day", action="store_true", help="one row per day too (default: summed over the days)")
    p.add_argument("--json", action="store_true", help="one JSON document (stable keys) instead of tables")
    p.add_argument("--set-tokens-per-minute", type=int, metavar="N",
                   help="override --caller's tokens per UTC minute (0: no limit)")
    p.add_argument("--set-tokens-per-day", type=int, metavar="N",
                   help="override --caller's tokens per UTC day (0: no limit)")
    p.add_argument("--clear-budget", action="store_true",
                   help="remove --caller's override: the stack's default budget applies again")
    p.set_defaults(func=run_cli)


def create_table(client: Any, name: str) -> None:
    """The usage table as template.yaml's UsageTable declares it (partition key ``caller``, sort key ``sk``, TTL
    on ``expires_at``), for local stacks and tests; an existing table is left as it is."""
    stack_tables.create_table(client, name, KEY_SCHEMA)


def stack_table(stack_name: str, cloudformation: Any = None) -> str:
    """The ``UsageTableName`` output of a deployed stack."""
    return stack_tables.stack_output(stack_name, TABLE_OUTPUT, "deploy a template with the usage table (issue 18), "
                                     "or pass --table", cloudformation)


def open_ledger(args: argparse.Namespace) -> tuple[usage.Ledger, str | None]:
    """The ledger of the table the arguments name, and the store URI they name (None: no prices)."""
    store = args.store
    if args.stack:
        from tierserve import aws
        from tierserve_tools.models_cli import load_stack

        stacked = load_stack(args.stack)  # boto3 now talks to the stack's moto_server
        env = json.loads((Path(args.stack) / "env.json").read_text())["RouterFunction"]
        client = aws.client("dynamodb")
        table = env.get("USAGE_TABLE") or LOCAL_TABLE
        create_table(client, table)
        return usage.Ledger(table, _default_budget(env), client=client), store or stacked
    table = args.table or os.environ.get("USAGE_TABLE") or (stack_table(args.stack_name) if args.stack_name else "")
    if not table:
        raise ConfigurationError("which usage table? pass --table NAME, --stack-name STACK (its UsageTableName "
                                 "output), --stack DIR (a local `tierserve serve`), or set USAGE_TABLE")
    return usage.Ledger(table, _default_budget(os.environ)), store or os.environ.get("MODEL_STORE_URI") or None


def _default_budget(env: Any) -> usage.Budget:
    def number(name: str) -> int:
        raw = env.get(name) or "0"
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"{name}={raw!r} is not a whole number of tokens") from None

    return usage.Budget(number("TOKENS_PER_MINUTE"), number("TOKENS_PER_DAY"))


def check_day(text: str) -> str:
    """A ``YYYY-MM-DD`` day (UTC), checked."""
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise InvalidRequestError(f"--since {text!r} is not a day: use YYYY-MM-DD (UTC), e.g. "
                                  f"{usage.day_of(time.time())}") from None
    return text


# --- prices ------------------------------------------------------------------------------------------------------


def tier_prices(manifest: Any, prices: dict[str, Any], gpu_table: dict[str, Any]) -> dict[tuple[str, str, str], dict]:
    """(model, version, tier) -> {tokens_per_s, usd_per_1m_tokens, source} for every generative version the
    manifest lists (its default, canary and listed versions)."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for name, entry in manifest.models.items():
        for version, mv in entry.versions.items():
            if not getattr(mv, "generative", False) or mv.generation is None:
                continue
            for tier, fig in mv.generation.tiers.items():
                out[(name, version, tier)] = {
                    "tokens_per_s": fig.tokens_per_s,
                    "usd_per_1m_tokens": cost_per_1m(tier, fig.tokens_per_s, prices, gpu_table,
                                                     memory_mb=int((mv.cpu or {}).get("memory_mb") or 1769),
                                                     context_length=mv.generation.context_length),
                    "source": fig.source}
    return out


def cost_per_1m(tier: str, tokens_per_s: float, prices: dict[str, Any], gpu_table: dict[str, Any], *,
                memory_mb: int = 1769, context_length: int = 2048) -> float | None:
    """The estimated USD per 1M tokens on ``tier`` at ``tokens_per_s`` (the compiler's placement formula);
    None for the edge (no per-token price) and an unknown tier."""
    if tokens_per_s <= 0:
        return None
    if tier == "cpu":
        default_tokens = max(1, min(256, context_length - 1))
        return (memory_mb / 1024 * (1e6 / tokens_per_s) * float(prices["lambda_gb_s_usd"])
                + float(prices["lambda_request_usd"]) * 1e6 / default_tokens)
    if tier == "gpu":
        per_s = tokens_per_s * float(gpu_table["concurrency_gain"]) * float(prices["gpu_utilisation"])
        return float(prices["gpu_hourly_usd"]) / (per_s * 3600) * 1e6
    return None


def load_price_tables(prices_file: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    from tierserve_compiler.config import load_prices
    from tierserve_compiler.placement import GPU_GENERATION_FILE

    return load_prices(prices_file), json.loads(GPU_GENERATION_FILE.read_text())


def load_manifest(store: str) -> Any:
    from tierserve.lifecycle.objects import open_objects
    from tierserve.lifecycle.registry import Registry

    return Registry(open_objects(store)).manifest()


# --- the command -----------------------------------------------------------------------------------------------------


def summarise(rows: list[usage.UsageRow], by_day: bool) -> list[dict[str, Any]]:
    """Rows summed per caller, model, version and tier (and day when ``by_day``)."""
    sums: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in rows:
        key = (r.caller, r.day if by_day else "", r.model, r.version, r.tier)
        s = sums.setdefault(key, {"caller": r.caller, "model": r.model, "version": r.version, "tier": r.tier,
                                  **({"day": r.day} if by_day else {}),
                                  "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
        s["requests"] += r.requests
        s["prompt_tokens"] += r.prompt_tokens
        s["completion_tokens"] += r.completion_tokens
        s["total_tokens"] += r.total_tokens
    return [sums[k] for k in sorted(sums)]


def run_cli(args: argparse.Namespace) -> int:
    budget_change = args.set_tokens_per_minute is not None or args.set_tokens_per_day is not None
    if (budget_change or args.clear_budget) and not args.caller:
        raise InvalidRequestError("--set-tokens-per-minute, --set-tokens-per-day and --clear-budget need --caller")
    if budget_change and args.clear_budget:
        raise InvalidRequestError("--clear-budget removes the override; --set-* sets one: pass one or the other")
    ledger, store = open_ledger(args)
    if budget_change or args.clear_budget:
        budget = (ledger.clear_budget(args.caller) if args.clear_budget
                  else ledger.set_budget(args.caller, args.set_tokens_per_minute, args.set_tokens_per_day))
        if args.json:
            print(json.dumps({"caller": args.caller, "budget": budget.to_json()}, indent=2, sort_keys=True))
        else:
            print(f"caller {args.caller}: {_budget_text(budget)}")
        return 0
    since = check_day(args.since) if args.since else usage.day_of(time.time() - (DEFAULT_DAYS - 1) * 86_400)
    rows = summarise(ledger.usage(args.caller, since), args.by_day)
    prices: dict[tuple[str, str, str], dict[str, Any]] = {}
    price_note = "no model store given (--store): costs not estimated"
    if store:
        price_table, gpu_table = load_price_tables(args.prices)
        prices = tier_prices(load_manifest(store), price_table, gpu_table)
        price_note = f"prices: {args.prices or 'compiler/prices.json'}; tokens/s: the manifest of {store}"
    for row in rows:
        rate = prices.get((row["model"], row["version"], row["tier"]), {}).get("usd_per_1m_tokens")
        row["estimated_usd"] = None if rate is None else round(row["total_tokens"] / 1e6 * rate, 6)
    caller_doc: dict[str, Any] | None = None
    if args.caller:
        budget = ledger.budget(args.caller, fresh=True)
        caller_doc = {"caller": args.caller, "budget": budget.to_json(),
                      "this_minute_tokens": ledger.window_tokens(args.caller, usage.MINUTE),
                      "today_tokens": ledger.window_tokens(args.caller, usage.DAY)}
    tiers = [{"model": m, "version": v, "tier": t, **figures} for (m, v, t), figures in sorted(prices.items())]
    if args.json:
        print(json.dumps({"table": ledger.table, "since": since, "rows": rows, "tiers": tiers, "caller": caller_doc,
                          "note": price_note}, indent=2, sort_keys=True))
        return 0
    print(f"usage since {since} (UTC days) in {ledger.table}")
    head = ["CALLER", *(["DAY"] if args.by_day else []), "MODEL", "VERSION", "TIER", "REQUESTS", "PROMPT",
            "COMPLETION", "TOTAL", "EST. USD"]
    table = [[r["caller"], *([r["day"]] if args.by_day else []), r["model"], r["version"], r["tier"],
              f"{r['requests']:,}", f"{r['prompt_tokens']:,}", f"{r['completion_tokens']:,}", f"{r['total_tokens']:,}",
              "-" if r["estimated_usd"] is None else f"{r['estimated_usd']:.6f}"] for r in rows]
    if rows:
        total = sum(r["total_tokens"] for r in rows)
        usd = [r["estimated_usd"] for r in rows if r["estimated_usd"] is not None]
        table.append(["TOTAL", *([""] if args.by_day else []), "", "", "", f"{sum(r['requests'] for r in rows):,}",
                      f"{sum(r['prompt_tokens'] for r in rows):,}", f"{sum(r['completion_tokens'] for r in rows):,}",
                      f"{total:,}", f"{sum(usd):.6f}" if usd else "-"])
        _print_table(head, table)
    else:
        print("(no usage recorded)")
    if caller_doc is not None:
        print(f"\ncaller {args.caller}: {_budget_text(budget)}; this UTC minute {caller_doc['this_minute_tokens']:,} "
              f"tokens, today {caller_doc['today_tokens']:,} (reserved and settled)")
    print(f"\nestimated cost per 1M tokens for each tier ({price_note}; a prompt token priced as a generated one):")
    if tiers:
        _print_table(["MODEL", "VERSION", "TIER", "TOKENS/S", "USD / 1M TOKENS"],
                     [[t["model"], t["version"], t["tier"], f"{t['tokens_per_s']:,.1f}",
                       "- (no per-token price)" if t["usd_per_1m_tokens"] is None else f"{t['usd_per_1m_tokens']:.4f}"]
                      for t in tiers])
    else:
        print("(no generative model with tier figures)")
    return 0


def _budget_text(budget: usage.Budget) -> str:
    def one(n: int, per: str) -> str:
        return f"no limit per {per}" if n <= 0 else f"{n:,} tokens per {per}"

    return f"{one(budget.tokens_per_minute, 'minute')}, {one(budget.tokens_per_day, 'day')} ({budget.source})"


def _print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    for line in (head, *rows):
        sys.stdout.write("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=False)).rstrip() + "\n")
