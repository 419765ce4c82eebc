"""template.yaml's usage table (issue 18, tierserve.usage): PITR, encryption and TTL; the default budgets as
parameters reaching the router's environment; the router may only GetItem and UpdateItem on it; the local table
(`tierserve usage --stack`, the tests) has the template's key schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.table_schema import declared_table, made_table
from tierserve.settings import parse_settings
from tierserve_tools import usage_cli
from tierserve_tools.sam import load_template

ROOT = Path(__file__).resolve().parents[1].parent


@pytest.fixture(scope="module")
def template() -> dict:
    return load_template(ROOT / "template.yaml")


def test_the_usage_table_is_recoverable_encrypted_and_expires_old_items(template) -> None:
    table = template["Resources"]["UsageTable"]["Properties"]
    assert table["KeySchema"] == [{"AttributeName": "caller", "KeyType": "HASH"},
                                  {"AttributeName": "sk", "KeyType": "RANGE"}]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert table["SSESpecification"] == {"SSEEnabled": True}
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert template["Outputs"]["UsageTableName"]["Value"] == {"Ref": "UsageTable"}


def test_the_local_table_has_the_templates_key_schema(template, monkeypatch) -> None:
    """`tierserve usage --stack` and the tests make the table as the template does (key schema, attribute types,
    billing, TTL): made on moto and described, compared with UsageTable's properties."""
    assert made_table(monkeypatch, usage_cli.create_table) == declared_table(template, "UsageTable")


def test_the_default_budgets_are_parameters_in_the_routers_environment(template) -> None:
    params = template["Parameters"]
    assert params["TokensPerMinute"]["MinValue"] == 0 and params["TokensPerDay"]["MinValue"] == 0
    env = template["Resources"]["RouterFunction"]["Properties"]["Environment"]["Variables"]
    assert env["USAGE_TABLE"] == {"Ref": "UsageTable"}
    assert env["TOKENS_PER_MINUTE"] == {"Ref": "TokensPerMinute"}
    assert env["TOKENS_PER_DAY"] == {"Ref": "TokensPerDay"}
    assert env["USAGE_RETENTION_DAYS"] == {"Ref": "UsageRetentionDays"}
    s = parse_settings({"USAGE_TABLE": "t", "TOKENS_PER_MINUTE": str(params["TokensPerMinute"]["Default"]),
                        "TOKENS_PER_DAY": str(params["TokensPerDay"]["Default"]),
                        "USAGE_RETENTION_DAYS": str(params["UsageRetentionDays"]["Default"])})
    assert (s.usage_table, s.tokens_per_minute, s.tokens_per_day) == ("t", 100_000, 2_000_000)


def test_only_the_router_may_touch_the_usage_table_with_get_and_update_item(template) -> None:
    grants: dict[str, list[list[str]]] = {}
    for name, res in template["Resources"].items():
        for policy in (res.get("Properties") or {}).get("Policies") or []:
            for statement in policy.get("Statement", []) if isinstance(policy, dict) else []:
                if statement.get("Resource") == {"Fn::GetAtt": ["UsageTable", "Arn"]}:
                    action = statement["Action"]
                    grants.setdefault(name, []).append(sorted([action] if isinstance(action, str) else action))
    assert grants == {"RouterFunction": [["dynamodb:GetItem", "dynamodb:UpdateItem"]]}
