"""Tiny Lambda handlers for the local emulation's own tests (quotas, timeouts): importable by a worker."""

from __future__ import annotations

import time
from typing import Any


def echo_size(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """A result of ``event["n"]`` characters (an HTTP API response when ``event["http"]``)."""
    body = "x" * int(event.get("n", 0))
    return {"statusCode": 200, "body": body} if event.get("http") else {"data": body}


def sleep(event: dict[str, Any], context: Any) -> dict[str, Any]:
    time.sleep(float(event.get("s", 1.0)))
    return {"statusCode": 200, "body": "late"}
