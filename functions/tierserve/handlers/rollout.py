"""RolloutFunction: advances every running rollout by one tick, on an EventBridge schedule (every minute).

Thin by design: the state machine, its DynamoDB state and the CloudWatch figures live in
``tierserve.lifecycle.rollout``.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from tierserve.lifecycle.rollout import run_scheduled
from tierserve.observability import logger
from tierserve.settings import get_settings


@logger.inject_lambda_context(log_event=False)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return run_scheduled(get_settings())
