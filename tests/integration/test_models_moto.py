"""`tierserve models` against an S3 store on a real moto_server: every command, and the store it leaves
serves through the runtime."""

from __future__ import annotations

import json

import boto3
import pytest

from tests.support.lifecycle import compiled
from tests.support.moto_server import aws_test_env, running_moto_server
from tierserve.store import ModelStore
from tierserve_tools.cli import main

pytestmark = pytest.mark.integration
BUCKET = "tierserve-models-cli-test"


@pytest.fixture
def s3_store(monkeypatch):
    with running_moto_server() as url:
        for k, v in aws_test_env(url).items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}/models"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["models", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_command_against_moto_server(s3_store, tmp_path, capsys, monkeypatch):
    build = tmp_path / "build"
    for v in ("1", "2"):
        compiled(build, "m", v, seed=int(v))
    compiled(build, "g", "1", gpu=True)
    monkeypatch.setenv("MODEL_STORE_URI", s3_store)  # the default store
    assert run(capsys, "publish", str(build / "m" / "1"))[0] == 0
    code, out, _ = run(capsys, "publish", str(build / "m" / "2"), "--canary", "20", "--why", "try it")
    assert code == 0 and "canary v2 at 20%" in out
    assert run(capsys, "publish", str(build / "g" / "1"))[0] == 0
    # who: the caller's identity from STS
    code, out, _ = run(capsys, "list")
    assert "arn:aws:sts::123456789012:user/moto" in out and "canary 20%" in out and "gpu,cpu" in out
    for args in (("canary", "m", "2", "--percent", "40"), ("promote", "m", "2"), ("rollback", "m"),
                 ("rollback", "m", "--to", "2"), ("retire", "m", "1")):
        code, out, err = run(capsys, *args)
        assert code == 0, err
    assert run(capsys, "show", "m")[1].startswith("m: default v2 (manifest revision 8)")  # v1, the previous, retired
    records = [json.loads(line) for line in run(capsys, "history", "m", "--json")[1].splitlines()]
    assert [r["action"] for r in records] == ["publish", "publish", "canary", "promote", "rollback", "rollback",
                                              "retire"]
    assert records[1]["why"] == "try it" and records[1]["to"]["canary"] == {"version": "2", "percent": 20}
    # The bucket holds the content-addressed artifacts, the Triton repository and the history
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert {"models/triton/g/config.pbtxt", "models/triton/g/1/model.onnx", "models/triton/g/1/config.pbtxt",
            "models/_history/m/0000000001.json"} <= keys
    assert sum(k.startswith("models/_objects/") for k in keys) == 3
    # And the runtime serves v2 from S3, verified
    served = ModelStore(s3_store, tmp_path / "cache")
    mv = served.manifest().resolve("m")
    assert mv.version == "2" and served.fetch(mv.cpu_artifact).is_file()
