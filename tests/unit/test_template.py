"""template.yaml: the HTTP API's authorization (IAM by default, a JWT authorizer as the alternative)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tierserve_tools.sam import load_template

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


# --- operations (issue 11): the unattended rollout, alarms and the dashboard ----------------------------


def test_the_rollout_runs_every_minute_with_least_privilege(template: dict) -> None:
    fn = template["Resources"]["RolloutFunction"]["Properties"]
    assert fn["Handler"] == "tierserve.handlers.rollout.lambda_handler"
    assert fn["Events"]["EveryMinute"]["Properties"]["ScheduleExpression"] == "rate(1 minute)"
    assert fn["Environment"]["Variables"]["ROLLOUT_TABLE"] == {"Ref": "RolloutTable"}
    statements = next(p["Statement"] for p in fn["Policies"] if "Statement" in p)
    s3 = [s for s in statements if any(a.startswith("s3:") for a in [s["Action"]] if isinstance(a, str))]
    # S3: read and conditionally write the manifest and the history, nothing else of the bucket
    assert sorted(s["Action"] for s in s3) == ["s3:GetObject", "s3:PutObject"]
    for s in s3:
        assert [r["Fn::Sub"].rsplit("${ModelPrefix}/", 1)[1] for r in s["Resource"]] == ["manifest.json", "_history/*"]
    assert {"DynamoDBCrudPolicy": {"TableName": {"Ref": "RolloutTable"}}} in fn["Policies"]


def test_every_alarm_notifies_the_optional_topic(template: dict) -> None:
    alarms = {k: v["Properties"] for k, v in template["Resources"].items() if v["Type"] == "AWS::CloudWatch::Alarm"}
    assert {"RouterErrorRateAlarm", "RouterLatencyAlarm", "CpuLatencyAlarm", "GpuFallbackAlarm", "BreakerOpenAlarm",
            "ThrottlesAlarm", "BatchDeadLettersAlarm", "BatchJobFailuresAlarm"} <= set(alarms)
    topic = {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    assert all(a["AlarmActions"] == topic and a["OKActions"] == topic for a in alarms.values())
    assert template["Parameters"]["AlarmTopicArn"]["Default"] == ""


def _emitted_sets(capsys, monkeypatch) -> dict[str, list[list[str]]]:
    """Each generation metric's dimension sets as tierserve.telemetry emits them."""
    import json

    from tierserve import telemetry

    monkeypatch.setenv("TIERSERVE_METRICS", "true")
    capsys.readouterr()
    telemetry.generation("m", "1", "cpu", ttft_ms=1.0, itl_ms=1.0, prompt_tokens=1, completion_tokens=1,
                         tokens_per_s=1.0)
    telemetry.generation_request("m", "1", tier="gpu", status=200)
    telemetry.failover_mid_stream("m", "1", "gpu", "cpu", 3)
    out: dict[str, list[list[str]]] = {}
    for doc in map(json.loads, capsys.readouterr().out.splitlines()):
        directive = doc["_aws"]["CloudWatchMetrics"][0]
        for m in directive["Metrics"]:
            out.setdefault(m["Name"], []).extend(directive["Dimensions"])
    return out


def test_generation_alarms_name_dimension_sets_the_telemetry_emits(template: dict, capsys, monkeypatch) -> None:
    """issue 18: TTFT p99 and the mid-stream failover rate alarm on fixed dimensions, which must be sets that
    tierserve.telemetry really emits (an alarm on a set nobody emits never fires); the streaming REST API's 5xx
    rate is read by its ApiName and Stage."""
    res = template["Resources"]
    emitted = _emitted_sets(capsys, monkeypatch)

    def names(dims: list[dict]) -> list[str]:
        return [d["Name"] for d in dims]

    ttft = res["GenerationTtftAlarm"]["Properties"]
    assert (ttft["MetricName"], ttft["ExtendedStatistic"], ttft["Threshold"]) == (
        "TimeToFirstToken", "p99", {"Ref": "TtftAlarmMs"})
    assert names(ttft["Dimensions"]) in emitted["TimeToFirstToken"]
    failover = {m["Id"]: m for m in res["FailoverMidStreamAlarm"]["Properties"]["Metrics"]}
    assert failover["rate"]["Expression"] == "IF(generations > 0, 100 * failovers / generations, 0)"
    for qid, metric in (("failovers", "FailoverMidStream"), ("generations", "Generations")):
        stat = failover[qid]["MetricStat"]["Metric"]
        assert stat["MetricName"] == metric and names(stat["Dimensions"]) in emitted[metric]
        assert stat["Dimensions"][1]["Value"] == {"Ref": "RouterFunction"}
    api = {m["Id"]: m for m in res["StreamingApiErrorRateAlarm"]["Properties"]["Metrics"]}
    dims = api["errors"]["MetricStat"]["Metric"]["Dimensions"]
    assert api["errors"]["MetricStat"]["Metric"]["MetricName"] == "5XXError"
    assert dims == [{"Name": "ApiName", "Value": res["StreamingApi"]["Properties"]["Name"]},
                    {"Name": "Stage", "Value": res["StreamingApi"]["Properties"]["StageName"]}]
    assert api["requests"]["MetricStat"]["Metric"]["Dimensions"] == dims


def test_the_latency_alarms_read_inference_latency_which_a_long_stream_does_not_raise(template: dict, capsys,
                                                                                      monkeypatch) -> None:
    """A streamed generation lasts as long as its answer (seconds to minutes), so an alarm on Lambda's Duration p99
    fires on healthy streams. The router's and the CPU function's latency alarms read tierserve's own ``Latency``
    (successful inferences, per function), which a generation never emits."""
    import json

    from tierserve import telemetry

    monkeypatch.setenv("TIERSERVE_METRICS", "true")
    capsys.readouterr()
    telemetry.request("m", "1", tier="cpu", latency_ms=3.0)
    inference = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    telemetry.generation_request("m", "1", tier="cpu", status=200)
    telemetry.generation("m", "1", "cpu", ttft_ms=1.0, itl_ms=1.0, prompt_tokens=1, completion_tokens=900,
                         tokens_per_s=9.0)
    generation = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert not any("Latency" in doc for doc in generation)
    latency_sets = [d for doc in inference for directive in doc["_aws"]["CloudWatchMetrics"]
                    if any(m["Name"] == "Latency" for m in directive["Metrics"]) for d in directive["Dimensions"]]
    for name, function in (("RouterLatencyAlarm", "RouterFunction"), ("CpuLatencyAlarm", "CpuInferenceFunction")):
        alarm = template["Resources"][name]["Properties"]
        assert (alarm["Namespace"], alarm["MetricName"], alarm["ExtendedStatistic"]) == ("tierserve", "Latency", "p99")
        assert [d["Name"] for d in alarm["Dimensions"]] in latency_sets
        assert alarm["Dimensions"] == [{"Name": "service", "Value": "tierserve"},
                                       {"Name": "function", "Value": {"Ref": function}}]
        assert alarm["Threshold"] == {"Ref": "LatencyAlarmMs"}


def test_the_dashboard_shows_tokens_per_tier_and_ttft_per_version(template: dict, capsys, monkeypatch) -> None:
    import json
    import re

    body = template["Resources"]["OperationsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    doc = json.loads(re.sub(r"\$\{[A-Za-z:.]+\}", "X", body))
    searches = re.findall(r"SEARCH\('\{tierserve,([a-z,]+)\} MetricName=\"(\w+)\"", json.dumps(doc).replace('\\"', '"'))
    shown = {(metric, tuple(dims.split(","))) for dims, metric in searches}
    for metric, dims in (("PromptTokens", ("service", "function", "model", "tier")),
                         ("CompletionTokens", ("service", "function", "model", "tier")),
                         ("TimeToFirstToken", ("service", "model", "version")),
                         ("InterTokenLatency", ("service", "model", "version"))):
        assert (metric, dims) in shown
        assert list(dims) in _emitted_sets(capsys, monkeypatch)[metric]  # a SEARCH on a set nobody emits is empty


def test_the_dashboard_is_valid_json_per_model_and_tier(template: dict) -> None:
    import json
    import re

    body = template["Resources"]["OperationsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    doc = json.loads(re.sub(r"\$\{[A-Za-z:.]+\}", "X", body))
    expressions = " ".join(m.get("expression", "") for w in doc["widgets"] for row in w["properties"]["metrics"]
                           for m in row if isinstance(m, dict))
    assert "{tierserve,service,function,model,tier}" in expressions
    assert "{tierserve,service,function,model,version}" in expressions and "'p99'" in expressions
