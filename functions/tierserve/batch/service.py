"""BatchInferenceFunction's entry point: SQS batches (S3 notifications or job messages) or S3 events.

Why: SQS delivers at least once and a batch may hold a poison record; this module turns each delivery
into at most one run of its job, and one bad record into one failed item, not a failed batch.

- SQS (what template.yaml wires): Powertools ``BatchProcessor`` + ``process_partial_response``;
  a record that fails (poison, or a duplicate still in progress) is reported alone in
  ``batchItemFailures``, so SQS retries just that one and, after ``maxReceiveCount``, moves it
  to the queue's DLQ.
- S3's ``s3:TestEvent`` (sent when the notification is configured) is acknowledged and ignored.
- A direct S3 event (``tierserve invoke ... -e events/s3_put.json``) runs its jobs and returns
  their summaries.

Exactly once: each job start runs under Powertools idempotency (DynamoDB, JOB_TABLE). The key is
bucket + key + versionId (or eTag) for S3 records, the body's hash for job messages (a
continuation message carries its part number, so each one is distinct). A redelivery gets the
stored result back and writes nothing; a delivery that arrives while the first is still running
raises ``IdempotencyAlreadyInProgressError``, which makes that record a failed item.
"""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from tierserve import telemetry
from tierserve.app import get_runtime
from tierserve.batch.locations import BatchInputError
from tierserve.batch.runner import run_job
from tierserve.batch.spec import JobSpec, job_from_message, job_from_s3_record
from tierserve.errors import ConfigurationError
from tierserve.observability import logger
from tierserve.settings import Settings

_idem: tuple[Settings, Any, Any] | None = None  # (settings, idempotent runner, config)


def _idempotent_runner() -> tuple[Any, Any]:
    """The idempotent job runner for the current settings (built once per execution environment)."""
    global _idem
    runtime = get_runtime()
    settings = runtime.settings
    if _idem is not None and _idem[0] is settings:
        return _idem[1], _idem[2]
    if not settings.job_table:
        raise ConfigurationError("JOB_TABLE is not set: batch jobs need the JobTable for idempotency and job state")
    from aws_lambda_powertools.utilities.idempotency import (
        DynamoDBPersistenceLayer,
        IdempotencyConfig,
        idempotent_function,
    )

    persistence = DynamoDBPersistenceLayer(table_name=settings.job_table, key_attr="id",
                                           expiry_attr="expiration", boto3_client=runtime.aws("dynamodb"))
    config = IdempotencyConfig(event_key_jmespath="idempotency_key", raise_on_no_idempotency_key=True,
                               expires_after_seconds=settings.idempotency_expiry_s)

    @idempotent_function(data_keyword_argument="job", persistence_store=persistence, config=config)
    def run_once(job: dict[str, Any], context: Any = None) -> dict[str, Any]:
        return run_job(JobSpec.from_json(job), context)

    _idem = (settings, run_once, config)
    return run_once, config


def _run(spec: JobSpec, context: Any) -> dict[str, Any]:
    run_once, _ = _idempotent_runner()
    # The idempotency key is computed from the delivery, not from the job spec's JSON.
    job = spec.to_json()
    try:
        return run_once(job=job, context=context)
    except Exception:
        telemetry.batch_job_failed()
        logger.exception("batch job failed", extra={"input": spec.input.uri, "output": spec.output.uri})
        raise


def specs_from_body(body: str) -> list[JobSpec]:
    """The jobs an SQS message body asks for: an S3 notification's records, or one job message.
    Empty for S3's ``s3:TestEvent``."""
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise BatchInputError(f"message body is not JSON ({exc}); expected an S3 event or a job message") from exc
    if isinstance(obj, dict) and obj.get("Event") == "s3:TestEvent":
        return []
    if isinstance(obj, dict) and isinstance(obj.get("Records"), list):
        specs = []
        for rec in obj["Records"]:
            if not str(rec.get("eventName", "")).startswith("ObjectCreated"):
                logger.info("ignoring S3 event", extra={"eventName": rec.get("eventName")})
                continue
            specs.append(job_from_s3_record(rec))
        return specs
    return [job_from_message(obj)]


def handle_event(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Serve one BatchInferenceFunction event (SQS batch or direct S3 event)."""
    _, config = _idempotent_runner()
    config.register_lambda_context(context)
    records = event.get("Records") if isinstance(event, dict) else None
    if records and all(r.get("eventSource") == "aws:s3" for r in records):
        return {"jobs": [_run(job_from_s3_record(r), context) for r in records
                         if str(r.get("eventName", "")).startswith("ObjectCreated")]}

    def record_handler(record: SQSRecord) -> list[dict[str, Any]]:
        results = []
        for spec in specs_from_body(record.body):
            results.append(_run(spec, context))
        if not results:
            logger.info("acknowledged S3 test event", extra={"messageId": record.message_id})
        return results

    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    return dict(process_partial_response(event=event, record_handler=record_handler, processor=processor,
                                          context=context))
