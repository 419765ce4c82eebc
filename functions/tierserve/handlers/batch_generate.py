"""BatchGenerateFunction: OpenAI batch jobs (batch generation, issue 19) that BatchInferenceFunction hands over.

Why a function of its own: BatchInferenceFunction's package (pyarrow, tritonclient, onnxruntime: 237 MB of
Lambda's 250 MB unzipped) has no room for onnxruntime-genai, tokenizers and jinja2. This one ships those and none
of pyarrow and tritonclient (``functions/requirements-batch-generate.txt``). BatchInferenceFunction keeps
receiving every S3 event and job message; with ``GENERATION_JOBS_QUEUE_URL`` set it sends an OpenAI batch job here
as a job message (``tierserve.batch.generate.hand_off``) and its continuations and shards stay on this function's
own queue (``CONTINUATION_QUEUE_URL``).

Thin by design, like ``batch_inference``: Powertools decorators, then the same ``tierserve.batch.service``, so a
job keeps every guarantee (exactly-once per object version, checkpoints, continuation, shards, partial failures).
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
