"""KeysAuthorizerFunction: the streaming REST API's Lambda REQUEST authorizer for tierserve API keys.

Why: the OpenAI routes are on a REST API (HTTP APIs cannot stream), and LLM clients send their ``api_key`` as
``Authorization: Bearer <token>``. With ``ApiAuth=keys`` this function checks that token against the keys
table (``tierserve.keys``: one consistent ``GetItem``, the only permission it has) and answers API Gateway:

* a usable key: an ``Allow`` policy for every method of the API's stage (``.../STAGE/*/*``: API Gateway caches
  the answer per Authorization header for 300 s, ``authorizerResultTtlInSeconds``, and reuses it on every route), with
  the context ``{"caller", "key_id"}`` that reaches the router as ``requestContext.authorizer`` (usage and
  budgets per caller, issue 18);
* no header, a header that is not ``Bearer <token>``, a token that is not a tierserve key (a JWT is checked by
  the Cognito authorizer of ``ApiAuth=jwt``, never here), an unknown, revoked or expired key: the exception
  ``Unauthorized``, which API Gateway turns into 401 ``{"message": "Unauthorized"}`` (the ``openai`` SDK's
  ``AuthenticationError``);
* a request whose ``methodArn`` is not an execute-api method ARN: an explicit ``Deny`` (403), never a policy
  for a resource it cannot name;
* any other failure (DynamoDB unreachable, no ``KEYS_TABLE``) raises, and API Gateway answers 500: it fails
  closed.

The secret is never logged; the key id and the caller are.
"""

from __future__ import annotations

import os
import re
from typing import Any

from aws_lambda_powertools import Logger

from tierserve import keys

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "tierserve"))

#: arn:PARTITION:execute-api:REGION:ACCOUNT:API_ID/STAGE/METHOD/RESOURCE...
_METHOD_ARN = re.compile(r"(?P<api>arn:[a-z-]+:execute-api:[a-z0-9-]+:\d{12}:[A-Za-z0-9]+)/(?P<stage>[^/]+)/.+")
_store: keys.KeyStore | None = None


class Unauthorized(Exception):
    """Raised with the message "Unauthorized": API Gateway's 401 for a Lambda authorizer."""

    def __init__(self) -> None:
        super().__init__("Unauthorized")


def store() -> keys.KeyStore:
    """The keys table of ``KEYS_TABLE``, made once per execution environment."""
    global _store
    table = os.environ.get("KEYS_TABLE", "")
    if _store is None or _store.table != table:
        _store = keys.KeyStore(table)
    return _store


def api_resource(method_arn: str) -> str | None:
    """Every method of the stage that ``method_arn`` is in (what an answer cached per token must cover)."""
    m = _METHOD_ARN.fullmatch(method_arn or "")
    return None if m is None else f"{m['api']}/{m['stage']}/*/*"


def policy(principal: str, effect: str, resource: str, context: dict[str, str] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "principalId": principal,
        "policyDocument": {"Version": "2012-10-17",
                           "Statement": [{"Action": "execute-api:Invoke", "Effect": effect, "Resource": resource}]},
    }
    if context:
        answer["context"] = context
    return answer


def authorize(event: dict[str, Any], key_store: keys.KeyStore | None = None) -> dict[str, Any]:
    """The authorizer's answer for a REQUEST event; raises Unauthorized for a 401. The table (default: ``store()``)
    is read only for a well-formed key."""
    try:
        token = keys.bearer_token(keys.header(event.get("headers"), "Authorization"))
    except keys.MalformedKeyError as exc:
        logger.info("refused", extra={"reason": exc.message})
        raise Unauthorized() from None
    if not keys.is_key(token):
        logger.info("refused", extra={"reason": "the bearer token is not a tierserve API key"})
        raise Unauthorized()
    resource = api_resource(str(event.get("methodArn", "")))
    if resource is None:
        logger.warning("denied", extra={"reason": "methodArn is not an execute-api ARN",
                                        "method_arn": event.get("methodArn")})
        return policy("unknown", "Deny", str(event.get("methodArn") or "*"))
    key = (key_store or store()).lookup(token)
    if key is None:
        logger.info("refused", extra={"reason": "unknown, revoked or expired key", "key_id": keys.key_id_of(token)})
        raise Unauthorized()
    logger.info("allowed", extra={"key_id": key.key_id, "caller": key.caller})
    return policy(key.caller, "Allow", resource, {"caller": key.caller, "key_id": key.key_id})


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return authorize(event)
