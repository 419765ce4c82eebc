"""What CloudWatch Logs does with EMF lines, for `tierserve serve`: the functions' metrics, as metrics.

In AWS, a function prints Embedded Metric Format documents and CloudWatch extracts the metrics from its
logs. Locally the functions print the same lines into ``WORKDIR/<Function>.log``; :class:`EmfBridge`
follows those files and hands every document

* to moto_server's CloudWatch as ``PutMetricData`` (one datum per metric and dimension set, with the
  document's timestamp), so that the rollout reads them with ``GetMetricData`` exactly as in AWS;
* to :class:`MetricsRegistry`, which ``tierserve serve`` renders as Prometheus text on ``GET /metrics``
  (counters, latency histograms, and summaries for rates such as generation's ``TokensPerSecond``, labelled
  with the dimension names of the document: the names ``tierserve.telemetry`` fixes, whose values come from the
  manifest, never from a request), followed by Triton's own metrics.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("tierserve_tools.emf")

#: Latency histogram buckets (milliseconds), Prometheus style (cumulative, plus +Inf).
BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def parse_line(line: str) -> dict[str, Any] | None:
    """An EMF document, or None for any other log line."""
    line = line.strip()
    if not line.startswith("{") or '"_aws"' not in line:
        return None
    try:
        doc = json.loads(line)
    except json.JSONDecodeError:
        return None
    aws = doc.get("_aws") if isinstance(doc, dict) else None
    return doc if isinstance(aws, dict) and aws.get("CloudWatchMetrics") else None


def metric_data(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """``PutMetricData`` datums by namespace for one EMF document (what CloudWatch Logs extracts)."""
    when = dt.datetime.fromtimestamp(int(doc["_aws"].get("Timestamp", 0)) / 1000, dt.UTC)
    out: dict[str, list[dict[str, Any]]] = {}
    for directive in doc["_aws"]["CloudWatchMetrics"]:
        datums = out.setdefault(directive["Namespace"], [])
        for dims in directive.get("Dimensions") or [[]]:
            if any(d not in doc for d in dims):
                continue  # CloudWatch drops a dimension set whose values are missing
            dimensions = [{"Name": d, "Value": str(doc[d])} for d in dims]
            for metric in directive.get("Metrics") or []:
                value = doc.get(metric["Name"])
                if value is None:
                    continue
                datum: dict[str, Any] = {"MetricName": metric["Name"], "Dimensions": dimensions, "Timestamp": when,
                                         "Unit": metric.get("Unit") or "None"}
                if isinstance(value, list):
                    datum["Values"] = [float(v) for v in value]
                else:
                    datum["Value"] = float(value)
                datums.append(datum)
    return out


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class MetricsRegistry:
    """Counters and histograms from EMF documents, rendered as Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._histograms: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}  # buckets.., sum, count
        self._summaries: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}  # sum, count

    def add(self, doc: dict[str, Any]) -> None:
        for directive in doc["_aws"]["CloudWatchMetrics"]:
            names = sorted({d for dims in directive.get("Dimensions") or [] for d in dims if d in doc})
            labels = tuple((n, str(doc[n])) for n in names)
            for metric in directive.get("Metrics") or []:
                raw = doc.get(metric["Name"])
                values = raw if isinstance(raw, list) else [] if raw is None else [raw]
                with self._lock:
                    for v in values:
                        self._observe(metric["Name"], metric.get("Unit") or "", labels, float(v))

    def _observe(self, name: str, unit: str, labels: tuple[tuple[str, str], ...], v: float) -> None:
        if unit == "Milliseconds":
            h = self._histograms.setdefault((name, labels), [0.0] * (len(BUCKETS_MS) + 2))
            for i, bound in enumerate(BUCKETS_MS):
                if v <= bound:
                    h[i] += 1
            h[-2] += v
            h[-1] += 1
        elif unit.endswith("/Second"):  # a rate (TokensPerSecond): summed over requests it means nothing
            s = self._summaries.setdefault((name, labels), [0.0, 0.0])
            s[0] += v
            s[1] += 1
        else:
            key = (name, labels)
            self._counters[key] = self._counters.get(key, 0.0) + v

    def value(self, name: str, **labels: str) -> float:
        """The sum of a counter over every series whose labels include ``labels`` (tests, benchmarks)."""
        with self._lock:
            return sum(v for (n, lab), v in self._counters.items() if n == name and set(labels.items()) <= set(lab))

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = sorted(self._counters.items())
            histograms = sorted(self._histograms.items())
            summaries = sorted(self._summaries.items())
        seen: set[str] = set()
        for (name, labels), value in counters:
            metric = f"tierserve_{_snake(name)}_total"
            if metric not in seen:
                lines += [f"# HELP {metric} {name} (EMF Count), from the functions' logs", f"# TYPE {metric} counter"]
                seen.add(metric)
            lines.append(f"{metric}{_labels(labels)} {value:g}")
        for (name, labels), h in histograms:
            metric = f"tierserve_{_snake(name)}_ms"
            if metric not in seen:
                lines += [f"# HELP {metric} {name} in milliseconds (EMF), from the functions' logs",
                          f"# TYPE {metric} histogram"]
                seen.add(metric)
            for bound, count in zip(BUCKETS_MS, h, strict=False):
                lines.append(f"{metric}_bucket{_labels(labels, le=f'{bound:g}')} {count:g}")
            lines.append(f"{metric}_bucket{_labels(labels, le='+Inf')} {h[-1]:g}")
            lines.append(f"{metric}_sum{_labels(labels)} {h[-2]:g}")
            lines.append(f"{metric}_count{_labels(labels)} {h[-1]:g}")
        for (name, labels), (total, count) in summaries:
            metric = f"tierserve_{_snake(name)}"
            if metric not in seen:
                lines += [f"# HELP {metric} {name} (EMF rate; sum / count is the mean), from the functions' logs",
                          f"# TYPE {metric} summary"]
                seen.add(metric)
            lines.append(f"{metric}_sum{_labels(labels)} {total:g}")
            lines.append(f"{metric}_count{_labels(labels)} {count:g}")
        return "\n".join(lines) + "\n"


def _labels(labels: Iterable[tuple[str, str]], **extra: str) -> str:
    items = [*labels, *extra.items()]
    if not items:
        return ""
    escaped = (f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in items)
    return "{" + ",".join(escaped) + "}"


class EmfBridge:
    """Follows log files; every EMF document goes to ``registry`` and, with a client, to CloudWatch."""

    def __init__(self, paths: list[Path], registry: MetricsRegistry, cloudwatch: Any = None,
                 interval_s: float = 0.2) -> None:
        self.paths = [Path(p) for p in paths]
        self.registry = registry
        self.cloudwatch = cloudwatch
        self.interval_s = interval_s
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.documents = 0

    def start(self) -> EmfBridge:
        for p in self.paths:  # only what is written from now on
            self._offsets[p] = p.stat().st_size if p.exists() else 0
        self._thread = threading.Thread(target=self._run, name="emf-bridge", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.poll()  # what was written last

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # keep following; a bad line or a moto hiccup must not stop the metrics
                log.exception("EMF bridge: poll failed")

    def poll(self) -> int:
        """Read what was appended since the last poll; returns the number of EMF documents handled."""
        docs = []
        for path in self.paths:
            if not path.exists():
                continue
            with open(path, "rb") as fh:
                fh.seek(self._offsets.get(path, 0))
                chunk = fh.read()
                self._offsets[path] = fh.tell()
            text = self._partial.pop(path, "") + chunk.decode("utf-8", errors="replace")
            lines = text.split("\n")
            if lines and lines[-1]:
                self._partial[path] = lines[-1]
            docs += [d for d in (parse_line(line) for line in lines[:-1]) if d is not None]
        for doc in docs:
            self.registry.add(doc)
        if self.cloudwatch is not None and docs:
            self._put(docs)
        self.documents += len(docs)
        return len(docs)

    def _put(self, docs: list[dict[str, Any]]) -> None:
        by_namespace: dict[str, list[dict[str, Any]]] = {}
        for doc in docs:
            for ns, datums in metric_data(doc).items():
                by_namespace.setdefault(ns, []).extend(datums)
        for ns, datums in by_namespace.items():
            for i in range(0, len(datums), 500):
                self.cloudwatch.put_metric_data(Namespace=ns, MetricData=datums[i:i + 500])
