"""template.yaml's GpuTier (none | url | sagemaker): each value rendered (tests/support/cfn_render.py) into
what CloudFormation would create, checked for what that tier must and must not deploy, and linted with
`sam validate --lint`, `cfn-lint` and `checkov`.

The linters live in their own virtualenv (`make lint-tools` -> .venv-tools; LINT_VENV names another):
aws-sam-cli and checkov pin versions of boto3, urllib3, packaging and click that tritonclient and pytest
cannot share. Without them these tests skip, saying how to install them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.cfn_render import render
from tierserve_tools.sam import load_template

ROOT = Path(__file__).resolve().parents[2]
LINT_VENV = Path(os.environ.get("LINT_VENV", ROOT / ".venv-tools"))
ACCOUNT, REGION = "123456789012", "us-east-1"
#: ReservedConcurrency as a production deployment sets it (its default, -1, reserves nothing: a new account's
#: quota of 10 leaves no room), so checkov judges what such a deployment runs.
PRODUCTION = {"ReservedConcurrency": "50"}
TIERS = {
    "none": {"GpuTier": "none"},
    "url": {"GpuTier": "url", "TritonUrl": "https://triton.internal.example:8000",
            "GpuSubnetIds": "subnet-0123456789abcdef0,subnet-0fedcba9876543210",
            "GpuSecurityGroupIds": "sg-0123456789abcdef0"},
    "sagemaker": {"GpuTier": "sagemaker", "GpuModelName": "minilm", "GpuModelVersion": "1",
                  "GpuModelDataUrl": f"s3://tierserve-models-{ACCOUNT}-{REGION}/models/sagemaker/minilm-1.tar.gz"},
}
#: GpuTier=sagemaker with a generative model on its own endpoint (the vLLM Triton image, issue 18).
GENERATIVE = {**TIERS["sagemaker"], "GenerativeModelName": "tiny-llama",
              "GenerativeModelDataUrl": f"s3://tierserve-models-{ACCOUNT}-{REGION}/models/sagemaker/tiny-llama-1.tar.gz",
              "GenerativeImageUri": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/tritonserver:24.12-vllm-python-py3"}
GENERATIVE_RESOURCES = {"GenerativeModelRole", "GenerativeModel", "GenerativeEndpointConfig", "GenerativeEndpoint",
                        "RouterStreamsFromTheGenerativeEndpoint"}
#: Beside the tiers: every CPU memory class deployed, with provisioned concurrency (tierserve deploy-config's output).
RENDERINGS = {**TIERS, "sagemaker-vllm": GENERATIVE,
              "cpu-classes": {"CpuClass3538": "true", "CpuClass5307": "true", "CpuClass10240": "true",
                              "CpuColdStart": "provisioned", "CpuEphemeralStorageMb": "4096"},
              # the streaming REST API behind the Cognito authorizer (every other rendering: ApiAuth=keys)
              "api-auth-jwt": {"ApiAuth": "jwt", "JwtAudience": "1example23456789",
                               "JwtIssuer": f"https://cognito-idp.{REGION}.amazonaws.com/{REGION}_EXAMPLE"}}
GPU_RESOURCES = {"GpuModelRole", "GpuModel", "GpuEndpointConfig", "GpuEndpoint", "GpuScalableTarget",
                 "GpuScalingPolicy"}


@pytest.fixture(scope="module")
def template() -> dict:
    return load_template(ROOT / "template.yaml")


@pytest.fixture(scope="module")
def rendered(template, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """Each tier's rendering, and where it was written (JSON, next to a copy of functions/ for CodeUri)."""
    out = {}
    root = tmp_path_factory.mktemp("rendered")
    for tier, values in RENDERINGS.items():
        doc = render(template, {**PRODUCTION, **values})
        folder = root / tier
        folder.mkdir()
        (folder / "functions").mkdir()  # CodeUri: functions/ must exist for sam's transform
        path = folder / "template.json"
        path.write_text(json.dumps(doc, indent=1))
        out[tier] = (doc, path)
    return out


def _env(doc: dict, fn: str) -> dict:
    return doc["Resources"][fn]["Properties"]["Environment"]["Variables"]


def _statements(doc: dict, fn: str) -> list[dict]:
    found = []
    for policy in doc["Resources"][fn]["Properties"].get("Policies") or []:
        if isinstance(policy, dict) and "Statement" in policy:
            found.extend(policy["Statement"])
    return found


# --- what each tier deploys ------------------------------------------------------------------------


def test_none_deploys_no_gpu_tier_and_no_vpc(rendered):
    doc, _ = rendered["none"]
    assert not GPU_RESOURCES & set(doc["Resources"])
    for fn in ("RouterFunction", "BatchInferenceFunction"):
        env = _env(doc, fn)
        assert env["GPU_BACKEND"] == {"Fn::FindInMap": ["GpuTiers", {"Ref": "GpuTier"}, "Backend"]}
        assert env["TRITON_URL"] == "" and env["SAGEMAKER_ENDPOINT_NAME"] == ""
        assert "VpcConfig" not in doc["Resources"][fn]["Properties"]
        assert not any("sagemaker:InvokeEndpoint" in str(s) for s in _statements(doc, fn))
    assert doc["Mappings"]["GpuTiers"]["none"]["Backend"] == "none"


def test_url_keeps_your_triton_and_puts_the_router_and_batch_in_your_vpc(rendered):
    doc, _ = rendered["url"]
    assert not GPU_RESOURCES & set(doc["Resources"])
    for fn in ("RouterFunction", "BatchInferenceFunction"):
        assert _env(doc, fn)["TRITON_URL"] == {"Ref": "TritonUrl"}
        assert doc["Resources"][fn]["Properties"]["VpcConfig"] == {
            "SubnetIds": {"Ref": "GpuSubnetIds"}, "SecurityGroupIds": {"Ref": "GpuSecurityGroupIds"}}
    assert "VpcConfig" not in doc["Resources"]["CpuInferenceFunction"]["Properties"]  # it never calls Triton
    assert doc["Mappings"]["GpuTiers"]["url"]["Backend"] == "triton"


def test_sagemaker_deploys_tritons_container_on_an_autoscaled_endpoint(rendered):
    doc, _ = rendered["sagemaker"]
    res = doc["Resources"]
    assert set(res) >= GPU_RESOURCES
    model = res["GpuModel"]["Properties"]
    container = model["PrimaryContainer"]
    # The image: NVIDIA's SageMaker Triton image for the region (a parameter overrides it)
    image = container["Image"]["Fn::Sub"]
    assert image[0] == "${Account}.dkr.ecr.${AWS::Region}.${AWS::URLSuffix}/sagemaker-tritonserver:${TritonImageTag}"
    assert doc["Mappings"]["TritonImageAccounts"][REGION]["Account"] == "763104351884"
    assert doc["Parameters"]["TritonImageTag"]["Default"] == "24.09-py3"
    assert container["ModelDataUrl"] == {"Ref": "GpuModelDataUrl"}
    assert container["Environment"] == {"SAGEMAKER_TRITON_DEFAULT_MODEL_NAME": {"Ref": "GpuModelName"}}
    assert model["EnableNetworkIsolation"] is True
    # Instance type and count are parameters: ml.g5.xlarge, one instance by default
    variant = res["GpuEndpointConfig"]["Properties"]["ProductionVariants"][0]
    assert variant["InstanceType"] == {"Ref": "GpuInstanceType"} and variant["VariantName"] == "AllTraffic"
    assert doc["Parameters"]["GpuInstanceType"]["Default"] == "ml.g5.xlarge"
    assert doc["Parameters"]["GpuInstanceCount"]["Default"] == 1
    # Target tracking on InvocationsPerInstance between the min and max parameters
    target = res["GpuScalableTarget"]["Properties"]
    assert target["ResourceId"] == {"Fn::Sub": "endpoint/${GpuEndpoint.EndpointName}/variant/AllTraffic"}
    assert (target["MinCapacity"], target["MaxCapacity"]) == ({"Ref": "GpuMinInstances"}, {"Ref": "GpuMaxInstances"})
    tracking = res["GpuScalingPolicy"]["Properties"]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"
    # The router and batch call that endpoint, and only InvokeEndpoint on it
    for fn in ("RouterFunction", "BatchInferenceFunction"):
        env = _env(doc, fn)
        assert env["SAGEMAKER_ENDPOINT_NAME"] == {"Fn::GetAtt": ["GpuEndpoint", "EndpointName"]}
        assert env["SAGEMAKER_MODEL"] == {"Fn::Sub": "${GpuModelName}/${GpuModelVersion}"}
        sagemaker = [s for s in _statements(doc, fn) if "sagemaker" in str(s.get("Action"))]
        assert sagemaker == [{"Sid": "InvokeTheGpuEndpointOnly", "Effect": "Allow",
                              "Action": "sagemaker:InvokeEndpoint", "Resource": {"Ref": "GpuEndpoint"}}]
        assert "VpcConfig" not in res[fn]["Properties"]
    assert "sagemaker" not in str(res["CpuInferenceFunction"]["Properties"].get("Policies"))
    # The container's role reads its archive only
    s3 = next(s for s in res["GpuModelRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
              if s["Sid"] == "ReadTheModelArchive")
    assert s3["Action"] == "s3:GetObject"


def test_a_generative_model_gets_its_own_streaming_endpoint_on_the_vllm_image(rendered):
    doc, _ = rendered["sagemaker-vllm"]
    res = doc["Resources"]
    assert set(res) >= GPU_RESOURCES | GENERATIVE_RESOURCES
    for tier in ("none", "url", "sagemaker"):  # only with GpuTier=sagemaker and a generative archive
        assert not GENERATIVE_RESOURCES & set(rendered[tier][0]["Resources"])
    container = res["GenerativeModel"]["Properties"]["PrimaryContainer"]
    assert container["Image"] == {"Ref": "GenerativeImageUri"}
    assert container["ModelDataUrl"] == {"Ref": "GenerativeModelDataUrl"}
    # generation enabled, streamed: one inference type per container, so this endpoint is the generative one
    assert container["Environment"] == {"SAGEMAKER_TRITON_DEFAULT_MODEL_NAME": {"Ref": "GenerativeModelName"},
                                        "SAGEMAKER_TRITON_INFERENCE_TYPE": "generate_stream"}
    assert res["GenerativeModel"]["Properties"]["EnableNetworkIsolation"] is True
    variant = res["GenerativeEndpointConfig"]["Properties"]["ProductionVariants"][0]
    assert variant["InstanceType"] == {"Ref": "GenerativeInstanceType"}
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] >= 600  # vLLM loads weights before /ping
    assert doc["Parameters"]["GenerativeInstanceType"]["Default"] == "ml.g5.xlarge"
    assert "24.12-vllm-python-py3" in doc["Parameters"]["GenerativeImageUri"]["Description"]
    # least privilege: the router may stream from this endpoint and nothing else; the GPU endpoint is unchanged
    policy = res["RouterStreamsFromTheGenerativeEndpoint"]["Properties"]
    assert policy["Roles"] == [{"Ref": "RouterFunctionRole"}]
    assert policy["PolicyDocument"]["Statement"] == [{
        "Sid": "StreamFromTheGenerativeEndpointOnly", "Effect": "Allow",
        "Action": "sagemaker:InvokeEndpointWithResponseStream", "Resource": {"Ref": "GenerativeEndpoint"}}]
    assert res["GpuModel"]["Properties"]["PrimaryContainer"]["Environment"] == {
        "SAGEMAKER_TRITON_DEFAULT_MODEL_NAME": {"Ref": "GpuModelName"}}
    # its role reads its own archive, exactly
    s3 = next(s for s in res["GenerativeModelRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
              if s["Sid"] == "ReadTheGenerativeArchive")
    assert s3["Action"] == "s3:GetObject" and "*" not in str(s3["Resource"])
    assert doc["Outputs"]["GenerativeEndpointName"]["Value"] == {"Fn::GetAtt": ["GenerativeEndpoint", "EndpointName"]}


def test_rules_refuse_a_tier_without_what_it_needs(template):
    rules = template["Rules"]
    assert rules["UrlTierNeedsTriton"]["RuleCondition"] == {"Fn::Equals": [{"Ref": "GpuTier"}, "url"]}
    needs = {a["Assert"]["Fn::Not"][0]["Fn::Equals"][0]["Ref"] for a in rules["SageMakerTierNeedsAModel"]["Assertions"]}
    assert needs == {"GpuModelDataUrl", "GpuModelName"}
    rule = rules["GenerativeModelNeedsItsImage"]
    needs = {a["Assert"]["Fn::Not"][0]["Fn::Equals"][0]["Ref"] for a in rule["Assertions"]}
    assert needs == {"GenerativeImageUri", "GenerativeModelName"}


# --- the linters, on every rendering ---------------------------------------------------------------


def _tool(name: str) -> str:
    path = LINT_VENV / "bin" / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: run `make lint-tools` (a virtualenv of its own, {LINT_VENV})")
    return found


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0", "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


@pytest.mark.parametrize("tier", list(RENDERINGS))
def test_sam_validate_lint_passes(rendered, tier):
    _, path = rendered[tier]
    out = _run([_tool("sam"), "validate", "--lint", "-t", str(path), "--region", REGION], cwd=path.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cfn_lint_passes_for_every_tier(rendered):
    paths = [str(p) for _, p in rendered.values()]
    out = _run([_tool("cfn-lint"), "--regions", REGION, "--", *paths])
    assert out.returncode == 0, out.stdout + out.stderr


def test_checkov_passes_for_every_tier(rendered):
    folder = next(iter(rendered.values()))[1].parent.parent
    out = _run([_tool("checkov"), "-d", str(folder), "--framework", "cloudformation", "--compact",
                "--skip-download", "-o", "json"])
    report = json.loads(out.stdout)
    reports = report if isinstance(report, list) else [report]
    failed: dict[str, set] = {tier: set() for tier in RENDERINGS}
    for r in reports:
        for check in (r.get("results") or {}).get("failed_checks", []):
            tier = Path(check["file_path"]).parent.name
            failed[tier].add((check["check_id"], check["resource"].split(".", 1)[1]))
    assert failed == {tier: set() for tier in RENDERINGS}  # every suppression in the template says why
    assert any("CpuInferenceFunction10240" in str(r) for r in reports)  # the class functions were checked
