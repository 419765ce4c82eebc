"""template.yaml's streaming REST API (issue 17): one regional REST API carries the OpenAI routes and Triton's
generate extension, every route a Lambda proxy integration to RouterFunction with ResponseTransferMode STREAM
at the 15-minute limit; its auth is a bearer token, a tierserve API key (KeysAuthorizerFunction: GetItem on
KeysTable only) or a JWT of JwtIssuer's Cognito user pool, as ApiAuth says; the OIP routes stay on the HTTP
API. The renderings for ApiAuth=keys (every GpuTier's) and ApiAuth=jwt are linted by
tests/unit/test_template_gpu_tier.py (sam validate --lint, cfn-lint, checkov)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cfn_render import render
from tests.support.table_schema import declared_table, made_table
from tierserve_tools.sam import load_template

ROOT = Path(__file__).resolve().parents[2]
ROUTES = {
    ("post", "/v1/chat/completions"), ("post", "/v1/completions"), ("get", "/v1/models"), ("post", "/v1/embeddings"),
    ("post", "/v2/models/{model}/generate"), ("post", "/v2/models/{model}/generate_stream"),
    ("post", "/v2/models/{model}/versions/{version}/generate"),
    ("post", "/v2/models/{model}/versions/{version}/generate_stream"),
    ("get", "/health"),  # vLLM's health check on the OpenAI surface (issue 19: guidellm asks it first)
}
STREAMING_URI = {"Fn::Sub": "arn:${AWS::Partition}:apigateway:${AWS::Region}:lambda:path/2021-11-15/functions/"
                            "${RouterFunction.Arn}/response-streaming-invocations"}
JWT = {"ApiAuth": "jwt", "JwtIssuer": "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbC123",
       "JwtAudience": "client1"}


@pytest.fixture(scope="module")
def template() -> dict:
    return load_template(ROOT / "template.yaml")


def _api(doc: dict) -> dict:
    return doc["Resources"]["StreamingApi"]["Properties"]


def _operations(doc: dict) -> dict[tuple[str, str], dict]:
    return {(method, path): op for path, item in _api(doc)["DefinitionBody"]["paths"].items()
            for method, op in item.items()}


def test_one_regional_rest_api_streams_every_route_from_the_router(template) -> None:
    api = _api(template)
    assert template["Resources"]["StreamingApi"]["Type"] == "AWS::Serverless::Api"
    assert api["EndpointConfiguration"] == {"Type": "REGIONAL"}
    assert api["AlwaysDeploy"] is True  # a change of ApiAuth reaches the stage
    ops = _operations(template)
    assert set(ops) == ROUTES
    for route, op in ops.items():
        integration = op["x-amazon-apigateway-integration"]
        assert integration == {"type": "aws_proxy", "httpMethod": "POST", "uri": STREAMING_URI,
                               "responseTransferMode": "STREAM", "timeoutInMillis": 900_000}, route
        params = {p["name"] for p in op.get("parameters", [])}
        assert params == {n for n in ("model", "version") if f"{{{n}}}" in route[1]}, route
    # The router may run as long as the stream may last
    router = template["Resources"]["RouterFunction"]["Properties"]
    assert router["Timeout"] * 1000 == 900_000
    permission = template["Resources"]["StreamingApiInvokesRouter"]["Properties"]
    assert permission["FunctionName"] == {"Fn::GetAtt": ["RouterFunction", "Arn"]}
    assert permission["SourceArn"]["Fn::Sub"].endswith(":${StreamingApi}/*")


def test_the_oip_routes_stay_on_the_http_api(template) -> None:
    events = template["Resources"]["RouterFunction"]["Properties"]["Events"].values()
    assert {e["Type"] for e in events} == {"HttpApi"}
    paths = {e["Properties"]["Path"] for e in events}
    assert "/v2/models/{name}/infer" in paths and not any(p.startswith("/v1") or "generate" in p for p in paths)
    assert not any(path.endswith(("/infer", "/ready", "/config")) for _, path in _operations(template))


def test_every_route_needs_the_authorizer_that_api_auth_picks(template) -> None:
    pick = {"Fn::If": ["IsJwtApiAuth", [{"CognitoUserPool": []}], [{"TierserveApiKey": []}]]}
    assert all(op["security"] == pick for op in _operations(template).values())
    assert template["Parameters"]["ApiAuth"]["AllowedValues"] == ["keys", "jwt"]
    assert template["Parameters"]["ApiAuth"]["Default"] == "keys"
    assert template["Conditions"]["IsKeysApiAuth"] == {"Fn::Equals": [{"Ref": "ApiAuth"}, "keys"]}
    assert template["Conditions"]["IsJwtApiAuth"] == {"Fn::Equals": [{"Ref": "ApiAuth"}, "jwt"]}
    rule = template["Rules"]["JwtApiAuthNeedsAUserPool"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "ApiAuth"}, "jwt"]}
    assert rule["Assertions"][0]["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "JwtIssuer"}, ""]}]}


def test_keys_auth_is_a_cached_request_authorizer_with_least_privilege(template) -> None:
    doc = render(template, {"ApiAuth": "keys"})
    body = _api(doc)["DefinitionBody"]
    assert list(body["securityDefinitions"]) == ["TierserveApiKey"]
    scheme = body["securityDefinitions"]["TierserveApiKey"]
    assert (scheme["type"], scheme["name"], scheme["in"], scheme["x-amazon-apigateway-authtype"]) == \
        ("apiKey", "Authorization", "header", "custom")
    authorizer = scheme["x-amazon-apigateway-authorizer"]
    assert authorizer["type"] == "request"
    assert authorizer["identitySource"] == "method.request.header.Authorization"  # the cache key
    assert authorizer["authorizerResultTtlInSeconds"] == 300
    assert "${KeysAuthorizerFunction.Arn}/invocations" in authorizer["authorizerUri"]["Fn::Sub"]
    assert all(op["security"] == [{"TierserveApiKey": []}] for op in _operations(doc).values())
    res = doc["Resources"]
    fn = res["KeysAuthorizerFunction"]["Properties"]
    assert fn["Handler"] == "tierserve.handlers.authorizer.lambda_handler"
    assert res["KeysAuthorizerFunction"]["Metadata"]["BuildMethod"] == "makefile"
    assert fn["Environment"]["Variables"]["KEYS_TABLE"] == {"Ref": "KeysTable"}
    # least privilege: one action, one table, and no managed policy
    assert fn["Policies"] == [{"Statement": [{"Sid": "ReadOneKey", "Effect": "Allow", "Action": "dynamodb:GetItem",
                                              "Resource": {"Fn::GetAtt": ["KeysTable", "Arn"]}}]}]
    assert "Events" not in fn and "Role" not in fn
    permission = res["KeysAuthorizerPermission"]["Properties"]
    assert permission["FunctionName"] == {"Fn::GetAtt": ["KeysAuthorizerFunction", "Arn"]}
    assert permission["SourceArn"]["Fn::Sub"].endswith(":${StreamingApi}/authorizers/*")
    table = res["KeysTable"]["Properties"]
    assert table["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert table["SSESpecification"] == {"SSEEnabled": True}
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert doc["Outputs"]["KeysTableName"]["Value"] == {"Ref": "KeysTable"}


def test_keys_table_matches_the_local_one(template, monkeypatch) -> None:
    """tierserve keys --stack and the tests make the table as the template does (key schema, attribute types,
    billing, TTL): made on moto and described, compared with KeysTable's properties."""
    from tierserve_tools import keys_cli

    assert made_table(monkeypatch, keys_cli.create_table) == declared_table(template, "KeysTable")


def test_jwt_auth_is_the_cognito_user_pool_of_jwt_issuer(template) -> None:
    doc = render(template, JWT)
    res = doc["Resources"]
    assert not {"KeysTable", "KeysAuthorizerFunction", "KeysAuthorizerPermission"} & set(res)
    assert "KeysTableName" not in doc["Outputs"]
    body = _api(doc)["DefinitionBody"]
    assert list(body["securityDefinitions"]) == ["CognitoUserPool"]
    scheme = body["securityDefinitions"]["CognitoUserPool"]
    assert scheme["x-amazon-apigateway-authtype"] == "cognito_user_pools"
    authorizer = scheme["x-amazon-apigateway-authorizer"]
    assert authorizer["type"] == "cognito_user_pools"
    assert authorizer["identitySource"] == "method.request.header.Authorization"
    (arn,) = authorizer["providerARNs"]
    # The pool's id and region, from the issuer, as CloudFormation's Fn::Split / Fn::Select evaluate them
    issuer = JWT["JwtIssuer"]
    pool_id = issuer.split("/")[3]
    assert _select_split(arn["Fn::Sub"][1]["PoolId"], issuer) == pool_id == "eu-west-1_AbC123"
    assert _select_split(arn["Fn::Sub"][1]["PoolRegion"], issuer) == "eu-west-1"
    assert arn["Fn::Sub"][0] == "arn:${AWS::Partition}:cognito-idp:${PoolRegion}:${AWS::AccountId}:userpool/${PoolId}"
    assert all(op["security"] == [{"CognitoUserPool": []}] for op in _operations(doc).values())


def _select_split(node: dict | str, issuer: str) -> str:
    """Evaluate Fn::Select over Fn::Split over Ref JwtIssuer (what the template uses)."""
    if isinstance(node, str):
        return node
    if node == {"Ref": "JwtIssuer"}:
        return issuer
    index, split = node["Fn::Select"]
    sep, inner = split["Fn::Split"]
    return _select_split(inner, issuer).split(sep)[index]


def test_api_gateway_answers_in_openai_error_shape(template) -> None:
    import json

    responses = _api(template)["DefinitionBody"]["x-amazon-apigateway-gateway-responses"]
    assert {name: r["statusCode"] for name, r in responses.items()} == {
        "UNAUTHORIZED": 401, "ACCESS_DENIED": 403, "MISSING_AUTHENTICATION_TOKEN": 404}
    for r in responses.values():
        error = json.loads(r["responseTemplates"]["application/json"].strip("'"))["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert responses["UNAUTHORIZED"]["responseParameters"] == {"gatewayresponse.header.WWW-Authenticate": "'Bearer'"}


def test_the_outputs_name_the_openai_base_url(template) -> None:
    api = _api(template)
    base = template["Outputs"]["OpenAIBaseUrl"]["Value"]["Fn::Sub"]
    assert base == f"https://${{StreamingApi}}.execute-api.${{AWS::Region}}.${{AWS::URLSuffix}}/{api['StageName']}/v1"
    assert template["Outputs"]["StreamingApiUrl"]["Value"]["Fn::Sub"] == base.removesuffix("/v1")
    # The access log records who called (the key's caller, or the JWT's subject)
    assert "$context.authorizer.caller" in api["AccessLogSetting"]["Format"]
    assert api["AccessLogSetting"]["DestinationArn"] == {"Fn::GetAtt": ["ApiAccessLogs", "Arn"]}


def test_every_function_has_a_build_target() -> None:
    """functions/Makefile's REQUIREMENTS names a requirements file for every handler the template declares."""
    from tierserve_tools.lambda_build import parse_requirements_map
    from tierserve_tools.reach import template_functions

    text = (ROOT / "functions" / "Makefile").read_text()
    block = text.split("REQUIREMENTS :=", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    requirements = parse_requirements_map(block)
    handlers = template_functions((ROOT / "template.yaml").read_text())
    missing = {fn: h for fn, h in handlers.items() if h.rsplit(".", 1)[0] not in requirements}
    assert missing == {}
    assert all((ROOT / "functions" / f).is_file() for f in requirements.values())
