"""`sam build` + `sam local invoke` as documented, proven without Docker (tierserve_tools.artifact).

Each function's artifact is built by the same functions/Makefile target SAM runs (for this host's
architecture and Python), then every event in events/ is run from that artifact alone: an isolated
interpreter (`python -I -S -B`) whose path is the artifact, boto3 (what Lambda's runtime provides) and
the standard library; the environment as SAM gives it (template.yaml, then events/sam-env.json, which
SAM applies only to variables the template declares); the artifact fingerprinted before and after
(Lambda's /var/task is read-only). The local services sam-env.json names (moto_server for S3, SQS
and DynamoDB; `sam local start-lambda` for the CPU function) are a real moto_server and an Invoke API
that runs CpuInferenceFunction's own artifact the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_event
from tests.support.make_batch_events import BUCKET, INPUT_KEY, demo_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ("RouterFunction", "CpuInferenceFunction", "BatchInferenceFunction")
MOTO, START_LAMBDA = "http://host.docker.internal:5000", "http://host.docker.internal:3001"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    from concurrent.futures import ThreadPoolExecutor

    from tierserve_tools.artifact import build

    out = tmp_path_factory.mktemp("aws-sam-build")
    with ThreadPoolExecutor(len(FUNCTIONS)) as pool:  # as `sam build --parallel`
        built = {fn: pool.submit(build, fn, out / fn, ROOT / "functions") for fn in FUNCTIONS}
        return {fn: f.result() for fn, f in built.items()}


@pytest.fixture(scope="module")
def runtime() -> Path:
    from tierserve_tools.artifact import runtime_dir

    return runtime_dir(Path.home() / ".cache" / "tierserve" / "lambda-runtime")


@pytest.fixture(scope="module")
def services(tmp_path_factory, digits_store):
    """moto_server with what sam-env.json expects (models, batch input, table, queues)."""
    import boto3

    from tierserve_tools.batch import create_local_stack
    from tierserve_tools.moto import MotoServer

    moto = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    clients = {s: boto3.client(s, endpoint_url=moto.url, **creds) for s in ("s3", "sqs", "dynamodb")}
    create_local_stack(clients["s3"], clients["dynamodb"], clients["sqs"], BUCKET, "tierserve-jobs")
    for path in sorted(digits_store.rglob("*")):
        if path.is_file():
            clients["s3"].upload_file(str(path), BUCKET, f"models/{path.relative_to(digits_store).as_posix()}")
    clients["s3"].put_object(Bucket=BUCKET, Key=INPUT_KEY, Body=demo_jsonl())
    try:
        yield moto, clients["s3"]
    finally:
        moto.stop()


@pytest.fixture(scope="module")
def sam(artifacts, runtime, services):
    """run(function, event) as `sam local invoke FUNCTION -e events/EVENT --env-vars events/sam-env.json`."""
    import os

    from tierserve_tools.artifact import InvokeApi, invoke, sam_environment

    moto, _ = services
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"})
    env_vars = ROOT / "events" / "sam-env.json"
    cpu_handler, cpu_env, _ = sam_environment(ROOT / "template.yaml", "CpuInferenceFunction", env_vars,
                                              {MOTO: moto.url})
    api = InvokeApi({"CpuInferenceFunction": (artifacts["CpuInferenceFunction"], cpu_handler, cpu_env)}, runtime)
    with api:
        hosts = {MOTO: moto.url, START_LAMBDA: api.url}

        def run(fn: str, event: str, **overrides: str):
            handler, env, timeout = sam_environment(ROOT / "template.yaml", fn, env_vars, hosts)
            return invoke(artifacts[fn], runtime, handler, load_event(event), {**env, **overrides}, timeout + 30)

        run.api = api  # type: ignore[attr-defined]
        yield run
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _body(resp: dict) -> dict:
    return json.loads(resp["body"])


def test_the_artifacts_hold_their_function_and_nothing_of_the_emulation(artifacts):
    for fn, task in artifacts.items():
        assert (task / "tierserve" / "handlers").is_dir()
        assert not (task / "tierserve_tools").exists() and not (task / "tierserve" / "edge").exists()  # never ships
        assert not (task / "boto3").exists()  # Lambda's runtime provides it
    assert (artifacts["CpuInferenceFunction"] / "onnxruntime").is_dir()
    assert not (artifacts["RouterFunction"] / "onnxruntime").exists()  # the router never runs a model


def test_every_module_an_artifact_ships_imports_from_the_artifact_alone(artifacts, runtime):
    """Each tierserve module shipped, and each third-party package its handler imports that the artifact
    holds (pyarrow.parquet, tritonclient's clients: trimmed and pruned by tierserve_tools.lambda_build),
    imports in the isolated interpreter: nothing the allowlist left out is needed at import."""
    import subprocess
    import sys

    from tierserve_tools.lambda_build import package_modules
    from tierserve_tools.reach import reachable, template_functions

    handlers = template_functions((ROOT / "template.yaml").read_text())
    extra = {"pyarrow": ["pyarrow.parquet"], "tritonclient": ["tritonclient.http", "tritonclient.grpc"]}
    for fn, task in artifacts.items():
        found = reachable(ROOT / "functions", handlers[fn])
        names = package_modules(task) + [m for top in sorted(found.third_party) if (task / top).is_dir()
                                         for m in [top, *extra.get(top, [])]]
        program = ("import importlib, sys; sys.path[:0] = sys.argv[1:3]\n"
                   "for name in sys.argv[3:]: importlib.import_module(name)\n")
        done = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", program, str(task), str(runtime), *names],
                              capture_output=True, text=True, cwd=task, timeout=300, check=False)
        assert done.returncode == 0, f"{fn}: {done.stderr[-3000:]}"


def test_router_events_get_their_documented_responses(sam):
    # events/http_infer.json: 200, served by the CPU tier, which the router reached through boto3 Invoke
    run = sam("RouterFunction", "http_infer.json")
    assert run.error is None, run.logs[-3000:]
    resp = run.result
    assert resp["statusCode"] == 200, resp["body"]
    assert resp["headers"]["x-served-by"] == "cpu"
    body = _body(resp)
    assert body["model_name"] == "digits" and body["id"] == "demo-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"]["shape"] == [2] and outputs["probabilities"]["shape"] == [2, 10]
    assert sam.api.invocations[-1] == "CpuInferenceFunction"
    # events/http_model_metadata.json and events/http_health_ready.json
    meta = sam("RouterFunction", "http_model_metadata.json").result
    assert meta["statusCode"] == 200 and _body(meta)["inputs"] == [{"name": "input", "datatype": "FP32",
                                                                    "shape": [-1, 64]}]
    assert sam("RouterFunction", "http_health_ready.json").result["statusCode"] == 200


def test_cpu_function_event_gets_its_documented_response(sam):
    run = sam("CpuInferenceFunction", "cpu_direct_infer.json")
    assert run.error is None, run.logs[-3000:]
    assert run.result["statusCode"] == 200 and _body(run.result)["model_name"] == "digits"


def test_batch_events_get_their_documented_responses(sam, services):
    _, s3 = services
    run = sam("BatchInferenceFunction", "sqs_batch.json")
    assert run.error is None, run.logs[-3000:]
    assert run.result == {"batchItemFailures": []}
    success = json.loads(s3.get_object(Bucket=BUCKET, Key="batch/out/digits/demo-job/_SUCCESS")["Body"].read())
    assert success["counts"]["output_lines"] == 16
    assert sam("BatchInferenceFunction", "sqs_job.json").result == {"batchItemFailures": []}
    s3.head_object(Bucket=BUCKET, Key="batch/out/digits/demo-job-from-message/_SUCCESS")
    summary = sam("BatchInferenceFunction", "s3_put.json").result
    assert summary["jobs"][0]["status"] == "completed"


def test_the_old_env_file_fails_in_the_artifact_as_the_issue_reported(sam):
    # events/local-env.json (for `tierserve invoke`) runs the router's CPU tier in-process: its artifact has
    # no onnxruntime, so under `sam local invoke` that file cannot work; sam-env.json is the one for SAM
    run = sam("RouterFunction", "http_infer.json", CPU_BACKEND="inprocess")
    assert run.error is None and run.result["statusCode"] == 500  # answered, never a stack trace to the client
    assert "No module named 'onnxruntime'" in run.logs  # the function's log says why
