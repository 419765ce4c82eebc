"""tierserve.keys: a key's secret is shown once and stored hashed; lookup finds usable keys only; revoke and
expiry refuse a key; list never shows a secret; bearer headers parsed as RFC 6750 says."""

from __future__ import annotations

import base64
import json

import pytest

from tests.support.keys_table import TABLE
from tierserve import errors, keys


def test_a_secret_is_ts_and_base64url_of_32_random_bytes() -> None:
    a, b = keys.new_secret(), keys.new_secret()
    assert a != b and a.startswith("ts-") and len(a) == 46 and keys.is_key(a)
    assert len(base64.urlsafe_b64decode(a[3:] + "=")) == 32


def test_the_table_keeps_the_hash_never_the_secret(key_store, dynamodb) -> None:
    secret, key = key_store.create("team-a")
    items = dynamodb.scan(TableName=TABLE)["Items"]
    assert len(items) == 1 and secret not in json.dumps(items)
    item = items[0]
    assert item["hash"]["S"] == keys.hash_secret(secret) and item["id"]["S"] == key.key_id == keys.key_id_of(secret)
    assert item["caller"]["S"] == "team-a" and "expires_at" not in item


def test_lookup_finds_the_key_and_its_caller(key_store) -> None:
    secret, key = key_store.create("team-a")
    found = key_store.lookup(secret)
    assert found == key and found.caller == "team-a" and found.usable()


def test_lookup_refuses_unknown_malformed_and_tampered_secrets(key_store, dynamodb) -> None:
    secret, key = key_store.create("team-a")
    assert key_store.lookup(keys.new_secret()) is None  # well-formed, unknown
    assert key_store.lookup("sk-not-ours") is None and key_store.lookup("") is None
    # A secret whose key id collides with a stored key but whose hash differs is refused (the whole hash counts)
    dynamodb.update_item(TableName=TABLE, Key={"id": {"S": key.key_id}},
                         UpdateExpression="SET #h = :h", ExpressionAttributeNames={"#h": "hash"},
                         ExpressionAttributeValues={":h": {"S": "0" * 64}})
    assert key_store.lookup(secret) is None


def test_a_revoked_key_is_refused_and_kept_on_record(key_store) -> None:
    secret, key = key_store.create("team-a")
    revoked = key_store.revoke(key.key_id, now=1_700_000_000)
    assert revoked.revoked_at == "2023-11-14T22:13:20Z" and revoked.state() == "revoked"
    assert key_store.lookup(secret) is None
    # revoking again keeps the first time
    assert key_store.revoke(key.key_id).revoked_at == "2023-11-14T22:13:20Z"
    assert [k.state() for k in key_store.list()] == ["revoked"]


def test_an_expired_key_is_refused_before_ttl_deletes_it(key_store, dynamodb) -> None:
    secret, key = key_store.create("team-a", expires_in_s=60, now=1000.0)
    assert key.expires_at == 1060
    item = dynamodb.get_item(TableName=TABLE, Key={"id": {"S": key.key_id}})["Item"]
    assert item["expires_at"] == {"N": "1060"}  # the table's TTL attribute
    assert key_store.lookup(secret, now=1059.0) is not None
    assert key_store.lookup(secret, now=1060.0) is None


def test_list_shows_every_key_without_secret_or_hash(key_store) -> None:
    a, ka = key_store.create("team-a", now=1000.0)
    b, kb = key_store.create("team-b", now=2000.0)
    listed = key_store.list()
    assert [k.key_id for k in listed] == [ka.key_id, kb.key_id]
    text = json.dumps([k.to_json() for k in listed])
    assert a not in text and b not in text and keys.hash_secret(a) not in text
    assert set(listed[0].to_json()) == {"key_id", "caller", "created_at", "revoked_at", "expires_at", "state"}


def test_bad_input_says_what_is_wrong(key_store) -> None:
    with pytest.raises(keys.MalformedKeyError, match="is not a name"):
        key_store.create("")
    with pytest.raises(keys.MalformedKeyError, match="must be positive"):
        key_store.create("a", expires_in_s=0)
    with pytest.raises(keys.MalformedKeyError, match="16 hex digits"):
        key_store.revoke("nope")
    with pytest.raises(keys.KeyNotFoundError, match="no key 0123456789abcdef"):
        key_store.revoke("0123456789abcdef")
    with pytest.raises(errors.ConfigurationError, match="KEYS_TABLE"):
        keys.KeyStore("")


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer ts-abc", "ts-abc"), ("bearer  ts-abc ", "ts-abc"), ("BEARER eyJ.a.b", "eyJ.a.b")])
def test_bearer_tokens(header: str, token: str) -> None:
    assert keys.bearer_token(header) == token


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "ts-abc", "Bearer a b"])
def test_not_a_bearer_token(header: str | None) -> None:
    with pytest.raises(keys.MalformedKeyError):
        keys.bearer_token(header)


def test_the_caller_of_a_request_from_either_authorizer() -> None:
    assert keys.caller_of({"requestContext": {"authorizer": {"caller": "team-a", "key_id": "x"}}}) == "team-a"
    cognito = {"requestContext": {"authorizer": {"claims": {"sub": "u-1", "aud": "client"}}}}
    assert keys.caller_of(cognito) == "u-1"
    http_jwt = {"requestContext": {"authorizer": {"jwt": {"claims": {"sub": "u-2"}, "scopes": None}}}}
    assert keys.caller_of(http_jwt) == "u-2"
    assert keys.caller_of({"requestContext": {}}) is None and keys.caller_of({}) is None
