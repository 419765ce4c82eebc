"""Powertools Logger, Metrics and Tracer shared by every function (one instance each).

The namespace and service default to "tierserve" so that metrics are valid even when the
module is imported before the environment is set (tests, the local emulator).

Why the tracer is chosen at import: Powertools' ``Tracer()`` imports the X-Ray SDK even when tracing
is disabled, and the SDK imports botocore's session, client and docs machinery: about 175 ms of every
cold start (measured in issue 10, ``tierserve bench --suite cold-start``). When tracing is on (the
template's ``Tracing`` parameter, ``Active`` by default, in a real Lambda environment) the Tracer is
Powertools' own, unchanged: X-Ray subsegments, the ``ColdStart`` and ``Service`` annotations. When it is
off (``POWERTOOLS_TRACE_DISABLED``, or outside Lambda, under SAM local or Chalice: Powertools' own rule)
a stand-in whose decorators return the function itself is used, and X-Ray is never imported.
OpenTelemetry (ADOT) was measured as the alternative and not adopted; see docs/benchmarks.md.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "tierserve")
_TRUE = ("1", "true", "yes", "on", "y", "t")


def tracing_enabled(env: Mapping[str, str] = os.environ) -> bool:
    """Powertools' rule for an active tracer: not disabled by POWERTOOLS_TRACE_DISABLED, running in
    Lambda (LAMBDA_TASK_ROOT), and not under SAM local or Chalice, where no X-Ray daemon listens."""
    if env.get("POWERTOOLS_TRACE_DISABLED", "false").strip().lower() in _TRUE:
        return False
    return bool(env.get("LAMBDA_TASK_ROOT")) and not env.get("AWS_SAM_LOCAL") and not env.get("AWS_CHALICE_CLI_MODE")


class NoTracer:
    """The tracer when tracing is off: the decorators Powertools' Tracer offers, as no-ops."""

    disabled = True

    @staticmethod
    def _passthrough(fn: Callable[..., Any] | None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    def capture_lambda_handler(self, lambda_handler: Callable[..., Any] | None = None, **options: Any) -> Any:
        return self._passthrough(lambda_handler, **options)

    def capture_method(self, method: Callable[..., Any] | None = None, **options: Any) -> Any:
        return self._passthrough(method, **options)

    def put_annotation(self, key: str, value: Any) -> None:
        pass

    def put_metadata(self, key: str, value: Any, namespace: str | None = None) -> None:
        pass


# Request metrics are EMF lines of their own (tierserve.telemetry); Powertools' Metrics flushes only the
# cold-start metric, so its "no application metrics" warning on every warm invocation says nothing.
warnings.filterwarnings("ignore", message="No application metrics to publish", category=UserWarning)

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "tierserve"), service=SERVICE)
tracer: Tracer | NoTracer = Tracer(service=SERVICE) if tracing_enabled() else NoTracer()

__all__ = ["MetricUnit", "NoTracer", "logger", "metrics", "tracer", "tracing_enabled"]
