"""tierserve API keys: the bearer tokens that the ``openai`` SDK sends as ``api_key`` to the streaming REST API.

Why: the OpenAI routes are served by a REST API (the one API Gateway kind that streams), and every LLM client
authenticates with ``Authorization: Bearer <api_key>``: it cannot sign SigV4 requests. A tierserve API key is
that token. This module makes, finds, revokes and lists keys in a DynamoDB table (``KEYS_TABLE``); the
REQUEST authorizer (``tierserve.handlers.authorizer``) looks a key up on every uncached request, and
``tierserve keys`` (``tierserve_tools.keys_cli``) manages them.

How a key is kept:

* the secret is ``ts-`` + base64url(32 random bytes) (256 bits from ``secrets``), shown once, at creation;
* the table holds its SHA-256, never the secret. A fast hash is enough: with 256 bits of entropy nobody can
  guess a secret from its hash, which is what a slow password hash (bcrypt, scrypt) protects against for
  low-entropy passwords; it would only add latency to every authorization;
* the item's key is the key id: the first 16 hex digits of that hash. The authorizer derives it from the
  token it is given and reads one item (``GetItem``, its only permission), then compares the whole hash in
  constant time; revoking by id needs no index and no scan. A key id says nothing usable about the secret;
* each key maps to a caller (who pays, whose budget; issue 18): the authorizer passes ``caller`` and
  ``key_id`` to the router in its context (``caller_of`` reads them back, or a JWT's subject);
* revoking keeps the item with ``revoked_at`` (the record of who had access stays); a revoked or expired key
  is refused as an unknown one is (401). An optional expiry also sets the table's TTL attribute
  (``expires_at``), so DynamoDB deletes the item some time after it expires; the authorizer checks the time
  itself, as TTL deletion can lag by days.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tierserve import errors

#: Every secret starts with it, so that a leaked key is recognisable (secret scanners, logs).
PREFIX = "ts-"
#: Random bytes in a secret: 256 bits.
SECRET_BYTES = 32
#: Hex digits of the SHA-256 that make the key id (64 bits: collisions are refused at creation).
KEY_ID_HEX = 16
#: A well-formed secret: the prefix and unpadded base64url of SECRET_BYTES bytes (43 characters).
SECRET_RE = re.compile(r"ts-[A-Za-z0-9_-]{43}")
KEY_ID_RE = re.compile(rf"[0-9a-f]{{{KEY_ID_HEX}}}")
#: A caller's name: what usage and budgets are kept under (issue 18).
CALLER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:+-]{0,127}")


class KeyNotFoundError(errors.TierserveError):
    """No key with that id in the table."""

    code = "key_not_found"


class MalformedKeyError(errors.InvalidRequestError):
    """An Authorization header, key or key id that is not in tierserve's form."""

    code = "malformed_key"


@dataclass(frozen=True)
class ApiKey:
    """A key's record, as listed: never its secret nor its hash."""

    key_id: str
    caller: str
    created_at: str
    revoked_at: str | None = None
    expires_at: int | None = None  # epoch seconds (the table's TTL attribute); None: never

    def usable(self, now: float | None = None) -> bool:
        """Neither revoked nor expired."""
        clock = time.time() if now is None else now
        return self.revoked_at is None and (self.expires_at is None or clock < self.expires_at)

    def state(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "active" if self.usable(now) else "expired"

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        return {"key_id": self.key_id, "caller": self.caller, "created_at": self.created_at,
                "revoked_at": self.revoked_at, "expires_at": self.expires_at, "state": self.state(now)}


def new_secret() -> str:
    """A fresh secret: ``ts-`` + base64url of 32 random bytes, without padding."""
    return PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()


def hash_secret(secret: str) -> str:
    """The SHA-256 of a secret, hex: what the table keeps."""
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id_of(secret: str) -> str:
    """A secret's key id (the table's partition key): the first 16 hex digits of its hash."""
    return hash_secret(secret)[:KEY_ID_HEX]


def is_key(token: str) -> bool:
    """Whether a token has the form of a tierserve key (a JWT, say, has not)."""
    return SECRET_RE.fullmatch(token) is not None


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case, as RFC 6750 allows);
    MalformedKeyError when the header is missing or is not a bearer token."""
    if not header:
        raise MalformedKeyError("no Authorization header: send 'Authorization: Bearer <API key>'")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise MalformedKeyError("the Authorization header is not 'Bearer <token>'")
    return token


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header's value, whatever the case of its name (REST API events keep the client's case)."""
    lower = name.lower()
    for key, value in (headers or {}).items():
        if key.lower() == lower:
            return value
    return None


def caller_of(event: Mapping[str, Any]) -> str | None:
    """Who made an API Gateway request, from its authorizer's context: the key's caller (``keys`` auth), else a
    JWT's ``sub`` (Cognito's claims on a REST API; a JWT authorizer's on an HTTP API); None when neither."""
    authorizer = (event.get("requestContext") or {}).get("authorizer") or {}
    if authorizer.get("caller"):
        return str(authorizer["caller"])
    claims = authorizer.get("claims") or (authorizer.get("jwt") or {}).get("claims") or {}
    sub = claims.get("sub")
    return str(sub) if sub else None


def _now_iso(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _record(item: Mapping[str, Any]) -> ApiKey:
    def s(name: str) -> str | None:
        value = item.get(name)
        return None if value is None else str(value.get("S") or value.get("N"))

    expires = s("expires_at")
    return ApiKey(key_id=str(s("id")), caller=str(s("caller")), created_at=str(s("created_at")),
                  revoked_at=s("revoked_at"), expires_at=int(expires) if expires else None)


class KeyStore:
    """The keys table: ``id`` (the key id, partition key), ``hash``, ``caller``, ``created_at``, and optional
    ``revoked_at`` and ``expires_at`` (the TTL attribute). ``client`` is a boto3 DynamoDB client (default: the
    process's, ``tierserve.aws``)."""

    def __init__(self, table: str, client: Any = None) -> None:
        if not table:
            raise errors.ConfigurationError("no keys table: set KEYS_TABLE (the stack's KeysTableName output)")
        self.table = table
        if client is None:
            from tierserve import aws

            client = aws.client("dynamodb")
        self._client = client

    def create(self, caller: str, expires_in_s: float | None = None, now: float | None = None) -> tuple[str, ApiKey]:
        """A new key for ``caller``: (its secret, shown only now; its record)."""
        if not CALLER_RE.fullmatch(caller or ""):
            raise MalformedKeyError(f"caller {caller!r} is not a name: use 1-128 letters, digits and _.@:+- "
                                    "(starting with a letter or digit)")
        if expires_in_s is not None and expires_in_s <= 0:
            raise MalformedKeyError(f"expires_in_s must be positive, not {expires_in_s}")
        clock = time.time() if now is None else now
        secret = new_secret()
        digest = hash_secret(secret)
        key = ApiKey(key_id=digest[:KEY_ID_HEX], caller=caller, created_at=_now_iso(clock),
                     expires_at=None if expires_in_s is None else int(clock + expires_in_s))
        item: dict[str, Any] = {"id": {"S": key.key_id}, "hash": {"S": digest}, "caller": {"S": caller},
                                "created_at": {"S": key.created_at}}
        if key.expires_at is not None:
            item["expires_at"] = {"N": str(key.expires_at)}
        try:
            self._client.put_item(TableName=self.table, Item=item, ConditionExpression="attribute_not_exists(id)")
        except self._client.exceptions.ConditionalCheckFailedException:  # a 64-bit id collision
            raise errors.ConflictError(f"key id {key.key_id} exists already; create the key again") from None
        return secret, key

    def lookup(self, secret: str, now: float | None = None) -> ApiKey | None:
        """The usable key whose secret this is; None when it is malformed, unknown, revoked or expired."""
        if not is_key(secret):
            return None
        digest = hash_secret(secret)
        item = self._client.get_item(TableName=self.table, Key={"id": {"S": digest[:KEY_ID_HEX]}},
                                     ConsistentRead=True).get("Item")
        if item is None or not hmac.compare_digest(str(item.get("hash", {}).get("S", "")), digest):
            return None
        key = _record(item)
        return key if key.usable(now) else None

    def get(self, key_id: str) -> ApiKey:
        self._check_id(key_id)
        item = self._client.get_item(TableName=self.table, Key={"id": {"S": key_id}}, ConsistentRead=True).get("Item")
        if item is None:
            raise KeyNotFoundError(f"no key {key_id} in {self.table} (`tierserve keys list` shows them)")
        return _record(item)

    def revoke(self, key_id: str, now: float | None = None) -> ApiKey:
        """Revoke a key (it is refused from now on, once the authorizer's cache of it expires); revoking a
        revoked key changes nothing."""
        self._check_id(key_id)
        stamp = _now_iso(time.time() if now is None else now)
        try:
            out = self._client.update_item(
                TableName=self.table, Key={"id": {"S": key_id}},
                UpdateExpression="SET revoked_at = if_not_exists(revoked_at, :now)",
                ConditionExpression="attribute_exists(id)", ExpressionAttributeValues={":now": {"S": stamp}},
                ReturnValues="ALL_NEW")
        except self._client.exceptions.ConditionalCheckFailedException:
            raise KeyNotFoundError(f"no key {key_id} in {self.table} (`tierserve keys list` shows them)") from None
        return _record(out["Attributes"])

    def list(self) -> list[ApiKey]:
        """Every key, oldest first (a scan: an operator's command, never on a request's path)."""
        keys: list[ApiKey] = []
        for page in self._client.get_paginator("scan").paginate(
                TableName=self.table, ConsistentRead=True,
                ProjectionExpression="id, caller, created_at, revoked_at, expires_at"):
            keys.extend(_record(item) for item in page.get("Items", []))
        return sorted(keys, key=lambda k: (k.created_at, k.key_id))

    @staticmethod
    def _check_id(key_id: str) -> None:
        if not KEY_ID_RE.fullmatch(key_id or ""):
            raise MalformedKeyError(f"{key_id!r} is not a key id: 16 hex digits, as `tierserve keys list` shows")
