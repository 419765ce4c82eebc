"""`tierserve bench` (and `make bench`): every suite, each figure a ratio against its baseline in the same run.

    tierserve bench [--quick] [--suite NAME ...] [--models build/models] [--out bench/results]
                    [--guidellm .venv-bench/bin/guidellm]

Writes ``OUT/latest.json`` (every figure with its baseline, ratio, sample counts, p50/p95/p99, the
machine and the versions) and ``OUT/latest.md`` (tables and PNG plots). Progress goes to stderr. A suite
that cannot run here (no perf_analyzer, no local Triton, no compiled model) is recorded as skipped
with the reason; the run fails (exit 1) only when a suite raises, or when a figure that requires it
(the load suite's zero errors) is not met. ``--quick`` is sized to finish in under 3 minutes on 2 cores.
``--guidellm`` (what ``make bench`` passes) also runs the field's tool, guidellm, unchanged against the generate
suite's gateway (``tierserve_tools.bench.field_tool``: rounds alternating with our client at the same load and by
guidellm's definitions, medians compared within 15%) and saves its own reports in OUT beside ours.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tierserve_tools.bench.harness import Context, Skip

#: suite -> module with ``run(ctx)``; in the order they run (the cheap, local ones first).
SUITES: dict[str, str] = {
    "handler": "tierserve_tools.bench.handler_vs_raw",
    "codec": "tierserve_tools.bench.codec",
    "routing": "tierserve_tools.bench.router_overhead",
    "cold-start": "tierserve_tools.bench.cold_start",
    "quant": "tierserve_tools.bench.quant",
    "batch": "tierserve_tools.bench.batch_throughput",
    "gateway": "tierserve_tools.bench.gateway",
    "load": "tierserve_tools.bench.load",
    "generate": "tierserve_tools.bench.generate",  # before cost: cost prices its measured tokens/s
    "cost": "tierserve_tools.bench.cost",
    "edge": "tierserve_tools.bench.edge",
}
#: figures whose goal is a requirement of the run itself (not a measurement to report)
REQUIRED = {("load", "errors")}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="run the benchmark suites; write bench/results/latest.{json,md}",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small samples: under 3 minutes on 2 cores")
    p.add_argument("--suite", action="append", choices=list(SUITES), help="run only these (repeatable)")
    p.add_argument("--models", type=Path, default=Path("build/models"), help="the compiler's output (make demo)")
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="where latest.json, latest.md and the suites' figures (PNG) are written")
    p.add_argument("--rss", action="store_true", help="batch: also peak RSS on 100k vs 1M rows (minutes)")
    p.add_argument("--guidellm", type=Path, default=None, metavar="PATH",
                   help="generate: also run guidellm (this executable, from its own venv: make bench-venv) against "
                        "the gateway, alternating with our client (5 rounds a level, 1 with --quick), and set the "
                        "medians beside ours; its reports go to --out")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    names = args.suite or list(SUITES)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = list(os.getloadavg())
    t0 = time.monotonic()
    suites: dict[str, Any] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="tierserve-bench-") as tmp:
        ctx = Context(args.models, Path(tmp), args.quick, notes={"rss": args.rss})
        if getattr(args, "guidellm", None) is not None:
            from tierserve_tools.bench import field_tool

            ctx.notes.update(field_tool=field_tool.run_guidellm, guidellm=args.guidellm.resolve(), out=args.out)
        try:
            for name in names:
                ctx.suite = name
                ctx.progress(f"start ({names.index(name) + 1}/{len(names)})")
                s0 = time.monotonic()
                before = len(ctx.figures)
                entry: dict[str, Any] = {"status": "ok"}
                saved_env = dict(os.environ)  # a suite sets the variables it needs; the next starts clean
                try:
                    importlib.import_module(SUITES[name]).run(ctx)
                except Skip as exc:
                    entry = {"status": "skipped", "reason": str(exc)}
                    ctx.progress(f"skipped: {exc}")
                except Exception as exc:  # one broken suite must not hide the others' figures
                    failed = True
                    entry = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                             "traceback": traceback.format_exc()[-4000:]}
                    ctx.progress(f"FAILED: {type(exc).__name__}: {exc}")
                finally:
                    os.environ.clear()
                    os.environ.update(saved_env)
                    _reset_runtime()
                entry["seconds"] = round(time.monotonic() - s0, 1)
                entry["figures"] = len(ctx.figures) - before
                if name in ctx.notes.get("suite_notes", {}):
                    entry["notes"] = ctx.notes["suite_notes"][name]
                suites[name] = entry
        finally:
            closer = ctx.notes.pop("close", None)
            if closer is not None:
                closer()
        args.out.mkdir(parents=True, exist_ok=True)
        for plot in ctx.notes.get("plot_files", []):  # made in the scratch folder by a suite
            shutil.copyfile(plot, args.out / Path(plot).name)
    from tierserve_tools.bench import report

    for f in ctx.figures:
        if (f.suite, f.extra.get("kind")) in REQUIRED and f.met is False:
            failed = True
            ctx.progress(f"required figure not met: {f.suite}: {f.name}")
    doc = report.document(suites, ctx.figures, args.quick, started, datetime.now(UTC).isoformat(timespec="seconds"),
                          round(time.monotonic() - t0, 1), load_start)
    js, md = report.write(doc, args.out)
    print(f"tierserve bench: {len(ctx.figures)} figures from {sum(s['status'] == 'ok' for s in suites.values())}/"
          f"{len(suites)} suites in {doc['seconds']:.0f} s -> {js}, {md}", file=sys.stderr)
    for name, s in suites.items():
        if s["status"] != "ok":
            print(f"  {name}: {s['status']}: {s.get('reason', '')}", file=sys.stderr)
    return 1 if failed else 0


def _reset_runtime() -> None:
    from tierserve.app import reset_runtime

    reset_runtime()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
