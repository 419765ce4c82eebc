"""The DynamoDB tables the operator commands work on: made locally as template.yaml declares them, found in a
deployed stack by its outputs.

Why its own module: `tierserve keys` (the keys table) and `tierserve usage` (the usage table) each make their
table on a local stack (create it, wait for it, turn TTL on) and find it in a deployed stack (a CloudFormation
output); one copy of each step serves both, and each command keeps only what is its own (key schema, output
name, what to do when the output is missing). tests/unit/test_template_streaming.py and test_template_usage.py
check that the tables made here have the template's key schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tierserve.errors import ConfigurationError

#: The attribute DynamoDB's TTL deletes items by, in every table of the template that has TTL.
TTL_ATTRIBUTE = "expires_at"


def create_table(client: Any, name: str, keys: Sequence[tuple[str, str]], ttl_attribute: str = TTL_ATTRIBUTE) -> None:
    """Create ``name`` on demand (PAY_PER_REQUEST) with ``keys`` as its key schema (``[(attribute, "HASH" |
    "RANGE")]``, string attributes), wait for it, and turn TTL on for ``ttl_attribute``; an existing table is left
    as it is."""
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
    """The value of deployed stack ``stack_name``'s output ``output``; a ConfigurationError that says the stack
    has no such output, then ``missing`` (what to do), when it has none."""
    if cloudformation is None:
        from tierserve import aws

        cloudformation = aws.client("cloudformation")
    stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    for found in stacks[0].get("Outputs", []) if stacks else []:
        if found.get("OutputKey") == output:
            return str(found["OutputValue"])
    raise ConfigurationError(f"stack {stack_name} has no {output} output: {missing}")
