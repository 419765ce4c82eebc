"""`tierserve deploy-config`: the store's served versions -> CPU memory classes -> template parameters, and the
template rendered with them deploys exactly those class functions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.cfn_render import render
from tests.support.fakes import X_SPEC, Y_SPEC
from tests.support.models import linear_onnx, write_model
from tierserve.manifest import Manifest
from tierserve_tools.cli import main
from tierserve_tools.deploy_config import load, parameters, place
from tierserve_tools.sam import load_template

ROOT = Path(__file__).resolve().parents[2]


def _store(root: Path, models: dict[str, tuple[int | None, tuple[str, ...]]], canary: tuple[str, int] | None = None):
    """Models with the compiler's memory recommendation (None: none recorded) and targets."""
    data, _, _ = linear_onnx(seed=1)
    for name, (memory, targets) in models.items():
        mv = write_model(root, name, "1", data, (X_SPEC,), (Y_SPEC,), targets=targets)
        if memory:
            manifest = Manifest.loads((root / "manifest.json").read_text())
            (root / "manifest.json").write_text(manifest.with_version(
                replace(mv, cpu={"memory_mb": memory, "threads": max(1, memory // 1769)})).dumps())
    if canary:  # version 2 of a model, recommended a bigger class, as a 10 % canary
        name, memory = canary
        mv = write_model(root, name, "2", data, (X_SPEC,), (Y_SPEC,))
        manifest = Manifest.loads((root / "manifest.json").read_text())
        manifest = manifest.with_version(replace(mv, cpu={"memory_mb": memory}), make_default=False)
        doc = manifest.to_json()
        doc["models"][name]["canary"] = {"version": "2", "percent": 10}
        doc["models"][name]["default_version"] = "1"
        (root / "manifest.json").write_text(json.dumps(doc))
    return Manifest.loads((root / "manifest.json").read_text())


def test_classes_follow_every_served_version(tmp_path):
    # Given models recommended 1,769 and 5,000 MB, a GPU-only one, and a canary that needs 3,538 MB
    manifest = _store(tmp_path, {"small": (1769, ("cpu",)), "big": (5000, ("cpu",)), "gpu": (None, ("gpu",)),
                                 "grow": (1769, ("cpu",))}, canary=("grow", 3538))
    rows = {(r.name, r.version): r for r in place(manifest)}
    assert rows[("small", "1")].cpu_class == 1769 and rows[("big", "1")].cpu_class == 5307
    assert rows[("grow", "2")].role == "canary" and rows[("grow", "2")].cpu_class == 3538
    assert rows[("gpu", "1")].cpu_class is None
    params = parameters(list(rows.values()))
    assert (params["CpuClass3538"], params["CpuClass5307"], params["CpuClass10240"]) == ("true", "true", "false")
    assert params["CpuEphemeralStorageMb"] == "2048" and params["CpuColdStart"] == "on-demand"


def test_the_template_rendered_with_them_deploys_those_classes_and_routes_to_them(tmp_path):
    manifest = _store(tmp_path, {"small": (1769, ("cpu",)), "big": (3538, ("cpu",))})
    params = parameters(place(manifest), cold_start="provisioned")
    doc = render(load_template(ROOT / "template.yaml"), params)
    functions = {k for k, v in doc["Resources"].items() if v["Type"] == "AWS::Serverless::Function"}
    assert {"CpuInferenceFunction", "CpuInferenceFunction3538"} <= functions
    assert not {"CpuInferenceFunction5307", "CpuInferenceFunction10240"} & functions
    router = doc["Resources"]["RouterFunction"]["Properties"]
    parts = router["Environment"]["Variables"]["CPU_FUNCTIONS"]["Fn::Join"][1]
    assert parts == [{"Fn::Sub": "1769=${CpuInferenceFunction.Alias}"},
                     {"Fn::Sub": "3538=${CpuInferenceFunction3538.Alias}"}]
    invokable = [p["LambdaInvokePolicy"]["FunctionName"] for p in router["Policies"] if "LambdaInvokePolicy" in p]
    assert invokable == [{"Ref": "CpuInferenceFunction"}, {"Ref": "CpuInferenceFunction3538"}]
    # provisioned concurrency on every deployed class, and their models loaded during init
    big = doc["Resources"]["CpuInferenceFunction3538"]["Properties"]
    assert big["MemorySize"] == 3538 and big["ProvisionedConcurrencyConfig"] == {
        "ProvisionedConcurrentExecutions": {"Ref": "CpuProvisionedConcurrency"}}
    assert big["Environment"]["Variables"]["PRELOAD_MODELS"] == "class"


def test_snapstart_keeps_tmp_within_its_limit(tmp_path):
    manifest = _store(tmp_path, {"small": (1769, ("cpu",))})
    doc = render(load_template(ROOT / "template.yaml"), parameters(place(manifest), cold_start="snapstart"))
    cpu = doc["Resources"]["CpuInferenceFunction"]["Properties"]
    assert cpu["EphemeralStorage"] == {"Size": 512} and cpu["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    assert "ProvisionedConcurrencyConfig" not in cpu  # SnapStart and provisioned concurrency exclude each other


def test_the_command_writes_the_parameters_and_refuses_what_cannot_be_deployed(tmp_path, capsys):
    _store(tmp_path / "store", {"small": (1769, ("cpu",)), "huge": (20000, ("cpu",))})
    out = tmp_path / "params.json"
    rc = main(["deploy-config", "--store", str(tmp_path / "store"), "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 1 and "huge v1 cannot be deployed on the CPU tier" in printed.err
    assert "--target gpu" in printed.err
    assert load(out)["CpuClass10240"] == "false"
    assert "sam deploy --parameter-overrides CpuClass3538=false" in printed.out


@pytest.mark.parametrize("store_kind", ["s3", "folder"])
def test_sagemaker_parameters_name_the_published_archive(tmp_path, store_kind):
    manifest = _store(tmp_path, {"enc": (1769, ("gpu", "cpu")), "small": (1769, ("cpu",))})
    uri = "s3://bucket/models" if store_kind == "s3" else str(tmp_path)
    params = parameters(place(manifest), gpu_tier="sagemaker", store_uri=uri)
    assert (params["GpuTier"], params["GpuModelName"], params["GpuModelVersion"]) == ("sagemaker", "enc", "1")
    if store_kind == "s3":
        assert params["GpuModelDataUrl"] == "s3://bucket/models/sagemaker/enc-1.tar.gz"
    else:
        assert "GpuModelDataUrl" not in params
