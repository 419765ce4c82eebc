"""`tierserve keys create|list|revoke` against a keys table on moto: the secret is printed once, list never
shows it, revoke refuses the key; the table comes from --table, KEYS_TABLE or a stack's KeysTableName output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.keys_table import TABLE, moto_keys_table
from tierserve import keys
from tierserve_tools import keys_cli
from tierserve_tools.cli import main


@pytest.fixture
def dynamodb(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with moto_keys_table(monkeypatch) as client:
        yield client


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["keys", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_create_list_revoke(dynamodb, capsys) -> None:
    code, out, err = run(capsys, "--table", TABLE, "create", "--caller", "team-a", "--json")
    created = json.loads(out)
    assert code == 0 and keys.is_key(created["key"]) and created["caller"] == "team-a" and created["state"] == "active"
    store = keys.KeyStore(TABLE, dynamodb)
    assert store.lookup(created["key"]).caller == "team-a"
    # Plain create: the secret alone on stdout, the note on stderr
    code, out, err = run(capsys, "create", "--caller", "team-b", "--expires-in-days", "1")  # KEYS_TABLE
    assert code == 0 and keys.is_key(out.strip()) and "shown only now" in err and "expires at" in err
    # list never shows a secret
    code, out, _ = run(capsys, "list", "--json")
    listed = json.loads(out)["keys"]
    assert {k["caller"] for k in listed} == {"team-a", "team-b"}
    assert created["key"] not in out and "hash" not in out
    code, out, _ = run(capsys, "list")
    assert created["key_id"] in out and "active" in out and created["key"] not in out
    # revoke: the key is refused
    code, out, _ = run(capsys, "revoke", created["key_id"])
    assert code == 0 and f"revoked {created['key_id']}" in out
    assert store.lookup(created["key"]) is None
    # an unknown id is a clean error, not a traceback
    code, _, err = run(capsys, "revoke", "0123456789abcdef")
    assert code == 2 and "no key 0123456789abcdef" in err


def test_no_table_says_how_to_name_one(monkeypatch, capsys) -> None:
    monkeypatch.delenv("KEYS_TABLE", raising=False)
    code, _, err = run(capsys, "list")
    assert code == 2 and "--table NAME" in err and "--stack-name" in err


def test_the_stack_output_names_the_table() -> None:
    class CloudFormation:
        def describe_stacks(self, StackName: str) -> dict:
            assert StackName == "prod"
            return {"Stacks": [{"Outputs": [{"OutputKey": "OpenAIBaseUrl", "OutputValue": "https://x/v1"},
                                            {"OutputKey": "KeysTableName", "OutputValue": "prod-KeysTable-1"}]}]}

    assert keys_cli.stack_table("prod", CloudFormation()) == "prod-KeysTable-1"
    from tierserve.errors import ConfigurationError

    class NoKeys(CloudFormation):
        def describe_stacks(self, StackName: str) -> dict:
            return {"Stacks": [{"Outputs": []}]}

    with pytest.raises(ConfigurationError, match="ApiAuth=keys"):
        keys_cli.stack_table("prod", NoKeys())
