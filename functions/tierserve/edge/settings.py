"""The edge runtime's settings: command-line flags, each with an environment variable, parsed once.

Why both: a Greengrass recipe or a systemd unit passes flags; a container passes environment
variables. A flag wins over its variable. What the edge shares with the cloud (``MAX_PAYLOAD_BYTES``,
``ROUTING_POLICY``, ``BREAKER_*``) stays in ``tierserve.settings`` and is read from the environment
the same way, so a device and the cloud apply the same limits and policies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tierserve.errors import ConfigurationError, TierserveError
from tierserve.manifest import check_model_name
from tierserve.settings import boolean, choice

#: What a Raspberry Pi 4 (4 cores, 2-8 GB) gives a model runtime by default: a quarter of 2 GB and 2 GB of disk.
DEFAULT_MAX_MEMORY_MB = 512
DEFAULT_MAX_DISK_MB = 2048


def _names(value: str) -> tuple[str, ...]:
    return tuple(check_model_name(n.strip()) for n in value.split(",") if n.strip())


def _level(value: str) -> str:
    return choice("DEBUG", "INFO", "WARNING", "ERROR")(value.upper())


@dataclass(frozen=True)
class EdgeSettings:
    store_uri: str = "build/models"
    cache_dir: str = str(Path.home() / ".cache" / "tierserve-edge")
    seed_dir: str = ""  # a store folder shipped with the device (Greengrass artifacts): served before any sync
    models: tuple[str, ...] = ()  # only these edge-placed models (empty: every edge-placed model)
    sync_interval_s: float = 60.0
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 8001  # 0: a free port; -1: no gRPC server
    cloud_url: str = ""  # the cloud gateway; empty: standalone (what is not held gets 503)
    cloud_auth: str = "iam"
    cloud_region: str = ""
    cloud_token_file: str = ""
    forward_timeout_s: float = 30.0  # API Gateway's own integration limit
    max_rows: int = 0  # 0: the manifest's routing.edge_max_rows, else routing.DEFAULT_EDGE_MAX_ROWS
    max_concurrency: int = 0  # inferences run at once before forwarding; 0: one per core
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB  # loaded sessions (estimated), LRU-evicted
    max_disk_mb: int = DEFAULT_MAX_DISK_MB  # the cache of verified artifacts, LRU-evicted
    threads: int = 0  # onnxruntime intra-op threads per session; 0: one per core, at most 4
    log_level: str = "INFO"
    log_requests: bool = False  # one structured log line per request (the cloud's "routed" line)

    @property
    def concurrency(self) -> int:
        return self.max_concurrency or (os.cpu_count() or 1)

    @property
    def intra_op_threads(self) -> int:
        return self.threads or max(1, min(4, os.cpu_count() or 1))


#: field -> (flag, environment variable, parser). One table; nothing is read elsewhere.
OPTIONS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "store_uri": ("--store", "EDGE_STORE_URI", str),
    "cache_dir": ("--cache-dir", "EDGE_CACHE_DIR", str),
    "seed_dir": ("--seed", "EDGE_SEED_DIR", str),
    "models": ("--models", "EDGE_MODELS", _names),
    "sync_interval_s": ("--sync-interval", "EDGE_SYNC_INTERVAL_S", float),
    "host": ("--host", "EDGE_HOST", str),
    "port": ("--port", "EDGE_PORT", int),
    "grpc_port": ("--grpc-port", "EDGE_GRPC_PORT", int),
    "cloud_url": ("--cloud-url", "EDGE_CLOUD_URL", str),
    "cloud_auth": ("--cloud-auth", "EDGE_CLOUD_AUTH", choice("none", "iam", "jwt")),
    "cloud_region": ("--cloud-region", "EDGE_CLOUD_REGION", str),
    "cloud_token_file": ("--cloud-token-file", "EDGE_CLOUD_TOKEN_FILE", str),
    "forward_timeout_s": ("--forward-timeout", "EDGE_FORWARD_TIMEOUT_S", float),
    "max_rows": ("--max-rows", "EDGE_MAX_ROWS", int),
    "max_concurrency": ("--max-concurrency", "EDGE_MAX_CONCURRENCY", int),
    "max_memory_mb": ("--max-memory-mb", "EDGE_MAX_MEMORY_MB", int),
    "max_disk_mb": ("--max-disk-mb", "EDGE_MAX_DISK_MB", int),
    "threads": ("--threads", "EDGE_THREADS", int),
    "log_level": ("--log-level", "EDGE_LOG_LEVEL", _level),
    "log_requests": ("--log-requests", "EDGE_LOG_REQUESTS", boolean),
}
_POSITIVE = {"sync_interval_s", "forward_timeout_s", "max_memory_mb", "max_disk_mb"}
_NON_NEGATIVE = {"port", "max_rows", "max_concurrency", "threads"}


def parse_edge_settings(flags: Mapping[str, str | None], env: Mapping[str, str] = os.environ) -> EdgeSettings:
    """EdgeSettings from flags (field -> raw value, None when not given) over the environment.

    Raises ConfigurationError naming the flag and its variable when a value is invalid."""
    values: dict[str, Any] = {}
    for name, (flag, var, parse) in OPTIONS.items():
        raw = flags.get(name)
        if raw is None:
            raw = env.get(var)
        if raw is None or raw == "":
            continue
        try:
            values[name] = parse(str(raw))
        except (ValueError, TierserveError) as exc:
            detail = getattr(exc, "message", None) or str(exc)
            raise ConfigurationError(f"{flag} ({var}) = {raw!r} is invalid: {detail}") from None
        if name in _POSITIVE and values[name] <= 0:
            raise ConfigurationError(f"{flag} ({var}) = {raw!r} must be positive")
        if name in _NON_NEGATIVE and values[name] < 0:
            raise ConfigurationError(f"{flag} ({var}) = {raw!r} must be 0 or more")
    settings = EdgeSettings(**values)
    if settings.cloud_url and not settings.cloud_url.startswith(("http://", "https://")):
        raise ConfigurationError(f"--cloud-url (EDGE_CLOUD_URL) = {settings.cloud_url!r} must start with "
                                 "http:// or https:// (the stack's ApiUrl output)")
    if settings.cloud_url and settings.cloud_auth == "jwt" and not settings.cloud_token_file:
        raise ConfigurationError("--cloud-auth jwt needs --cloud-token-file (EDGE_CLOUD_TOKEN_FILE): a file holding "
                                 "the JWT, re-read on every request")
    if settings.grpc_port < -1:
        raise ConfigurationError(f"--grpc-port (EDGE_GRPC_PORT) = {settings.grpc_port} must be a port, 0 or -1")
    assert {f.name for f in fields(EdgeSettings)} >= set(values)
    return settings
