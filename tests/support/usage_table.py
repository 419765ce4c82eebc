"""A usage table on moto (``mock_aws``), made as `tierserve usage --stack` makes it: the budgets' ledger
(``tierserve.usage``) and the fleet's concurrency cap (``tierserve.admission``) both live in it.

Why here: the usage tests and the admission tests need the same table in the same offline environment."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.dynamodb.models import DynamoDBBackend

from tests.support.keys_table import offline_aws
from tierserve_tools.usage_cli import create_table


@contextmanager
def moto_usage_table(monkeypatch: pytest.MonkeyPatch, table: str, *,
                     serialize_updates: bool = False) -> Iterator[Any]:
    """A DynamoDB client inside moto's mock with the usage table ``table`` created (metrics off).

    ``serialize_updates``: DynamoDB applies the writes to one item one at a time; moto's in-process backend does
    not lock, so threads could interleave inside one UpdateItem's condition check and write. This serializes
    UpdateItem as DynamoDB does (for tests that race threads on one item)."""
    offline_aws(monkeypatch)
    monkeypatch.setenv("TIERSERVE_METRICS", "false")
    if serialize_updates:
        lock = threading.Lock()
        original = DynamoDBBackend.update_item

        def update_item(self: Any, *args: Any, **kwargs: Any) -> Any:
            with lock:
                return original(self, *args, **kwargs)

        monkeypatch.setattr(DynamoDBBackend, "update_item", update_item)
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        create_table(client, table)
        yield client


class Clock:
    """A settable clock for the usage ledger and the concurrency cap (``clock()`` is the time; tests move ``t``)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
