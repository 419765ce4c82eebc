"""A keys table on moto (``mock_aws``), made as `tierserve keys --stack` makes it (the template's key schema).

Why here: the key store's, the authorizer's and the keys CLI's tests all need the same table, and the fixtures
``dynamodb`` / ``key_store`` (import them into a test module with ``# noqa: F401``) are written once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pytest
from moto import mock_aws

from tierserve import keys
from tierserve_tools.keys_cli import create_table

TABLE = "tierserve-keys-test"


def offline_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment in which boto3 reaches moto's mock only: no endpoint, no profile, fake credentials."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_DYNAMODB", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@contextmanager
def moto_keys_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A DynamoDB client inside moto's mock with the keys table created; KEYS_TABLE names it."""
    offline_aws(monkeypatch)
    monkeypatch.setenv("KEYS_TABLE", TABLE)
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        create_table(client, TABLE)
        yield client


@pytest.fixture
def dynamodb(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The keys table's DynamoDB client (moto)."""
    with moto_keys_table(monkeypatch) as client:
        yield client


@pytest.fixture
def key_store(dynamodb: Any) -> keys.KeyStore:
    return keys.KeyStore(TABLE, dynamodb)
