"""A table's schema as DynamoDB reports it, next to the one template.yaml declares, in the same shape.

Why here: `tierserve keys --stack`, `tierserve usage --stack` and the tests make their tables locally
(``keys_cli.create_table``, ``usage_cli.create_table``); the template tests check that what those make is what
the template deploys (key schema, attribute types, billing, TTL) by making the table on moto and describing
it, not by reading the code that makes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import boto3
import pytest
from moto import mock_aws

from tests.support.keys_table import offline_aws

#: The properties compared: what a local table must share with the template's.
COMPARED = ("BillingMode", "KeySchema", "AttributeDefinitions", "TimeToLiveSpecification")


def _by_name(attributes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(attributes, key=lambda a: a["AttributeName"])


def made_table(monkeypatch: pytest.MonkeyPatch, create_table: Callable[[Any, str], None]) -> dict[str, Any]:
    """``create_table(client, name)`` run against moto's DynamoDB, then the table described, as CloudFormation
    properties (``COMPARED``)."""
    offline_aws(monkeypatch)
    with mock_aws():
        client = boto3.client("dynamodb", region_name="us-east-1")
        create_table(client, "schema-check")
        table = client.describe_table(TableName="schema-check")["Table"]
        ttl = client.describe_time_to_live(TableName="schema-check")["TimeToLiveDescription"]
    return {"BillingMode": table.get("BillingModeSummary", {}).get("BillingMode", "PROVISIONED"),
            "KeySchema": table["KeySchema"],
            "AttributeDefinitions": _by_name(table["AttributeDefinitions"]),
            "TimeToLiveSpecification": {"AttributeName": ttl.get("AttributeName"),
                                        "Enabled": ttl.get("TimeToLiveStatus") == "ENABLED"}}


def declared_table(template: dict[str, Any], logical_id: str) -> dict[str, Any]:
    """template.yaml's ``logical_id`` table, its ``COMPARED`` properties in :func:`made_table`'s shape."""
    props = template["Resources"][logical_id]["Properties"]
    return {"BillingMode": props.get("BillingMode", "PROVISIONED"), "KeySchema": props["KeySchema"],
            "AttributeDefinitions": _by_name(props["AttributeDefinitions"]),
            "TimeToLiveSpecification": props.get("TimeToLiveSpecification",
                                                 {"AttributeName": None, "Enabled": False})}
