"""tierserve_tools.batch: the local batch stack (moto) has the queues template.yaml defines, with its visibility
timeouts and receive counts (issue 19 review, defect 4: a 120 s local timeout redelivered a long generation job
while it ran)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierserve_tools import batch as batch_local
from tierserve_tools.sam import load_template

TEMPLATE = Path(__file__).resolve().parents[3] / "template.yaml"


def _declared(logical_id: str) -> tuple[int, int]:
    props = load_template(TEMPLATE)["Resources"][logical_id]["Properties"]
    return int(props["VisibilityTimeout"]), int(props["RedrivePolicy"]["maxReceiveCount"])


def test_the_template_queues_are_read_from_template_yaml() -> None:
    # Then each local queue takes its template queue's visibility timeout and receive count
    assert batch_local.template_queues(load_template(TEMPLATE)) == {
        "queue_url": _declared("BatchEventsQueue"), "jobs_queue_url": _declared("BatchJobsQueue"),
        "generate_queue_url": _declared("BatchGenerateJobsQueue")}
    assert _declared("BatchGenerateJobsQueue")[0] > 120  # longer than a generation call may take locally


def test_the_local_stack_creates_each_queue_with_the_templates_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto import mock_aws

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        sqs = boto3.client("sqs")
        # When the local stack is created with the template's queue settings
        urls = batch_local.create_local_stack(boto3.client("s3"), boto3.client("dynamodb"), sqs, "bucket", "jobs",
                                              queues=batch_local.template_queues(load_template(TEMPLATE)))
        # Then every queue has them
        for key, logical_id in (("queue_url", "BatchEventsQueue"), ("jobs_queue_url", "BatchJobsQueue"),
                                ("generate_queue_url", "BatchGenerateJobsQueue")):
            attrs = sqs.get_queue_attributes(QueueUrl=urls[key], AttributeNames=["All"])["Attributes"]
            got = (int(attrs["VisibilityTimeout"]), int(json.loads(attrs["RedrivePolicy"])["maxReceiveCount"]))
            assert got == _declared(logical_id), key
