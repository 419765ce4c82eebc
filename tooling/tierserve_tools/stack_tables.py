"""The DynamoDB tables the operator commands read: made locally as template.yaml declares them, found in a
deployed stack by its outputs.

Why its own module: `tierserve keys` and `tierserve usage` each need both for their own table; one copy of
each step (create, wait, turn TTL on; read a stack output) serves both.
"""

from __future__ import annotations

from typing import Any

from tierserve.errors import ConfigurationError


def create_table(client: Any, name: str, keys: list[tuple[str, str]], ttl_attribute: str = "expires_at") -> None:
    """Create ``name`` with ``keys`` ([(attribute, HASH|RANGE)], string attributes), on demand, with TTL on
    ``ttl_attribute``; an existing table is left as it is."""
    try:
        client.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                            AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a, _ in keys],
                            KeySchema=[{"AttributeName": a, "KeyType": kind} for a, kind in keys])
    except client.exceptions.ResourceInUseException:
        return
    client.get_waiter("table_exists").wait(TableName=name)
    client.update_time_to_live(TableName=name,
                               TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl_attribute})


def stack_output(stack_name: str, output: str, missing: str, cloudformation: Any = None) -> str:
    """The value of a deployed stack's ``output``; a ConfigurationError saying ``missing`` when it has none."""
    if cloudformation is None:
        from tierserve import aws

        cloudformation = aws.client("cloudformation")
    stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    for found in stacks[0].get("Outputs", []) if stacks else []:
        if found.get("OutputKey") == output:
            return str(found["OutputValue"])
    raise ConfigurationError(f"stack {stack_name} has no {output} output: {missing}")
