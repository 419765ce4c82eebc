"""Tracing's import cost, the figure behind observability.py's choice: Powertools' Tracer (X-Ray SDK)
against the OpenTelemetry path (SDK + OTLP/HTTP exporter + Lambda instrumentation + X-Ray propagator),
each as the CPU time of a fresh interpreter, interleaved, against ``python -c pass``.

The OpenTelemetry packages are not project dependencies; measure them in a scratch virtualenv:

    python -m venv /tmp/otel && /tmp/otel/bin/pip install aws-lambda-powertools aws-xray-sdk \\
        opentelemetry-sdk opentelemetry-exporter-otlp-proto-http opentelemetry-instrumentation-aws-lambda \\
        opentelemetry-propagator-aws-xray
    python -m tierserve_tools.bench.tracing_imports --python /tmp/otel/bin/python [--rounds 7]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys

CASES = {
    "python -c pass": "pass",
    "Powertools Tracer (X-Ray SDK)": "from aws_lambda_powertools import Tracer; Tracer(service='x', disabled=True)",
    "OpenTelemetry SDK + OTLP/HTTP exporter + Lambda instrumentation + X-Ray propagator":
        "import opentelemetry.sdk.trace, opentelemetry.sdk.trace.export, "
        "opentelemetry.exporter.otlp.proto.http.trace_exporter, opentelemetry.instrumentation.aws_lambda, "
        "opentelemetry.propagators.aws",
}


def cpu_ms(python: str, code: str) -> float | None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    ok = subprocess.run([python, "-c", code], capture_output=True, check=False).returncode == 0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1e3 if ok else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    res: dict[str, list[float]] = {k: [] for k in CASES}
    missing: set[str] = set()
    for _ in range(args.rounds):
        for name, code in CASES.items():
            t = cpu_ms(args.python, code)
            if t is None:
                missing.add(name)
            else:
                res[name].append(t)
    base = statistics.median(res["python -c pass"])
    for name, xs in res.items():
        if name in missing:
            print(f"{'not installed':>28}  {name}")
        else:
            print(f"{statistics.median(xs):8.1f} ms CPU (+{statistics.median(xs) - base:7.1f})  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
