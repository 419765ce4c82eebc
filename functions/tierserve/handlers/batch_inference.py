"""BatchInferenceFunction: S3 ObjectCreated notifications and job messages, from SQS.

Thin by design: Powertools decorators, then one call into the shared runtime
(``tierserve.batch.service``), which reports partial batch failures and keeps every job
exactly-once and resumable.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve.batch.service import handle_event
from tierserve.observability import logger, metrics, tracer


@logger.inject_lambda_context(log_event=False)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return handle_event(event, context)
