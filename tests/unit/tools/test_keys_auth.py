"""The local API Gateway's bearer-key check (tierserve_tools.keys_auth): a usable key passes; missing, malformed,
unknown and revoked keys get the deployed API's 401 in OpenAI's error shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.keys_table import TABLE, moto_keys_table
from tierserve import keys
from tierserve_tools.keys_auth import keys_authorizer
from tierserve_tools.sam import load_template


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[keys.KeyStore]:
    with moto_keys_table(monkeypatch) as client:
        yield keys.KeyStore(TABLE, client)


def test_a_usable_key_passes_and_others_get_401(store: keys.KeyStore) -> None:
    authorize = keys_authorizer(store)
    secret, key = store.create("team-a")
    assert authorize("POST", "/v1/chat/completions", {"authorization": f"Bearer {secret}"}, b"{}") is None
    refused: list[Any] = [authorize("POST", "/v1/completions", h, b"") for h in (
        {}, {"Authorization": "Basic x"}, {"Authorization": f"Bearer {keys.new_secret()}"})]
    store.revoke(key.key_id)
    refused.append(authorize("GET", "/v1/models", {"Authorization": f"Bearer {secret}"}, b""))
    for status, headers, body in refused:
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_the_same_401_as_the_deployed_api() -> None:
    from pathlib import Path

    from tierserve_tools.keys_auth import UNAUTHORIZED

    template = load_template(Path(__file__).resolve().parents[3] / "template.yaml")
    deployed = template["Resources"]["StreamingApi"]["Properties"]["DefinitionBody"][
        "x-amazon-apigateway-gateway-responses"]["UNAUTHORIZED"]["responseTemplates"]["application/json"]
    assert json.loads(deployed.strip("'")) == UNAUTHORIZED
