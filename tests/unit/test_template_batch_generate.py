"""template.yaml's BatchGenerateFunction (issue 19: batch generation deployed): its queue and DLQ like the other batch
queues, its build target and package (no pyarrow, no tritonclient), its environment parsed by the runtime's own
settings (its continuations on its own queue, no hand-off onward), least privilege, and BatchInferenceFunction handing
it OpenAI batch jobs (its queue in the environment, SendMessage on it and nothing more); the new DLQ and function in
the batch alarms and the dashboard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierserve.settings import parse_settings
from tierserve_tools.sam import load_template

ROOT = Path(__file__).resolve().parents[1].parent
FN, QUEUE, DLQ = "BatchGenerateFunction", "BatchGenerateJobsQueue", "BatchGenerateJobsDLQ"


@pytest.fixture(scope="module")
def template() -> dict:
    return load_template(ROOT / "template.yaml")


def _fn(template: dict, name: str = FN) -> dict:
    return template["Resources"][name]["Properties"]


def _statements(props: dict) -> list[dict]:
    return [st for p in props["Policies"] if isinstance(p, dict) and "Statement" in p for st in p["Statement"]]


def _sqs_sends(props: dict) -> list:
    return [p["SQSSendMessagePolicy"]["QueueName"] for p in props["Policies"]
            if isinstance(p, dict) and "SQSSendMessagePolicy" in p]


def test_its_queue_redrives_to_a_dlq_after_5_receives_and_outlives_six_timeouts(template) -> None:
    res = template["Resources"]
    queue = res[QUEUE]["Properties"]
    assert queue["RedrivePolicy"] == {"deadLetterTargetArn": {"Fn::GetAtt": [DLQ, "Arn"]}, "maxReceiveCount": 5}
    assert queue["VisibilityTimeout"] == 6 * _fn(template)["Timeout"] == 6 * 900
    assert queue["SqsManagedSseEnabled"] is True and res[DLQ]["Properties"]["SqsManagedSseEnabled"] is True
    # the same settings as BatchJobsQueue's
    jobs = res["BatchJobsQueue"]["Properties"]
    assert (queue["VisibilityTimeout"], queue["RedrivePolicy"]["maxReceiveCount"]) == \
        (jobs["VisibilityTimeout"], jobs["RedrivePolicy"]["maxReceiveCount"])
    assert template["Outputs"]["BatchGenerateJobsQueueUrl"]["Value"] == {"Ref": QUEUE}


def test_it_is_built_like_the_others_from_its_own_requirements_without_pyarrow_or_tritonclient(template) -> None:
    from tierserve_tools.lambda_build import parse_requirements_map

    res = template["Resources"][FN]
    props = res["Properties"]
    assert res["Metadata"]["BuildMethod"] == "makefile"
    assert props["Handler"] == "tierserve.handlers.batch_generate.lambda_handler" and props["Timeout"] == 900
    globals_ = template["Globals"]["Function"]
    assert props.get("Runtime", globals_["Runtime"]) == "python3.12"
    assert props.get("Architectures", globals_["Architectures"]) == ["arm64"]
    # MemorySize: a parameter, 10,240 MB (6 vCPUs) by default
    param = template["Parameters"]["BatchGenerateMemorySize"]
    assert props["MemorySize"] == {"Ref": "BatchGenerateMemorySize"} and param["Default"] == 10240
    assert param["MaxValue"] == 10240 and parse_settings(
        {"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(param["Default"])}).intra_op_threads == 6
    text = (ROOT / "functions" / "Makefile").read_text()
    block = text.split("REQUIREMENTS :=", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    requirements = (ROOT / "functions" / parse_requirements_map(block)["tierserve.handlers.batch_generate"])
    names = {ln.split("#")[0].strip().split(">")[0].split("[")[0].split("=")[0].strip().lower()
             for ln in requirements.read_text().splitlines() if ln.split("#")[0].strip()}
    assert {"onnxruntime-genai", "tokenizers", "jinja2", "onnxruntime", "numpy", "orjson"} <= names
    assert not names & {"pyarrow", "tritonclient"}


def test_its_handler_imports_neither_pyarrow_nor_tritonclient_at_import() -> None:
    """What BatchGenerateFunction's handler can reach may name pyarrow (Parquet) and tritonclient (the GPU tier) in
    functions that run only for those; nothing imports them at module level (the package holds neither)."""
    import ast

    from tierserve_tools.reach import reachable

    found = reachable(ROOT / "functions", "tierserve.handlers.batch_generate.lambda_handler")
    assert {"onnxruntime_genai", "tokenizers", "jinja2"} <= found.third_party
    for name, path in found.modules.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only (the imports that run when the module is imported)
            if isinstance(node, ast.Import | ast.ImportFrom):
                tops = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not [t for t in tops if t.split(".")[0] in ("pyarrow", "tritonclient")], name


def test_its_environment_keeps_its_jobs_on_its_own_queue_and_hands_nothing_on(template) -> None:
    env = _fn(template)["Environment"]["Variables"]
    assert env["CONTINUATION_QUEUE_URL"] == {"Ref": QUEUE} and "GENERATION_JOBS_QUEUE_URL" not in env
    assert env["JOB_TABLE"] == {"Ref": "JobTable"} and env["GPU_BACKEND"] == "none"
    rendered = {k: v for k, v in env.items() if isinstance(v, str)}
    rendered.update({"JOB_TABLE": "tierserve-JobTable", "CONTINUATION_QUEUE_URL":
                     "https://sqs.us-east-1.amazonaws.com/123456789012/tierserve-BatchGenerateJobsQueue"})
    settings = parse_settings(rendered)  # the runtime's own parser accepts it
    assert settings.generation_jobs_queue_url == "" and settings.gpu_backend == "none"


def test_it_takes_one_message_at_a_time_with_partial_failures_and_a_concurrency_cap(template) -> None:
    events = _fn(template)["Events"]
    assert list(events) == ["GenerateJobs"]
    sqs = events["GenerateJobs"]
    assert sqs["Type"] == "SQS" and sqs["Properties"]["Queue"] == {"Fn::GetAtt": [QUEUE, "Arn"]}
    assert sqs["Properties"]["BatchSize"] == 1
    assert sqs["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert sqs["Properties"]["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "BatchGenerateConcurrency"}}
    reserved = _fn(template)["ReservedConcurrentExecutions"]["Fn::If"]
    assert reserved[:2] == ["HasBatchGenerateReservedConcurrency", {"Ref": "BatchGenerateReservedConcurrency"}]
    assert template["Parameters"]["BatchGenerateReservedConcurrency"]["Default"] == -1


def test_it_has_least_privilege(template) -> None:
    props = _fn(template)
    batch = _fn(template, "BatchInferenceFunction")
    # the same S3 statements as BatchInferenceFunction: read models and batch/in, write batch/out and batch/work
    assert _statements(props) == [st for st in _statements(batch) if st.get("Sid") != "InvokeTheGpuEndpointOnly"]
    actions = {a for st in _statements(props) for a in ([st["Action"]] if isinstance(st["Action"], str)
                                                          else st["Action"])}
    assert actions == {"s3:GetObject", "s3:GetObjectVersion", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"}
    managed = [next(iter(p)) for p in props["Policies"] if isinstance(p, dict) and "Statement" not in p]
    assert sorted(managed) == ["DynamoDBCrudPolicy", "SQSSendMessagePolicy"]
    assert [p["DynamoDBCrudPolicy"]["TableName"] for p in props["Policies"] if "DynamoDBCrudPolicy" in p] == \
        [{"Ref": "JobTable"}]
    assert _sqs_sends(props) == [{"Fn::GetAtt": [QUEUE, "QueueName"]}]  # its own queue only
    assert "VpcConfig" not in props  # it never calls the GPU tier


def test_batch_inference_function_hands_it_openai_jobs_and_may_send_to_its_queue_only(template) -> None:
    batch = _fn(template, "BatchInferenceFunction")
    assert batch["Environment"]["Variables"]["GENERATION_JOBS_QUEUE_URL"] == {"Ref": QUEUE}
    assert _sqs_sends(batch) == [{"Fn::GetAtt": ["BatchJobsQueue", "QueueName"]},
                                 {"Fn::GetAtt": [QUEUE, "QueueName"]}]


def _metric_values(alarm: dict) -> list:
    return [d["Value"] for m in alarm["Properties"]["Metrics"] if "MetricStat" in m
            for d in m["MetricStat"]["Metric"]["Dimensions"]]


def test_the_batch_alarms_and_the_dashboard_watch_it(template) -> None:
    res = template["Resources"]
    assert {"Fn::GetAtt": [DLQ, "QueueName"]} in _metric_values(res["BatchDeadLettersAlarm"])
    assert {"Ref": FN} in _metric_values(res["BatchJobFailuresAlarm"])
    assert {"Ref": "BatchInferenceFunction"} in _metric_values(res["BatchJobFailuresAlarm"])
    assert {"Ref": FN} in _metric_values(res["ThrottlesAlarm"])
    for name in ("BatchDeadLettersAlarm", "BatchJobFailuresAlarm", "ThrottlesAlarm"):
        metrics = res[name]["Properties"]["Metrics"]
        expression = next(m["Expression"] for m in metrics if "Expression" in m)
        ids = {m["Id"] for m in metrics if "MetricStat" in m}
        assert set(expression.replace("+", " ").split()) == ids, name  # every metric counts
    body = res["OperationsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    batch_row = next(w for w in json.loads(body)["widgets"] if w["properties"]["title"].startswith("Batch:"))
    assert ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", f"${{{DLQ}.QueueName}}",
            {"stat": "Maximum"}] in batch_row["properties"]["metrics"]
    assert f"${{{FN}}}" in body
