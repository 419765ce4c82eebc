"""KeysAuthorizerFunction (tierserve.handlers.authorizer) against a keys table on moto: a usable key is allowed
on every route of the stage with its caller in the context; a revoked, unknown or expired key, a missing or
malformed header and a JWT are 401 ("Unauthorized"); an unknown methodArn is denied."""

from __future__ import annotations

import pytest

from tierserve import keys
from tierserve.handlers import authorizer

METHOD_ARN = "arn:aws:execute-api:us-east-1:123456789012:a1b2c3d4e5/v1/POST/v1/chat/completions"
JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJ1LTEiLCJhdWQiOiJjbGllbnQifQ."
       "c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl")


def event(authorization: str | None, method_arn: str = METHOD_ARN, name: str = "Authorization") -> dict:
    """A REST API REQUEST authorizer event (the fields the handler reads, as API Gateway sends them)."""
    headers = {"Host": "a1b2c3d4e5.execute-api.us-east-1.amazonaws.com", "Content-Type": "application/json"}
    if authorization is not None:
        headers[name] = authorization
    return {"type": "REQUEST", "methodArn": method_arn, "resource": "/v1/chat/completions",
            "path": "/v1/chat/completions", "httpMethod": "POST", "headers": headers,
            "multiValueHeaders": {k: [v] for k, v in headers.items()}, "queryStringParameters": None,
            "pathParameters": {}, "stageVariables": None,
            "requestContext": {"resourcePath": "/v1/chat/completions", "httpMethod": "POST", "stage": "v1"}}


@pytest.fixture(autouse=True)
def fresh_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authorizer, "_store", None)


def test_a_valid_key_is_allowed_on_every_route_with_its_caller(key_store) -> None:
    secret, key = key_store.create("team-a")
    answer = authorizer.lambda_handler(event(f"Bearer {secret}"), None)
    assert answer["principalId"] == "team-a"
    assert answer["policyDocument"] == {"Version": "2012-10-17", "Statement": [{
        "Action": "execute-api:Invoke", "Effect": "Allow",
        "Resource": "arn:aws:execute-api:us-east-1:123456789012:a1b2c3d4e5/v1/*/*"}]}
    assert answer["context"] == {"caller": "team-a", "key_id": key.key_id}
    # the header's name in any case (REST API events keep the client's), the scheme too
    assert authorizer.lambda_handler(event(f"bearer {secret}", name="authorization"), None)["principalId"] == "team-a"


def test_a_revoked_key_is_unauthorized(key_store) -> None:
    secret, key = key_store.create("team-a")
    assert authorizer.lambda_handler(event(f"Bearer {secret}"), None)["context"]["caller"] == "team-a"
    key_store.revoke(key.key_id)
    with pytest.raises(authorizer.Unauthorized, match=r"^Unauthorized$"):
        authorizer.lambda_handler(event(f"Bearer {secret}"), None)


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Basic dXNlcjpwYXNz", "ts-not-bearer", "Bearer sk-openai-style-key", f"Bearer {JWT}"],
    ids=["missing", "empty", "no-token", "basic", "no-scheme", "not-ours", "jwt"])
def test_missing_malformed_and_jwt_tokens_are_unauthorized(key_store, authorization: str | None) -> None:
    key_store.create("team-a")
    with pytest.raises(authorizer.Unauthorized, match=r"^Unauthorized$"):
        authorizer.lambda_handler(event(authorization), None)


def test_an_unknown_key_is_unauthorized(key_store) -> None:
    from tierserve import keys

    key_store.create("team-a")
    with pytest.raises(authorizer.Unauthorized):
        authorizer.lambda_handler(event(f"Bearer {keys.new_secret()}"), None)


def test_a_method_arn_that_is_not_an_api_method_is_denied(key_store) -> None:
    secret, _ = key_store.create("team-a")
    answer = authorizer.lambda_handler(event(f"Bearer {secret}", method_arn="arn:aws:s3:::bucket/key"), None)
    assert answer["policyDocument"]["Statement"][0]["Effect"] == "Deny" and "context" not in answer


def test_without_a_table_it_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    from tierserve import errors

    monkeypatch.delenv("KEYS_TABLE", raising=False)
    # a key is looked up: with no table that is an error (API Gateway's 500), never an Allow
    with pytest.raises(errors.ConfigurationError):
        authorizer.lambda_handler(event(f"Bearer {keys.new_secret()}"), None)
    # a request without a key is still a 401: the table is read only for a well-formed key
    with pytest.raises(authorizer.Unauthorized):
        authorizer.lambda_handler(event(None), None)
