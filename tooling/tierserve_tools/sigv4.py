"""SigV4 verification for the local API Gateway, as an HTTP API with IAM authorization does it.

Why: in AWS the API refuses (403) a request that is unsigned or whose signature does not match;
locally nothing did, so a client that signs wrongly passed every local test and failed only once
deployed. The emulator knows the local test credentials, so it recomputes the signature the way
AWS documents it (canonical request -> string to sign -> HMAC chain from the secret), independently
of botocore, which signs, so that a client bug cannot be mirrored by the check.

What it refuses, with API Gateway's status and messages:

* no ``Authorization`` header: 403 ``Forbidden``;
* a header that is not ``AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...``, or
  one that does not sign ``host``: 403 with the reason;
* an access key it does not know: 403 "The security token included in the request is invalid.";
* a scope for another service or region, or a date other than ``X-Amz-Date``'s: 403;
* ``X-Amz-Date`` more than 5 minutes away from now: 403 "Signature expired";
* a signature that differs: 403 "The request signature we calculated does not match ...".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, unquote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "execute-api"
#: How far X-Amz-Date may be from the server's clock (AWS: 5 minutes).
MAX_SKEW_S = 300
MISMATCH = ("The request signature we calculated does not match the signature you provided. Check your AWS "
            "Secret Access Key and signing method. Consult the service documentation for details.")
INVALID_TOKEN = "The security token included in the request is invalid."  # noqa: S105 - a message
_AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+)\s*,\s*SignedHeaders=(?P<signed>[^,\s]+)\s*,"
    r"\s*Signature=(?P<signature>[0-9a-f]{64})\s*")

#: (method, target, headers, body) -> None when allowed, else (status, headers, body) to answer.
Authorizer = Callable[[str, str, Mapping[str, str], bytes], "tuple[int, dict[str, str], bytes] | None"]


class SignatureError(Exception):
    """Why a request's signature is refused (the message API Gateway would send)."""


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    return _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode(), date), region), service), "aws4_request")


def canonical_request(method: str, target: str, headers: Mapping[str, str], signed: list[str], body: bytes) -> str:
    """The canonical request of the SigV4 specification for an HTTP API request (no S3 rules)."""
    parts = urlsplit(target)
    # Each segment URI-encoded (the path arrives encoded once; normalise it first), '/' kept.
    path = quote(unquote(parts.path or "/"), safe="/~")
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                     for k, v in sorted(parse_qsl(parts.query, keep_blank_values=True)))
    lower = {k.lower(): v for k, v in headers.items()}
    canonical_headers = "".join(f"{name}:{' '.join(lower.get(name, '').split())}\n" for name in signed)
    payload = lower.get("x-amz-content-sha256") or hashlib.sha256(body).hexdigest()
    return "\n".join([method.upper(), path, query, canonical_headers, ";".join(signed), payload])


def verify(method: str, target: str, headers: Mapping[str, str], body: bytes, secrets: Mapping[str, str],
           region: str, now: float | None = None) -> str:
    """Check a request's SigV4 signature; return the access key id, or raise SignatureError saying why."""
    lower = {k.lower(): v for k, v in headers.items()}
    auth = lower.get("authorization")
    if not auth:
        raise SignatureError("Forbidden")
    m = _AUTH_RE.fullmatch(auth.strip())
    if m is None:
        raise SignatureError(f"Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
                             f"with {ALGORITHM}; got {auth.split(' ', 1)[0]!r}")
    key_id, _, scope = m["credential"].partition("/")
    scope_parts = scope.split("/")
    if len(scope_parts) != 4 or scope_parts[3] != "aws4_request":
        raise SignatureError(f"Credential should be scoped to a valid date/region/service/aws4_request, not {scope!r}")
    date, scope_region, service, _ = scope_parts
    if key_id not in secrets:
        raise SignatureError(INVALID_TOKEN)
    if service != SERVICE or scope_region != region:
        raise SignatureError(f"Credential should be scoped to correct service and region: '{SERVICE}' in "
                             f"'{region}', not '{service}' in '{scope_region}'")
    amz_date = lower.get("x-amz-date", "")
    try:
        signed_at = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise SignatureError("Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header "
                             "in the form YYYYMMDDTHHMMSSZ") from None
    if not amz_date.startswith(date):
        raise SignatureError(f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
                             f"from HTTP: '{date}' != '{amz_date[:8]}'")
    clock = time.time() if now is None else now
    if abs(clock - signed_at) > MAX_SKEW_S:
        raise SignatureError(f"Signature expired: {amz_date} is now earlier than "
                             f"{datetime.fromtimestamp(clock - MAX_SKEW_S, UTC).strftime('%Y%m%dT%H%M%SZ')} "
                             f"({datetime.fromtimestamp(clock, UTC).strftime('%Y%m%dT%H%M%SZ')} - 5 min.)")
    signed = m["signed"].split(";")
    if "host" not in signed:
        raise SignatureError("'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
    creq = canonical_request(method, target, lower, signed, body)
    scope_text = f"{date}/{region}/{SERVICE}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope_text, hashlib.sha256(creq.encode()).hexdigest()])
    expected = hmac.new(signing_key(secrets[key_id], date, region, SERVICE), to_sign.encode(),
                        hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, m["signature"]):
        raise SignatureError(MISMATCH)
    return key_id


def iam_authorizer(secrets: Mapping[str, str], region: str = "us-east-1") -> Authorizer:
    """An authorizer for ``ApiGatewayServer``: None for a valid signature, else API Gateway's 403 answer."""

    def authorize(method: str, target: str, headers: Mapping[str, str], body: bytes
                  ) -> tuple[int, dict[str, str], bytes] | None:
        try:
            verify(method, target, headers, body, secrets, region)
        except SignatureError as exc:
            return 403, {"content-type": "application/json", "x-amzn-errortype": "ForbiddenException"}, \
                json.dumps({"message": str(exc)}).encode()
        return None

    return authorize
