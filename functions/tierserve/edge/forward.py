"""Forwarding to the cloud gateway: the client's body, untouched, signed by this device.

The edge already read the request's header (to route it and to check it against the manifest, so a
malformed request gets its 400 without a round trip); the body itself goes to the cloud as it came,
never decoded, on a pooled keep-alive connection (``tierserve.client``), signed with the device's own
identity (SigV4 from its credential chain, e.g. Greengrass's Token Exchange Service, or a JWT). The
client's own ``Authorization`` header is never passed on. The version is pinned, as the router pins it
for the CPU function: the device's canary pick stands.

Every HTTP answer of the cloud comes back as it is (status, body, ``Retry-After``), with the tier that
served it (``x-served-by: cpu|gpu``). Two answers are the link's failure, not the request's: none at
all (unreachable, timeout: BackendUnavailableError / BackendTimeoutError, counted by the breaker), and
401/403, which means the gateway refused the device's credentials.
"""

from __future__ import annotations

import base64
from typing import Any

from tierserve import errors
from tierserve.client import ApiError, Client
from tierserve.manifest import ModelVersion
from tierserve.protocol import header as wire
from tierserve.protocol.calls import InferenceCall, Reply
from tierserve.tiers import Tier

#: Headers of the cloud's answer a client needs; the rest (connection, date, apigw ids) stay behind.
PASSED_BACK = ("content-type", "inference-header-content-length", "retry-after", "x-served-by", "x-fallback")


class CloudBackend:
    tier = "cloud"

    def __init__(self, client: Client, ready_timeout_s: float = 2.0) -> None:
        self.client = client
        self.ready_timeout_s = ready_timeout_s

    @property
    def url(self) -> str:
        return self.client.url

    def forward(self, model: ModelVersion, call: InferenceCall, hint: str | None, timeout_s: float
                ) -> tuple[Reply, str]:
        """(the cloud's answer as an HTTP API response, the tier that served it)."""
        body = call.body()
        data = bytes(wire.body_view(body.data))
        headers = {"Content-Type": "application/json" if body.header_length is None else "application/octet-stream"}
        if body.header_length is not None:
            headers["Inference-Header-Content-Length"] = str(body.header_length)
        if hint:
            headers["x-target"] = hint
        path = f"/v2/models/{model.name}/versions/{model.version}/infer"
        resp = self.client.request("POST", path, data, headers, timeout_s)
        if resp.status in (401, 403):
            refusal = ApiError.from_response(resp)
            raise errors.BackendUnavailableError(
                f"the cloud gateway {self.client.url} refused this device's credentials ({refusal.message}); "
                "check --cloud-auth and the device's role or token", retry_after_s=60)
        out_headers = {k: v for k, v in resp.headers.items() if k in PASSED_BACK}
        binary = out_headers.get("content-type", "").startswith("application/octet-stream")
        http: dict[str, Any] = {
            "statusCode": resp.status,
            "headers": out_headers,
            "body": base64.b64encode(resp.body).decode() if binary else resp.body.decode("utf-8", "replace"),
            "isBase64Encoded": binary,
        }
        return Reply(http=http), resp.served_by or Tier.CPU

    def ready(self, model: ModelVersion | None = None) -> bool:
        """The gateway's readiness (the model's, when given), within ``ready_timeout_s``; never raises."""
        path = "/v2/health/ready" if model is None else f"/v2/models/{model.name}/versions/{model.version}/ready"
        try:
            return self.client.request("GET", path, timeout_s=self.ready_timeout_s).status == 200
        except errors.TierserveError:
            return False
