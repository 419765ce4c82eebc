"""`tierserve edge package`: the Greengrass v2 component's recipe, and its lifecycle run here as Greengrass runs it.

The component is built from a store folder; its recipe is checked field by field against the recipe
reference (format 2020-01-25); then its artifact is unpacked and its Install and Run scripts are run
with the recipe variables substituted, as the Greengrass nucleus does: the device installs the wheel in
a virtual environment, starts offline (its store unreachable) and serves the shipped model from the
seed, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.support.edge import write_edge_store
from tests.support.fakes import json_body, rows_of, write_linear
from tierserve.client import Client
from tierserve.errors import ConfigurationError
from tierserve_tools.greengrass import ARTIFACT, PLATFORMS, TOKEN_EXCHANGE, UNPACKED, package

pytestmark = pytest.mark.integration
VARIABLE = re.compile(r"\{([a-zA-Z]+):([^}]*)\}")


@pytest.fixture(scope="module")
def component(tmp_path_factory) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("store")
    write_edge_store(root)
    out = tmp_path_factory.mktemp("component")
    recipe_path = package(["lin"], str(root), out, component="com.example.tierserve.edge", version="1.2.3",
                          artifact_uri="s3://my-bucket/greengrass/com.example.tierserve.edge/1.2.3",
                          device_store="s3://tierserve-models-123456789012-us-east-1/models")
    return recipe_path, json.loads(recipe_path.read_text()), root


def test_the_recipe_has_the_documented_fields(component) -> None:
    path, recipe, _ = component
    assert path.name == "com.example.tierserve.edge-1.2.3.json"
    assert recipe["RecipeFormatVersion"] == "2020-01-25"
    assert recipe["ComponentName"] == "com.example.tierserve.edge" and recipe["ComponentVersion"] == "1.2.3"
    assert recipe["ComponentDependencies"][TOKEN_EXCHANGE]["DependencyType"] == "HARD"
    config = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    assert config["StoreUri"] == "s3://tierserve-models-123456789012-us-east-1/models" and config["Models"] == "lin"
    assert [m["Platform"] for m in recipe["Manifests"]] == [{"os": "linux", "architecture": a} for a in PLATFORMS]
    for manifest in recipe["Manifests"]:
        assert set(manifest["Lifecycle"]) == {"Install", "Run"}
        assert manifest["Artifacts"] == [{"URI": f"s3://my-bucket/greengrass/com.example.tierserve.edge/1.2.3/{ARTIFACT}",
                                          "Unarchive": "ZIP", "Permission": {"Read": "OWNER", "Execute": "NONE"}}]
        # Every recipe variable is one Greengrass knows, and every configuration key exists
        for step in manifest["Lifecycle"].values():
            for ns, key in VARIABLE.findall(step["Script"]):
                assert (ns, key) in {("artifacts", "decompressedPath"), ("work", "path")} or (
                    ns == "configuration" and key.lstrip("/") in config), (ns, key)


def test_the_artifact_holds_the_wheel_and_a_verified_seed_of_the_chosen_models(component) -> None:
    path, recipe, root = component
    artifact = path.parent.parent / "artifacts" / recipe["ComponentName"] / recipe["ComponentVersion"] / ARTIFACT
    names = zipfile.ZipFile(artifact).namelist()
    assert any(re.fullmatch(r"wheels/tierserve-[\d.]+-py3-none-any\.whl", n) for n in names)
    seed = json.loads(zipfile.ZipFile(artifact).read("models/manifest.json"))
    assert list(seed["models"]) == ["lin"] and "models/lin/1/model.onnx" in names
    assert zipfile.ZipFile(artifact).read("models/lin/1/model.onnx") == (root / "lin/1/model.onnx").read_bytes()


def test_a_model_not_placed_on_the_edge_is_refused_with_what_to_do(tmp_path: Path) -> None:
    root = write_edge_store(tmp_path / "store")
    with pytest.raises(ConfigurationError, match=r"not placed on the edge.*--target edge"):
        package(["cpu-only"], str(root), tmp_path / "out")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def substitute(script: str, artifacts: Path, work: Path, config: dict) -> str:
    """What the nucleus does to a lifecycle script before it runs it."""
    def value(m: re.Match[str]) -> str:
        ns, key = m.group(1), m.group(2)
        if ns == "artifacts":
            return str(artifacts)
        if ns == "work":
            return str(work)
        return str(config[key.lstrip("/")])
    return VARIABLE.sub(value, script)


def test_the_lifecycle_installs_runs_offline_from_the_seed_and_stops_on_sigterm(component, tmp_path: Path) -> None:
    path, recipe, root = component
    _, w, b = write_linear(root, "lin", "1", seed=1, targets=("edge", "cpu"))  # the shipped model's weights
    # Given the artifact unpacked where Greengrass puts it, and a work folder
    decompressed = tmp_path / "packages" / "artifacts-unarchived" / recipe["ComponentName"] / recipe["ComponentVersion"]
    artifact = path.parent.parent / "artifacts" / recipe["ComponentName"] / recipe["ComponentVersion"] / ARTIFACT
    zipfile.ZipFile(artifact).extractall(decompressed / UNPACKED)
    work = tmp_path / "work" / recipe["ComponentName"]
    work.mkdir(parents=True)
    http_port, grpc_port = free_port(), free_port()
    config = {**recipe["ComponentConfiguration"]["DefaultConfiguration"], "Python": sys.executable,
              "PipOptions": "--no-index --no-deps", "HttpPort": http_port, "GrpcPort": grpc_port}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}  # the store is unreachable: the device is offline
    env.pop("PYTHONPATH", None)
    lifecycle = next(m for m in recipe["Manifests"] if m["Platform"]["architecture"] == "amd64")["Lifecycle"]
    # When Install runs
    install = subprocess.run(["sh", "-c", substitute(lifecycle["Install"]["Script"], decompressed, work, config)],
                             env=env, capture_output=True, text=True, timeout=lifecycle["Install"]["Timeout"])
    assert install.returncode == 0, install.stderr
    assert (work / "venv" / "bin" / "tierserve-edge").is_file()
    # And Run starts the runtime
    # The device installs the runtime's dependencies from the index (PipOptions ""); here Install skipped them
    # (--no-deps) and Run finds them in this environment's site-packages, after the new venv's own tierserve
    deps = {**env, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    run = subprocess.Popen(["sh", "-c", substitute(lifecycle["Run"]["Script"], decompressed, work, config)],
                           env=deps, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = run.stdout.readline()
        assert "tierserve edge: ready on" in line, run.stderr.read() if run.poll() is not None else line
        # Then, offline, it serves the model it shipped with, from its own installation
        api = Client(f"http://127.0.0.1:{http_port}")
        x = rows_of(2)
        resp = api.request("POST", "/v2/models/lin/infer", json_body(x))
        assert resp.status == 200 and resp.served_by == "edge"
        y = np.asarray(resp.json()["outputs"][0]["data"], np.float32).reshape(2, 3)
        np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)
        status = api.request("GET", "/v2/health/edge").json()
        assert status["sync"]["source"].startswith("seed") and status["sync"]["state"] in ("pending", "offline")
        # (the process is the virtual environment's interpreter running the installed console script)
        cmdline = Path(f"/proc/{run.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].decode().startswith(str(work / "venv")) and cmdline[1].endswith(b"tierserve-edge")
    finally:
        # And Greengrass's stop (SIGTERM) ends it cleanly
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=20) == 0
