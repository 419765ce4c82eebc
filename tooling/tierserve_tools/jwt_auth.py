"""A Cognito user pool's ID token as the bearer token of the local streaming REST API, checked as API Gateway's
Cognito authorizer checks it.

Why: with ``ApiAuth=jwt`` the deployed REST API carries a ``COGNITO_USER_POOLS`` authorizer on the pool that
``JwtIssuer`` names (template.yaml, docs/deploy.md). Without OAuth scopes it takes an ID token in the
``Authorization`` header (with or without ``Bearer ``, which is how the ``openai`` SDK sends its ``api_key``) and
allows it when its RS256 signature verifies against one of the pool's keys (its JWKS), its ``iss`` is the pool,
its ``token_use`` is ``id`` and it has not expired; it does not compare ``aud`` with an app client. The router
then sees the claims, as strings, in ``requestContext.authorizer.claims`` (``sub`` is the caller). ``tierserve
serve --auth jwt`` does the same against a user pool on its moto_server, whose JWKS moto serves at
``/<pool id>/.well-known/jwks.json`` (moto signs its tokens with a key it ships: a local stand-in, never a
secret). The check is ours, with ``cryptography`` (moto's own dependency), so that nothing here trusts a token
it did not verify; ``id_token`` makes a user and signs them in (``ADMIN_USER_PASSWORD_AUTH``) for tests and for
trying the API.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from tierserve_tools.apigw import RestAuthorizer
from tierserve_tools.keys_auth import UNAUTHORIZED

#: The local user pool's name and its app client's (``tierserve serve --auth jwt``).
POOL_NAME = "tierserve-local"
CLIENT_NAME = "tierserve-local-client"


class InvalidToken(Exception):
    """Why a token is refused (never shown to the caller: API Gateway answers a plain 401)."""


def _b64(part: str) -> bytes:
    try:
        return base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidToken("a part is not base64url") from exc


def _json(part: str) -> dict[str, Any]:
    try:
        doc = json.loads(_b64(part))
    except ValueError as exc:
        raise InvalidToken("a part is not JSON") from exc
    if not isinstance(doc, dict):
        raise InvalidToken("a part is not a JSON object")
    return doc


def _public_key(jwk: Mapping[str, Any]) -> Any:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    if jwk.get("kty") != "RSA":
        raise InvalidToken(f"key {jwk.get('kid')!r} is not an RSA key")
    n = int.from_bytes(_b64(str(jwk["n"])), "big")
    e = int.from_bytes(_b64(str(jwk["e"])), "big")
    return RSAPublicNumbers(e, n).public_key()


def verify_id_token(token: str, issuer: str, jwks: Callable[[bool], Mapping[str, Any]],
                    now: float | None = None) -> dict[str, Any]:
    """The claims of a valid ID token of the pool ``issuer``; else :class:`InvalidToken`. ``jwks(refresh)`` gives
    the pool's key set (``refresh`` after an unknown ``kid``: the pool rotated its keys)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("not a JWS in compact form")
    header, claims = _json(parts[0]), _json(parts[1])
    if header.get("alg") != "RS256":  # Cognito signs with RS256; "none" and HMAC are never accepted
        raise InvalidToken(f"alg {header.get('alg')!r} is not RS256")
    kid = header.get("kid")
    for refresh in (False, True):
        keys = {k.get("kid"): k for k in jwks(refresh).get("keys") or [] if isinstance(k, Mapping)}
        if kid in keys:
            break
    else:
        raise InvalidToken(f"kid {kid!r} is not one of the pool's keys")
    try:
        _public_key(keys[kid]).verify(_b64(parts[2]), f"{parts[0]}.{parts[1]}".encode("ascii"),
                                      padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, UnicodeEncodeError) as exc:
        raise InvalidToken("the signature does not verify") from exc
    now = time.time() if now is None else now
    if claims.get("iss") != issuer:
        raise InvalidToken(f"iss {claims.get('iss')!r} is not {issuer!r}")
    if claims.get("token_use") != "id":
        raise InvalidToken(f"token_use {claims.get('token_use')!r}: the authorizer takes ID tokens")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp <= now:
        raise InvalidToken("expired, or no exp")
    return claims


def bearer(value: str) -> str:
    """The token of an ``Authorization`` header, with or without its ``Bearer`` scheme."""
    value = value.strip()
    return value[7:].strip() if value[:7].lower() == "bearer " else value


def cognito_authorizer(issuer: str, jwks_url: str) -> RestAuthorizer:
    """An authorizer for ``ApiGatewayServer``'s streaming REST API: the context ``{"claims": {...}}`` (each claim a
    string, as API Gateway passes them) for a valid ID token of ``issuer``'s pool, else the deployed API's 401."""
    import urllib.request

    lock = threading.Lock()
    cached: list[Mapping[str, Any]] = []

    def jwks(refresh: bool) -> Mapping[str, Any]:
        with lock:
            if refresh or not cached:
                with urllib.request.urlopen(jwks_url, timeout=10) as resp:  # noqa: S310 - the stack's moto_server
                    cached[:] = [json.loads(resp.read())]
            return cached[0]

    def authorize(method: str, target: str, headers: dict[str, str], body: bytes) -> Any:
        value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        try:
            claims = verify_id_token(bearer(value), issuer, jwks)
        except InvalidToken:
            return 401, {"content-type": "application/json", "www-authenticate": "Bearer",
                         "x-amzn-errortype": "UnauthorizedException"}, json.dumps(UNAUTHORIZED).encode()
        return {"claims": {k: v if isinstance(v, str) else json.dumps(v) for k, v in claims.items()},
                "principalId": str(claims.get("sub") or "")}

    return authorize


def create_user_pool(cognito: Any) -> tuple[str, str, str]:
    """A user pool with one app client that allows ``ADMIN_USER_PASSWORD_AUTH``: (pool id, client id, issuer)."""
    pool = cognito.create_user_pool(PoolName=POOL_NAME)["UserPool"]["Id"]
    client = cognito.create_user_pool_client(
        UserPoolId=pool, ClientName=CLIENT_NAME,
        ExplicitAuthFlows=["ALLOW_ADMIN_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"])["UserPoolClient"]["ClientId"]
    region = cognito.meta.region_name
    return pool, client, f"https://cognito-idp.{region}.amazonaws.com/{pool}"


def id_token(cognito: Any, pool: str, client: str, username: str) -> str:
    """Create ``username`` in the pool (if new), give it a fresh random password, sign it in, and return its ID
    token."""
    password = f"{secrets.token_urlsafe(18)}aA1!"
    with contextlib.suppress(cognito.exceptions.UsernameExistsException):
        cognito.admin_create_user(UserPoolId=pool, Username=username, MessageAction="SUPPRESS")
    cognito.admin_set_user_password(UserPoolId=pool, Username=username, Password=password, Permanent=True)
    auth = cognito.admin_initiate_auth(UserPoolId=pool, ClientId=client, AuthFlow="ADMIN_USER_PASSWORD_AUTH",
                                       AuthParameters={"USERNAME": username, "PASSWORD": password})
    return str(auth["AuthenticationResult"]["IdToken"])
