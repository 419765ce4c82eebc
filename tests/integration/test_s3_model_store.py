"""The CPU tier fetching its model from S3 through a real moto_server over HTTP."""

from __future__ import annotations

import json

import boto3
import pytest

from tests.conftest import load_event
from tests.support.moto_server import aws_test_env, running_moto_server
from tierserve.handlers import router

pytestmark = pytest.mark.integration
BUCKET = "tierserve-models-123456789012-us-east-1"


@pytest.fixture
def moto_url():
    with running_moto_server() as url:
        yield url


def test_router_serves_a_model_fetched_from_s3(runtime_env, digits_store, moto_url, lambda_context, tmp_path):
    # Given the compiled store uploaded to a bucket on a real moto_server
    for k, v in aws_test_env(moto_url).items():
        runtime_env.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    for f in sorted(digits_store.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"models/{f.relative_to(digits_store).as_posix()}")
    runtime_env.setenv("MODEL_STORE_URI", f"s3://{BUCKET}/models")
    runtime_env.setenv("CPU_BACKEND", "inprocess")
    # When the router serves the sample infer event
    resp = router.lambda_handler(load_event("http_infer.json"), lambda_context)
    # Then it answers from the model it downloaded, cached in MODEL_CACHE_DIR/<its sha256>/
    assert resp["statusCode"] == 200, resp["body"]
    assert [o["name"] for o in json.loads(resp["body"])["outputs"]] == ["label", "probabilities"]
    manifest = json.loads((digits_store / "manifest.json").read_text())
    sha = manifest["models"]["digits"]["versions"]["1"]["variants"]["fp32"]["sha256"]
    assert (tmp_path / "cache" / sha / "model.onnx").is_file()


def test_tampered_s3_object_is_refused_with_500_and_no_stack_trace(runtime_env, digits_store, moto_url,
                                                                   lambda_context):
    # Given a bucket whose artifact does not match the manifest's sha256
    for k, v in aws_test_env(moto_url).items():
        runtime_env.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(digits_store / "manifest.json"), BUCKET, "models/manifest.json")
    s3.put_object(Bucket=BUCKET, Key="models/digits/1/model.onnx", Body=b"not the model")
    runtime_env.setenv("MODEL_STORE_URI", f"s3://{BUCKET}/models")
    runtime_env.setenv("CPU_BACKEND", "inprocess")
    # When a request arrives
    resp = router.lambda_handler(load_event("http_infer.json"), lambda_context)
    # Then it is refused clearly, before onnxruntime loads anything
    body = json.loads(resp["body"])
    assert resp["statusCode"] == 500 and body["code"] == "integrity_error"
    assert "refusing to load it" in body["error"] and "Traceback" not in resp["body"]
