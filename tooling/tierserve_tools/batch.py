"""Local wiring for ``tierserve serve``: S3 -> SQS notifications in moto_server, and an SQS poller
that plays Lambda's event source mapping (real SQS event shape, ReportBatchItemFailures)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable
from typing import Any

from tierserve.batch.locations import INPUT_PREFIX
from tierserve.observability import logger


def queue_arn(sqs_client: Any, queue_url: str) -> str:
    return sqs_client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def wire_local_notifications(s3_client: Any, sqs_client: Any, bucket: str, queue_url: str) -> None:
    """Send ``s3:ObjectCreated:*`` under ``batch/in/`` in ``bucket`` to the queue (as template.yaml does).

    S3 first delivers an ``s3:TestEvent``; the batch function acknowledges and ignores it."""
    s3_client.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={"QueueConfigurations": [{
            "Id": "tierserve-batch-in",
            "QueueArn": queue_arn(sqs_client, queue_url),
            "Events": ["s3:ObjectCreated:*"],
            "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": INPUT_PREFIX}]}},
        }]},
    )


def sqs_event(messages: list[dict[str, Any]], arn: str, region: str) -> dict[str, Any]:
    """The event Lambda's SQS event source mapping would deliver for ``messages``."""
    records = []
    for m in messages:
        records.append({
            "messageId": m["MessageId"],
            "receiptHandle": m["ReceiptHandle"],
            "body": m["Body"],
            "attributes": dict(m.get("Attributes", {})),
            "messageAttributes": m.get("MessageAttributes", {}),
            "md5OfBody": m.get("MD5OfBody") or hashlib.md5(m["Body"].encode()).hexdigest(),  # noqa: S324
            "eventSource": "aws:sqs",
            "eventSourceARN": arn,
            "awsRegion": region,
        })
    return {"Records": records}


def poll_once(sqs_client: Any, queue_url: str, handler: Callable[[dict, Any], Any], context: Any = None,
              batch_size: int = 10, wait_s: int = 1) -> tuple[int, int]:
    """Receive one batch, invoke ``handler``, delete the messages it did not report as failed.

    Failed messages are left alone: they become visible again after the visibility timeout, and
    the queue's redrive policy moves them to its DLQ after ``maxReceiveCount`` receives.
    Returns (received, failed)."""
    got = sqs_client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=batch_size, WaitTimeSeconds=wait_s,
                                     AttributeNames=["All"], MessageAttributeNames=["All"])
    messages = got.get("Messages", [])
    if not messages:
        return 0, 0
    arn = queue_arn(sqs_client, queue_url)
    event = sqs_event(messages, arn, arn.split(":")[3])
    try:
        result = handler(event, context) or {}
        failed = {f["itemIdentifier"] for f in result.get("batchItemFailures", [])}
    except Exception:
        logger.exception("batch handler raised; the whole batch will be retried")
        failed = {m["MessageId"] for m in messages}
    done = [m for m in messages if m["MessageId"] not in failed]
    if done:
        sqs_client.delete_message_batch(QueueUrl=queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)])
    return len(messages), len(failed)


def poll_queue_forever(queue_url: str, handler: Callable[[dict, Any], Any], stop_event: threading.Event,
                       sqs_client: Any = None, context_factory: Callable[[], Any] | None = None,
                       wait_s: int = 1, batch_size: int = 10) -> None:
    """Poll ``queue_url`` until ``stop_event`` is set, invoking ``handler`` like Lambda's SQS trigger."""
    if sqs_client is None:
        import boto3

        sqs_client = boto3.client("sqs")
    if context_factory is None:
        from tierserve_tools.emulation import LocalContext

        def context_factory() -> Any:
            return LocalContext("BatchInferenceFunction", 3538, 900)

    while not stop_event.is_set():
        try:
            poll_once(sqs_client, queue_url, handler, context_factory(), batch_size=batch_size, wait_s=wait_s)
        except Exception:
            logger.exception("polling the batch queue failed; retrying")
            stop_event.wait(1.0)


#: The local stack's queues (``create_local_stack``'s keys) and the template.yaml queues they stand for.
TEMPLATE_QUEUES = {"queue_url": "BatchEventsQueue", "jobs_queue_url": "BatchJobsQueue",
                   "generate_queue_url": "BatchGenerateJobsQueue"}


def template_queues(template: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(VisibilityTimeout, maxReceiveCount) of each batch queue template.yaml defines, by ``create_local_stack``'s
    key, so that the local queues redeliver as the deployed ones do (a job message stays hidden while its function
    may still run it). A queue the template leaves out, or whose values are not plain numbers, is left out."""
    resources = template.get("Resources") or {}
    out: dict[str, tuple[int, int]] = {}
    for key, logical_id in TEMPLATE_QUEUES.items():
        props = (resources.get(logical_id) or {}).get("Properties") or {}
        redrive = props.get("RedrivePolicy") or {}
        with contextlib.suppress(KeyError, TypeError, ValueError):
            out[key] = (int(props["VisibilityTimeout"]), int(redrive["maxReceiveCount"]))
    return out


def create_local_stack(s3_client: Any, dynamodb_client: Any, sqs_client: Any, bucket: str, table: str,
                       queue_name: str = "tierserve-batch-events", max_receive_count: int = 5,
                       visibility_timeout_s: int = 30,
                       queues: dict[str, tuple[int, int]] | None = None) -> dict[str, str]:
    """The batch resources template.yaml defines, in moto_server: bucket, JobTable, and three queues, each with its
    DLQ: the S3 events, BatchInferenceFunction's jobs, and BatchGenerateFunction's jobs (BatchGenerateJobsQueue:
    the OpenAI batch jobs BatchInferenceFunction hands over, issue 19). ``queues`` gives a queue (by the key below)
    its (visibility timeout, receive count), as ``template_queues`` reads them; the others get
    ``visibility_timeout_s`` and ``max_receive_count``.

    Returns {"queue_url", "dlq_url", "jobs_queue_url", "jobs_dlq_url", "generate_queue_url", "generate_dlq_url"}.
    Idempotent enough for repeated local runs."""
    import json

    s3_client.create_bucket(Bucket=bucket)
    with contextlib.suppress(dynamodb_client.exceptions.ResourceInUseException):
        dynamodb_client.create_table(TableName=table, KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                                     AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                                     BillingMode="PAY_PER_REQUEST")
    urls = {}
    for name, key in ((queue_name, "queue_url"), (f"{queue_name}-jobs", "jobs_queue_url"),
                      (f"{queue_name}-generate", "generate_queue_url")):
        visibility, receives = (queues or {}).get(key, (visibility_timeout_s, max_receive_count))
        dlq = sqs_client.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
        url = sqs_client.create_queue(QueueName=name, Attributes={
            "VisibilityTimeout": str(visibility),
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": queue_arn(sqs_client, dlq),
                                         "maxReceiveCount": str(receives)}),
        })["QueueUrl"]
        urls[key] = url
        urls["dlq_url" if key == "queue_url" else key.replace("queue_url", "dlq_url")] = dlq
    return urls
