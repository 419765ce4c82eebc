"""The edge runtime's counters, for ``GET /metrics`` (Prometheus text) and ``GET /v2/health/edge`` (JSON).

Why its own: in Lambda, Powertools writes EMF metrics that CloudWatch collects per invocation; a device
has no such collector, so it keeps counters in memory and exposes them to a scraper (Prometheus, the
Greengrass telemetry agent, or an operator's curl). Thread-safe; nothing here blocks a request.

Labels are bounded: a model name taken from a request is a label only when the device knows the model
(``known``: held, or in its last synced manifest); every other name is counted under ``OTHER_MODEL``, so
requests for random names cannot grow the page (or this process's memory) without bound.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable

from tierserve.tiers import Tier

#: The one label for every model name the device does not know (and "-" for routes that name no model).
OTHER_MODEL = "_other"
NO_MODEL = "-"


class EdgeCounters:
    """Requests by model, tier and status; inferences served here (hits), forwarded, and fallbacks.

    ``known(name)``: whether a name from a request may be a label (None: every name is, for tests)."""

    def __init__(self, known: Callable[[str], bool] | None = None) -> None:
        self.known = known
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, str, int]] = Counter()  # (model, served_by, protocol, status)
        self.hits: Counter[tuple[str, str]] = Counter()  # (model, version) served on the device
        self.forwards: Counter[tuple[str, str, str]] = Counter()  # (model, version, served_by) answered by the cloud
        self.forward_failures: Counter[str] = Counter()  # model: the cloud could not be reached
        self.fallbacks: Counter[str] = Counter()  # model: meant for the cloud, served here (cloud unreachable)

    def label(self, model: str) -> str:
        """``model`` when the device knows it (or the no-model label), else ``OTHER_MODEL``."""
        if model == NO_MODEL or self.known is None or self.known(model):
            return model
        return OTHER_MODEL

    def request(self, model: str, served_by: str, protocol: str, status: int) -> None:
        model = self.label(model)
        with self._lock:
            self.requests[(model, served_by, protocol, status)] += 1

    def hit(self, model: str, version: str) -> None:
        with self._lock:
            self.hits[(model, version)] += 1

    def forward(self, model: str, version: str, served_by: str) -> None:
        with self._lock:
            self.forwards[(model, version, served_by)] += 1

    def forward_failure(self, model: str) -> None:
        with self._lock:
            self.forward_failures[model] += 1

    def fallback(self, model: str) -> None:
        with self._lock:
            self.fallbacks[model] += 1

    def totals(self) -> dict[str, dict[str, int]]:
        """Per model: served here, forwarded, forward failures, fallbacks."""
        with self._lock:
            out: dict[str, dict[str, int]] = {}
            for (m, _), n in self.hits.items():
                out.setdefault(m, {})[Tier.EDGE.value] = out.get(m, {}).get(Tier.EDGE.value, 0) + n
            for (m, _, _), n in self.forwards.items():
                out.setdefault(m, {})["forwarded"] = out.get(m, {}).get("forwarded", 0) + n
            for m, n in self.forward_failures.items():
                out.setdefault(m, {})["forward_failures"] = n
            for m, n in self.fallbacks.items():
                out.setdefault(m, {})["fallbacks"] = n
            return out


def _labels(**labels: object) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return f"{{{inner}}}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class PromText:
    """Prometheus text exposition format 0.0.4, one family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, object], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(**labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
