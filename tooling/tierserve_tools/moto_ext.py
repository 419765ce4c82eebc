"""moto_server with what the project relies on that moto lacks: percentile statistics, atomic DynamoDB items.

moto 5.x answers ``GetMetricData`` / ``GetMetricStatistics`` for ``Sum``, ``Average``, ``Minimum``,
``Maximum`` and ``SampleCount`` only; a ``p99`` query fails with HTTP 500. CloudWatch computes ``pNN``
over the raw values of the period, which moto keeps, so this module adds exactly that (nearest rank)
before it runs moto's own server entry point.

DynamoDB applies each request to an item atomically (a conditional update checks and writes as one step;
two ``ADD``s to one counter both count). moto_server serves each request on its own thread and runs an
UpdateItem as a read-modify-write of the stored item with no lock, so concurrent requests interleave: a
fanned-out batch job lost one shard's ``lines`` while the same UpdateItem's other counters and the set of
finished shards kept it (issue 16, defect 9), and a conditional claim could be won twice. This module runs
moto's DynamoDB requests one at a time. Everything else is moto as it is:
``python -m tierserve_tools.moto_ext -H 127.0.0.1 -p PORT``.
"""

from __future__ import annotations

import math
import re
import sys
import threading
from typing import Any

PERCENTILE_RE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")


def percentile(values: list[float], p: float) -> float | None:
    """CloudWatch's pNN over raw values: the nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


#: moto's DynamoDB requests, one at a time (an RLock: a transaction's handler may call another's).
DYNAMODB_LOCK = threading.RLock()


def patch() -> None:
    """Percentile statistics for CloudWatch, and atomic DynamoDB requests (idempotent)."""
    _atomic_dynamodb()
    _percentiles()


def _atomic_dynamodb() -> None:
    from moto.dynamodb.responses import DynamoHandler

    original = DynamoHandler.call_action
    if getattr(original, "_tierserve", False):
        return

    def call_action(self: Any) -> Any:
        with DYNAMODB_LOCK:  # the response is built inside too: ALL_NEW is the state this request left
            return original(self)

    call_action._tierserve = True  # type: ignore[attr-defined]
    DynamoHandler.call_action = call_action  # type: ignore[method-assign]


def _percentiles() -> None:
    from moto.cloudwatch import models

    original = models.Statistics.get_statistics_for_type
    if getattr(original, "_tierserve", False):
        return

    def get_statistics_for_type(self: Any, stat: str) -> Any:
        m = PERCENTILE_RE.fullmatch(stat)
        if m is not None:
            return percentile(list(self.metric_single_values_list), float(m.group(1)))
        return original(self, stat)

    get_statistics_for_type._tierserve = True  # type: ignore[attr-defined]
    models.Statistics.get_statistics_for_type = get_statistics_for_type  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    patch()
    from moto.server import main as moto_main

    moto_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
