"""boto3 clients and resources, made once per process and shared: the runtime's one cache of AWS clients.

Why one cache: building a boto3 client costs tens of milliseconds (its service model is loaded, its
credentials resolved) and each one keeps its own connection pool, so a warm function must build each
client once. The runtime, the backends, the model store, the shared breaker, batch and lifecycle each
had a cache of their own (or none). boto3 clients are thread-safe once built; building them is not,
so they are built under a lock.

A client is kept per service, per botocore ``Config`` (its timeouts and retries are fixed when it is
built: a backend asks for one per read timeout) and per AWS environment: endpoints
(``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3`` ...), region, profile and credentials come from there, and
the local emulator and tests change them between invocations, so a client built for one endpoint is never
handed out for another.
``clear()`` forgets them all (``tierserve.app.reset_runtime``). boto3 is imported on first use only.
"""

from __future__ import annotations

import os
import threading
from typing import Any

_cache: dict[tuple[str, str, str, tuple[str | None, ...]], Any] = {}
_lock = threading.Lock()


#: The variables a client's endpoint, region and credentials come from (besides ``AWS_ENDPOINT_URL_<SERVICE>``).
_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


def _environment(service: str) -> tuple[str | None, ...]:
    """What the environment says about ``service``'s client (a few lookups: this is on every request's path)."""
    get = os.environ.get
    return (get(f"AWS_ENDPOINT_URL_{service.upper().replace('-', '_')}"), *(get(v) for v in _ENVIRONMENT))


def _get(kind: str, service: str, config: dict[str, Any]) -> Any:
    key = (kind, service, repr(sorted(config.items())) if config else "", _environment(service))
    found = _cache.get(key)
    if found is None:
        with _lock:
            found = _cache.get(key)
            if found is None:
                import boto3

                options: dict[str, Any] = {}
                if config:
                    from botocore.config import Config

                    options["config"] = Config(**config)
                found = _cache[key] = (boto3.resource if kind == "resource" else boto3.client)(service, **options)
    return found


def client(service: str, **config: Any) -> Any:
    """The process's boto3 client for ``service`` with botocore ``Config(**config)`` (none: boto3's defaults)."""
    return _get("client", service, config)


def resource(service: str) -> Any:
    """The process's boto3 resource for ``service`` (``"dynamodb"``: tables as objects)."""
    return _get("resource", service, {})


def clear() -> None:
    """Forget every client (the next call builds a new one): the environment's settings may have changed."""
    with _lock:
        _cache.clear()
