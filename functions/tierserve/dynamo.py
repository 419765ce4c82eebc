"""DynamoDB attribute values to and from plain JSON values: the one definition of the converters.

Why: boto3's DynamoDB resource refuses Python floats (it wants ``Decimal``) and gives every number back as
a ``Decimal``. The batch job state (``tierserve.batch.state``, ``tierserve.batch.shards``) and the rollout
state (``tierserve.lifecycle.rollout``) both store JSON-like documents; both convert here, so that a float
is stored and read back the same way everywhere.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any


def to_dynamo(x: Any) -> Any:
    """JSON -> DynamoDB attribute values: floats as ``Decimal`` (exactly their ``repr``), through dicts and lists."""
    if isinstance(x, float):
        return Decimal(repr(x))
    if isinstance(x, dict):
        return {k: to_dynamo(v) for k, v in x.items()}
    if isinstance(x, list):
        return [to_dynamo(v) for v in x]
    return x


def from_dynamo(x: Any) -> Any:
    """DynamoDB attribute values -> JSON: a ``Decimal`` as an int when it is whole, else a float."""
    if isinstance(x, Decimal):
        return int(x) if x == x.to_integral_value() else float(x)
    if isinstance(x, dict):
        return {k: from_dynamo(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_dynamo(v) for v in x]
    return x
