"""template.yaml: the HTTP API's authorization (IAM by default, a JWT authorizer as the alternative)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tierserve.local.sam import load_template

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def template() -> dict:
    return load_template(ROOT / "template.yaml")


def test_the_api_is_iam_authorized_by_default(template: dict) -> None:
    auth = template["Resources"]["InferenceApi"]["Properties"]["Auth"]
    assert auth == {"EnableIamAuthorizer": True, "DefaultAuthorizer": "AWS_IAM"}
    assert template["Parameters"]["JwtIssuer"]["Default"] == ""


def test_a_jwt_issuer_adds_the_same_routes_behind_a_jwt_authorizer(template: dict) -> None:
    resources = template["Resources"]
    jwt = {k: v for k, v in resources.items() if k.startswith("InferenceJwt")}
    # Every JWT resource exists only when an issuer is given
    assert jwt and all(v.get("Condition") == "HasJwtAuthorizer" for v in jwt.values())
    assert template["Conditions"]["HasJwtAuthorizer"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "JwtIssuer"}, ""]}]}
    # The authorizer checks the issuer and audience parameters, from the Authorization header
    authorizer = jwt["InferenceJwtAuthorizer"]["Properties"]
    assert authorizer["AuthorizerType"] == "JWT"
    assert authorizer["IdentitySource"] == ["$request.header.Authorization"]
    assert authorizer["JwtConfiguration"] == {"Issuer": {"Ref": "JwtIssuer"}, "Audience": {"Ref": "JwtAudience"}}
    # Every route needs it, and together they cover the protocol's paths (RouterFunction answers 404 for others)
    routes = {v["Properties"]["RouteKey"]: v["Properties"]
              for v in jwt.values() if v["Type"] == "AWS::ApiGatewayV2::Route"}
    assert set(routes) == {"GET /v2", "GET /v2/{proxy+}", "POST /v2/{proxy+}"}
    # ... every route of the IAM API included (RouterFunction's HttpApi events)
    iam_routes = {f"{e['Properties']['Method']} {e['Properties']['Path']}"
                  for e in resources["RouterFunction"]["Properties"]["Events"].values() if e["Type"] == "HttpApi"}
    assert all(_covered(r, set(routes)) for r in iam_routes), iam_routes
    assert all(r["AuthorizationType"] == "JWT" and r["AuthorizerId"] == {"Ref": "InferenceJwtAuthorizer"}
               for r in routes.values())
    # They reach RouterFunction with the same payload format as the IAM API
    integration = jwt["InferenceJwtIntegration"]["Properties"]
    assert integration["IntegrationUri"] == {"Fn::GetAtt": ["RouterFunction", "Arn"]}
    assert integration["PayloadFormatVersion"] == "2.0"
    assert jwt["InferenceJwtInvokePermission"]["Properties"]["FunctionName"] == {"Ref": "RouterFunction"}
    assert template["Outputs"]["JwtApiUrl"]["Condition"] == "HasJwtAuthorizer"


@pytest.mark.skipif(shutil.which("cfn-lint") is None, reason="cfn-lint is not installed (pip install cfn-lint)")
def test_cfn_lint_passes_with_and_without_the_jwt_authorizer() -> None:
    # cfn-lint transforms the SAM template and checks every condition's combination
    out = subprocess.run(["cfn-lint", str(ROOT / "template.yaml")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def _covered(route: str, jwt_routes: set[str]) -> bool:
    method, path = route.split(" ", 1)
    return route in jwt_routes or (path.startswith("/v2/") and f"{method} /v2/{{proxy+}}" in jwt_routes)
