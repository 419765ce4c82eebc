"""moto_server with the one CloudWatch feature the rollout needs that moto lacks: percentile statistics.

moto 5.x answers ``GetMetricData`` / ``GetMetricStatistics`` for ``Sum``, ``Average``, ``Minimum``,
``Maximum`` and ``SampleCount`` only; a ``p99`` query fails with HTTP 500. CloudWatch computes ``pNN``
over the raw values of the period, which moto keeps, so this module adds exactly that (nearest rank)
before it runs moto's own server entry point. Everything else is moto as it is:
``python -m tierserve.local.moto_ext -H 127.0.0.1 -p PORT``.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

PERCENTILE_RE = re.compile(r"p(\d{1,2}(?:\.\d+)?)")


def percentile(values: list[float], p: float) -> float | None:
    """CloudWatch's pNN over raw values: the nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def patch() -> None:
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
