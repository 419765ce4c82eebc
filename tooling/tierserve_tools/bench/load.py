"""End-to-end HTTP load with locust, headless, at concurrency 1, 8 and 32: the gateway against direct Triton.

Each locust user (a FastHttpUser, no wait) POSTs the same 1-row MiniLM JSON request, back to back:
to the gateway with ``x-target: gpu`` (API Gateway emulation -> RouterFunction -> Triton) and, as the
baseline, to the local tritonserver directly. Zero failed requests are required (the run fails
otherwise). Levels alternate gateway, direct.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

from tierserve_tools.bench import serve_stack
from tierserve_tools.bench.harness import Context, Figure, Series, Skip

SUITE = "load"
LEVELS = (1, 8, 32)
LOCUSTFILE = '''
from locust import FastHttpUser, task

BODY = {body!r}


class Client(FastHttpUser):
    @task
    def infer(self):
        self.client.post("/v2/models/minilm/infer", data=BODY,
                         headers={{"content-type": "application/json", {header}}})
'''


def _locust(ctx: Context, host: str, users: int, seconds: int, header: str, tag: str) -> dict[str, float]:
    path = ctx.workdir / f"locust_{tag}.py"
    path.write_text(LOCUSTFILE.format(body=serve_stack.request_body(1), header=header))
    prefix = ctx.workdir / f"locust-{tag}-{users}"
    cmd = [sys.executable, "-m", "locust", "-f", str(path), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{seconds}s", "--host", host, "--csv", str(prefix), "--only-summary", "--stop-timeout", "5",
           "--loglevel", "ERROR"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 90, check=False)
    stats = Path(f"{prefix}_stats.csv")
    if not stats.is_file():
        raise RuntimeError(f"locust wrote no stats (exit {proc.returncode}): {proc.stderr[-2000:]}")
    with open(stats, newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    return {"requests": float(row["Request Count"]), "failures": float(row["Failure Count"]),
            "rps": float(row["Requests/s"]), "p50": float(row["50%"]), "p95": float(row["95%"]),
            "p99": float(row["99%"])}


def run(ctx: Context) -> None:
    if shutil.which("locust") is None and not _importable("locust"):
        raise Skip("locust is not installed: pip install -e '.[dev]'")
    stack = serve_stack.stack(ctx)
    seconds = ctx.n(15, 4)
    for users in LEVELS:
        ctx.progress(f"{users} users, {seconds} s each side")
        g = _locust(ctx, stack.url, users, seconds, '"x-target": "gpu"', "gateway")
        d = _locust(ctx, f"http://{stack.triton.http_url}", users, seconds, "", "direct")
        cond = (f"locust {users} users (FastHttpUser, no wait), {seconds} s headless per side, 1-row MiniLM JSON "
                "request; locust shares the 2 cores with the stack")
        ctx.add(Figure(SUITE, f"concurrency {users}: gateway vs direct Triton throughput",
                       Series("tierserve serve (gateway)", unit="req/s", rate=g["rps"], count=int(g["requests"]),
                              p50_ms=g["p50"], p95_ms=g["p95"], p99_ms=g["p99"]),
                       Series("direct Triton", unit="req/s", rate=d["rps"], count=int(d["requests"]),
                              p50_ms=d["p50"], p95_ms=d["p95"], p99_ms=d["p99"]),
                       better="higher", conditions=cond, extra={"concurrency": users}))
        ctx.add(Figure(SUITE, f"concurrency {users}: failed requests (gateway + direct)",
                       Series("failed requests", unit="requests", rate=g["failures"] + d["failures"],
                              count=int(g["requests"] + d["requests"])), None, goal=0, goal_op="<=", goal_on="value",
                       conditions=cond, extra={"kind": "errors"}))


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
