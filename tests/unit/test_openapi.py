"""openapi.yaml describes exactly the routes RouterFunction serves (api.ENDPOINTS), loads as an OpenAPI 3
schema, and states the limits tierserve.limits derives (issue 8: the suite's contract)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tierserve import limits
from tierserve.api import ENDPOINTS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {"name": "m", "version": "1"}


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load((ROOT / "openapi.yaml").read_text())


def _documented(spec: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items() for method in item
            if method in ("get", "post", "put", "delete", "patch", "head", "options")}


def test_every_endpoint_is_documented_and_every_documented_route_is_served(spec: dict) -> None:
    documented = _documented(spec)
    concrete = {(m, re.sub(r"\{(\w+)\}", lambda g: EXAMPLES[g.group(1)], p)): (m, p) for m, p in documented}
    # Every documented route reaches the operation the spec names it for...
    for (method, path), route in concrete.items():
        assert any(m == method and pattern.fullmatch(path) for m, pattern, _ in ENDPOINTS), route
    # ...and every endpoint (with and without a version) has a documented route
    for method, pattern, op in ENDPOINTS:
        assert any(m == method and pattern.fullmatch(p) for m, p in concrete), f"{method} {pattern.pattern} ({op})"


def test_the_schema_loads_as_openapi_and_keeps_kserves_tensor_data(spec: dict) -> None:
    import schemathesis

    schema = schemathesis.openapi.from_dict(spec)
    assert len(list(schema.get_all_operations())) == len(_documented(spec))
    data = spec["components"]["schemas"]["tensor_data"]["items"]["anyOf"]
    assert {"type": "string"} in data and {"type": "number"} in data  # "NaN" strings are valid tensor data


def test_the_documented_limits_are_the_derived_ones(spec: dict) -> None:
    documented = spec["info"]["x-tierserve-limits"]
    assert documented == {
        "request_body_bytes": limits.MAX_REQUEST_BODY_BYTES, "response_bytes": limits.LAMBDA_RESPONSE_BYTES,
        "api_gateway_payload_bytes": limits.APIGW_PAYLOAD_BYTES,
        "api_gateway_timeout_s": int(limits.APIGW_INTEGRATION_TIMEOUT_S),
        "request_line_and_headers_bytes": limits.APIGW_REQUEST_LINE_AND_HEADERS_BYTES,
    }
