"""The local Cognito authorizer (tierserve_tools.jwt_auth): what API Gateway's COGNITO_USER_POOLS authorizer allows
and refuses, with tokens signed here by an RSA key whose public half is the pool's JWKS."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tierserve_tools.jwt_auth import InvalidToken, cognito_authorizer, verify_id_token

ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_pool"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict:
    numbers = key.public_key().public_numbers()
    return {"kty": "RSA", "alg": "RS256", "kid": kid, "e": b64(numbers.e.to_bytes(3, "big")),
            "n": b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))}


KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: rsa.RSAPrivateKey = KEY, kid: str = "k1", alg: str = "RS256", **claims: object) -> str:
    body = {"iss": ISSUER, "sub": "user-1", "aud": "client", "token_use": "id", "exp": time.time() + 600,
            "cognito:username": "alice", **claims}
    signing = f"{b64(json.dumps({'alg': alg, 'kid': kid}).encode())}.{b64(json.dumps(body).encode())}"
    return f"{signing}.{b64(key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def jwks(*keys: dict) -> object:
    return lambda refresh: {"keys": list(keys)}


def test_a_valid_id_token_gives_its_claims() -> None:
    claims = verify_id_token(token(), ISSUER, jwks(jwk(KEY, "k1")))
    assert claims["sub"] == "user-1" and claims["cognito:username"] == "alice"


@pytest.mark.parametrize(("make", "why"), [
    (lambda: token(OTHER), "signature"),                                 # signed by another key
    (lambda: token(kid="k9"), "kid"),                                    # a key the pool does not have
    (lambda: token(iss="https://cognito-idp.us-east-1.amazonaws.com/other"), "iss"),
    (lambda: token(token_use="access"), "token_use"),                    # an access token
    (lambda: token(exp=time.time() - 1), "expired"),
    (lambda: token(exp=None), "expired"),
    (lambda: "a.b", "compact"),
    (lambda: "!!.!!.!!", "base64url"),
])
def test_what_the_authorizer_refuses(make, why) -> None:
    with pytest.raises(InvalidToken, match=why):
        verify_id_token(make(), ISSUER, jwks(jwk(KEY, "k1")))


def test_alg_none_and_an_hmac_signed_with_the_public_key_are_refused() -> None:
    good = token()
    head, body, _ = good.split(".")
    none = f"{b64(json.dumps({'alg': 'none', 'kid': 'k1'}).encode())}.{body}."
    with pytest.raises(InvalidToken, match="alg"):
        verify_id_token(none, ISSUER, jwks(jwk(KEY, "k1")))
    signing = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'k1'}).encode())}.{body}"
    mac = hmac.HMAC(json.dumps(jwk(KEY, "k1")).encode(), hashes.SHA256())
    mac.update(signing.encode())
    with pytest.raises(InvalidToken, match="alg"):
        verify_id_token(f"{signing}.{b64(mac.finalize())}", ISSUER, jwks(jwk(KEY, "k1")))
    # a body changed after signing
    forged = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    forged["sub"] = "admin"
    with pytest.raises(InvalidToken, match="signature"):
        verify_id_token(f"{head}.{b64(json.dumps(forged).encode())}.{good.split('.')[2]}", ISSUER,
                        jwks(jwk(KEY, "k1")))


def test_an_unknown_kid_reads_the_key_set_again_once() -> None:
    reads = []

    def rotating(refresh: bool) -> dict:
        reads.append(refresh)
        return {"keys": [jwk(KEY, "k1")] + ([jwk(OTHER, "k2")] if refresh else [])}

    assert verify_id_token(token(OTHER, kid="k2"), ISSUER, rotating)["sub"] == "user-1"
    assert reads == [False, True]


def test_the_authorizer_allows_with_or_without_bearer_and_refuses_with_the_apis_401(tmp_path: Path) -> None:
    keyset = tmp_path / "jwks.json"
    keyset.write_text(json.dumps({"keys": [jwk(KEY, "k1")]}))
    authorize = cognito_authorizer(ISSUER, keyset.as_uri())
    for value in (f"Bearer {token()}", token()):
        context = authorize("POST", "/v1/completions", {"Authorization": value}, b"")
        assert isinstance(context, dict) and context["claims"]["sub"] == "user-1"
        assert all(isinstance(v, str) for v in context["claims"].values())  # API Gateway passes strings
    for headers in ({}, {"authorization": "Bearer ts-notajwt"}, {"authorization": f"Bearer {token(OTHER)}"}):
        status, head, body = authorize("POST", "/v1/completions", headers, b"")
        assert status == 401 and head["www-authenticate"] == "Bearer"
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
