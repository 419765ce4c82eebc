"""CpuInferenceFunction: runs a model on onnxruntime in this function (the CPU tier).

The router invokes it with the payload in events/cpu_direct_infer.json, or a generation (``{"generate": ...}``)
with InvokeWithResponseStream: then the answer is a ``StreamingResponse`` that the streaming runtime loop
(``AWS_LAMBDA_EXEC_WRAPPER``) sends chunk by chunk. Thin by design.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve.app import preload_models
from tierserve.direct import handle_direct
from tierserve.observability import logger, metrics, tracer
from tierserve.streaming.response import StreamingResponse

preload_models()  # PRELOAD_MODELS (provisioned concurrency, SnapStart): this class's models load during init


@logger.inject_lambda_context(log_event=False)
@tracer.capture_lambda_handler(capture_response=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any] | StreamingResponse:
    return handle_direct(event, context)
