"""Bearer-key authorization for the local API Gateway, as the streaming REST API's authorizer does it.

Why: with ``ApiAuth=keys`` the deployed API refuses (401) a request whose ``Authorization: Bearer <key>`` is
missing, malformed, unknown, revoked or expired (``tierserve.handlers.authorizer``). ``keys_authorizer`` is the
same check for ``ApiGatewayServer`` (the model is :mod:`tierserve_tools.sigv4`'s ``iam_authorizer``): the same
``tierserve.keys`` lookup against a keys table on the local stack's moto_server, and API Gateway's 401 in the
OpenAI error shape the template's gateway response gives, with ``WWW-Authenticate: Bearer``. ``tierserve serve
--auth keys`` is the intended user (it creates the table with ``keys_cli.create_table`` and names it
``KEYS_TABLE`` in its env.json, so that ``tierserve keys --stack`` manages the same keys).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from tierserve import keys
from tierserve_tools.sigv4 import Authorizer

#: The template's UNAUTHORIZED gateway response (StreamingApi), as the openai SDK reads it.
UNAUTHORIZED = {"error": {"message": "Missing, malformed, unknown, revoked or expired API key or token: send "
                                     "Authorization: Bearer <API key>.",
                          "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}


def keys_authorizer(store: keys.KeyStore) -> Authorizer:
    """An authorizer for ``ApiGatewayServer``: None for a usable key, else the deployed API's 401 answer."""

    def authorize(method: str, target: str, headers: Mapping[str, str], body: bytes
                  ) -> tuple[int, dict[str, str], bytes] | None:
        try:
            token = keys.bearer_token(keys.header(headers, "Authorization"))
        except keys.MalformedKeyError:
            token = ""
        if token and store.lookup(token) is not None:
            return None
        return 401, {"content-type": "application/json", "www-authenticate": "Bearer",
                     "x-amzn-errortype": "UnauthorizedException"}, json.dumps(UNAUTHORIZED).encode()

    return authorize
