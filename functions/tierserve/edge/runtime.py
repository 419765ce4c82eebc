"""The edge runtime, composed and run: store, backends, dispatcher, servers and the sync loop.

Composition, as ``tierserve.app`` does it for the cloud, from two sets of settings: the runtime's own
(``tierserve.settings``, from the environment: ``MAX_PAYLOAD_BYTES``, ``ROUTING_POLICY``, ``BREAKER_*``,
``HEALTH_TTL_S``, the same variables and defaults as in the cloud) and the device's (``EdgeSettings``).
The result is a real :class:`tierserve.app.Runtime` whose store is the device's ``EdgeStore`` and whose
dispatcher is the ``EdgeDispatcher``, so the cloud's endpoint table and inference path serve it.

Start-up order, so that a device serves as early as it can: the saved state (what it held before it
stopped, re-verified), else the seed folder; then the servers; then the sync loop (the first sync at
once, then every ``--sync-interval``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from tierserve.app import Runtime
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.client import Client, auth_from
from tierserve.edge.backend import EdgeBackend
from tierserve.edge.dispatch import EdgeDispatcher
from tierserve.edge.forward import CloudBackend
from tierserve.edge.metrics import EdgeCounters, PromText
from tierserve.edge.server import EdgeHttpServer
from tierserve.edge.settings import EdgeSettings
from tierserve.edge.store import MB, EdgeStore
from tierserve.routing import at_edge, get_policy
from tierserve.settings import Settings, parse_settings

#: A link that may be slow to connect is given this long before the request is called unreachable.
CONNECT_TIMEOUT_S = 3.0


class _NoRequestLines(logging.Filter):
    """Drops the per-request log lines of the shared inference path (the cloud's "routed" line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in ("routed", "request refused")


class EdgeRuntime:
    """``with EdgeRuntime(EdgeSettings(...)) as edge: edge.url`` (tests, the demo) or ``tierserve edge``."""

    def __init__(self, edge: EdgeSettings, settings: Settings | None = None, s3_client: Any = None) -> None:
        self.edge = edge
        self.settings = settings if settings is not None else parse_settings(os.environ)
        self.store = EdgeStore(edge.store_uri, edge.cache_dir, models=edge.models,
                               max_disk_bytes=edge.max_disk_mb * MB, max_memory_bytes=edge.max_memory_mb * MB,
                               s3_client=s3_client)
        self.counters = EdgeCounters(known=self.store.knows)  # labels: models the device knows, else one
        self.backend = EdgeBackend(self.store, edge.intra_op_threads, edge.max_memory_mb * MB)
        cloud = None
        if edge.cloud_url:
            auth = auth_from(edge.cloud_auth, region=edge.cloud_region or None, token_file=edge.cloud_token_file)
            cloud = CloudBackend(Client(edge.cloud_url, auth, timeout_s=edge.forward_timeout_s,
                                        connect_timeout_s=CONNECT_TIMEOUT_S, pool_size=max(4, edge.concurrency)))
        s = self.settings
        self.dispatcher = EdgeDispatcher(
            self.store, self.backend, cloud, at_edge(get_policy(s.routing_policy)),
            CircuitBreaker(s.breaker_failure_threshold, s.breaker_cooldown_s, s.breaker_success_threshold),
            HealthCache(s.health_ttl_s), max_rows=edge.max_rows, concurrency=edge.concurrency,
            forward_timeout_s=edge.forward_timeout_s, counters=self.counters)
        self.runtime = Runtime(s, self.store, self.dispatcher)
        self.dispatcher.runtime = self.runtime  # generation on the device runs through it (issue 17)
        self.http: EdgeHttpServer | None = None
        self.grpc: Any = None
        self.startup_s = 0.0
        self.started_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self.http is not None, "the edge runtime is not started"
        return self.http.url

    @property
    def grpc_url(self) -> str:
        return f"{self.edge.host}:{self.grpc.port}" if self.grpc is not None else ""

    def __enter__(self) -> EdgeRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self, sync: bool = True) -> EdgeRuntime:
        """Load what the device held (or its seed), listen, then sync in the background (``sync=False``: no loop)."""
        t0 = time.perf_counter()
        self.started_at = time.time()
        self._configure_logging()
        try:
            if not self.store.load_state() and self.edge.seed_dir:
                self.store.seed_from(self.edge.seed_dir)
            from tierserve.observability import metrics

            self.http = EdgeHttpServer(self.runtime, self.counters, self.status, self.prometheus, self.edge.host,
                                       self.edge.port, after_request=metrics.clear_metrics).start()
            if self.edge.grpc_port >= 0:
                from tierserve.edge.grpc_server import EdgeGrpcServer

                self.grpc = EdgeGrpcServer(self.runtime, self.counters, self.edge.host, self.edge.grpc_port,
                                           threads=max(4, self.edge.concurrency * 2),
                                           streams=max(4, self.edge.concurrency * 2),
                                           after_request=metrics.clear_metrics).start()
        except BaseException:
            self.stop()
            raise
        if sync:
            self._thread = threading.Thread(target=self._sync_loop, name="edge-sync", daemon=True)
            self._thread.start()
        self.startup_s = time.perf_counter() - t0
        return self

    def _configure_logging(self) -> None:
        from tierserve.observability import logger

        logger.setLevel(self.edge.log_level)
        if not self.edge.log_requests and not any(isinstance(f, _NoRequestLines) for f in logger._logger.filters):
            logger.addFilter(_NoRequestLines())

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            self.store.sync()
            self._stop.wait(self.edge.sync_interval_s)

    def sync(self) -> Any:
        """One sync now (tests, and `tierserve edge --once`)."""
        return self.store.sync()

    def stop(self) -> None:
        self._stop.set()
        if self.grpc is not None:
            self.grpc.stop()
            self.grpc = None
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def ready_line(self) -> str:
        held = ", ".join(f"{n} v{v}" for n, v in sorted(self.store.snapshot.held)) or "none yet"
        cloud = self.edge.cloud_url or "none (standalone)"
        grpc = f"; grpc {self.grpc_url}" if self.grpc is not None else ""
        return (f"tierserve edge: ready on {self.url}{grpc} (store {self.edge.store_uri}, every "
                f"{self.edge.sync_interval_s:g} s; cloud {cloud}; held: {held}; started in {self.startup_s:.2f} s)")

    # --- health and metrics ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Sync state, versions held, the cloud link, and hit and forward counts (``GET /v2/health/edge``)."""
        snap = self.store.snapshot
        st = self.store.status
        models = []
        loaded = set(self.backend.pool.loaded())
        for (name, version), held in sorted(snap.held.items()):
            entry = snap.manifest.models.get(name) if snap.manifest is not None else None
            role = "default" if entry is not None and entry.default_version == version else "canary"
            models.append({"name": name, "version": version, "role": role,
                           "variant": held.model.edge_variant or held.model.cpu_variant or held.model.selected_variant,
                           "sha256": held.sha256, "bytes": held.size_bytes, "loaded": held.digest in loaded})
        return {
            "sync": {"state": st.state(snap.manifest is not None), "store": self.edge.store_uri,
                     "interval_s": self.edge.sync_interval_s, "syncs": st.syncs, "failures": st.failures,
                     "last_success": st.last_success, "last_attempt": st.last_attempt, "last_error": st.last_error,
                     "last_duration_s": round(st.last_duration_s, 4), "refused": dict(st.refused),
                     "source": st.source},
            "models": models,
            "cloud": {"url": self.edge.cloud_url or None, "circuit": self.dispatcher.state()["cloud"]},
            "counts": self.counters.totals(),
            "memory": {"rss_bytes": rss_bytes(), "sessions_bytes_estimate": self.backend.pool.used_bytes,
                       "budget_bytes": self.edge.max_memory_mb * MB},
            "disk": {"cache_bytes": sum(self.store.disk_usage().values()), "budget_bytes": self.edge.max_disk_mb * MB},
        }

    def prometheus(self) -> str:
        """The same figures as ``status()``, in Prometheus text format (``GET /metrics``)."""
        snap = self.store.snapshot
        st = self.store.status
        c = self.counters
        p = PromText()
        p.family("tierserve_edge_requests_total", "counter", "Requests answered, by model, tier, protocol and status.",
                 [({"model": m, "served_by": s, "protocol": pr, "status": code}, n)
                  for (m, s, pr, code), n in sorted(c.requests.items())])
        p.family("tierserve_edge_inferences_total", "counter", "Inferences run on this device (hits).",
                 [({"model": m, "version": v}, n) for (m, v), n in sorted(c.hits.items())])
        p.family("tierserve_edge_forwarded_total", "counter", "Inferences forwarded to and answered by the cloud.",
                 [({"model": m, "version": v, "served_by": s}, n) for (m, v, s), n in sorted(c.forwards.items())])
        p.family("tierserve_edge_forward_failures_total", "counter", "Forwards the cloud could not be reached for.",
                 [({"model": m}, n) for m, n in sorted(c.forward_failures.items())])
        p.family("tierserve_edge_fallbacks_total", "counter", "Inferences meant for the cloud, served here instead.",
                 [({"model": m}, n) for m, n in sorted(c.fallbacks.items())])
        p.family("tierserve_edge_model_held", "gauge", "Versions held by this device (1 each).",
                 [({"model": n, "version": v, "sha256": h.sha256[:12]}, 1) for (n, v), h in sorted(snap.held.items())])
        p.family("tierserve_edge_syncs_total", "counter", "Successful syncs.", [({}, st.syncs)])
        p.family("tierserve_edge_sync_failures_total", "counter", "Syncs that could not read the store.",
                 [({}, st.failures)])
        p.family("tierserve_edge_last_sync_success_timestamp_seconds", "gauge", "When the last sync succeeded.",
                 [({}, st.last_success or 0)])
        p.family("tierserve_edge_refused_versions", "gauge", "Versions the last sync refused (1 each).",
                 [({"version": k}, 1) for k in sorted(st.refused)])
        state = self.dispatcher.state()["cloud"]
        p.family("tierserve_edge_cloud_circuit", "gauge", "The cloud link's circuit breaker (1 = its state).",
                 [({"state": s}, int(s == state)) for s in ("closed", "open", "half_open", "none")])
        p.family("tierserve_edge_inflight", "gauge", "Inferences running on this device.",
                 [({}, self.dispatcher.inflight)])
        p.family("tierserve_edge_session_memory_bytes", "gauge", "Estimated memory of the loaded sessions.",
                 [({}, self.backend.pool.used_bytes)])
        p.family("tierserve_edge_cache_bytes", "gauge", "Bytes of verified artifacts on disk.",
                 [({}, sum(self.store.disk_usage().values()))])
        p.family("process_resident_memory_bytes", "gauge", "Resident memory of this process.", [({}, rss_bytes())])
        return p.text()


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
