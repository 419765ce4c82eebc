"""Powertools Logger, Metrics and Tracer shared by every function (one instance each).

The namespace and service default to "tierserve" so that metrics are valid even when the
module is imported before the environment is set (tests, the local emulator).
"""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "tierserve")

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "tierserve"), service=SERVICE)
tracer = Tracer(service=SERVICE)

__all__ = ["MetricUnit", "logger", "metrics", "tracer"]
