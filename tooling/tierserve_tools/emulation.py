"""What every piece of the local emulation shares: a Lambda context, a function's Lambda
environment, and free loopback ports.

Developer tooling only: nothing under ``tierserve/local`` ships in a Lambda package
(``functions/Makefile`` strips it, and a test checks that no shipped module imports it).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any

#: Variables a function's environment never inherits from the developer's shell.
LAMBDA_PREFIXES = ("POWERTOOLS_", "AWS_LAMBDA_")


class LocalContext:
    """The attributes of a real LambdaContext that handlers and Powertools use."""

    def __init__(self, name: str, memory_mb: int, timeout_s: float) -> None:
        self.function_name = name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = memory_mb
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{name}"
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{name}"
        self.log_stream_name = "local"
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def context_from_env(timeout_s: float | None = None) -> LocalContext:
    """A context for the function this process runs, from its Lambda environment variables."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("AWS_LAMBDA_FUNCTION_TIMEOUT", "3"))
    return LocalContext(os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "function"),
                        int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")), timeout_s)


def lambda_environment(logical_id: str, memory_mb: int, timeout_s: int, environment: dict[str, str],
                       code_uri: Any = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a function runs with: the caller's (minus Lambda/Powertools variables), the
    variables Lambda itself sets, then the function's own from template.yaml and overrides."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(LAMBDA_PREFIXES)}
    env.update({
        "AWS_LAMBDA_FUNCTION_NAME": logical_id,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
        "AWS_LAMBDA_FUNCTION_TIMEOUT": str(timeout_s),
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_SAM_LOCAL": "true",  # Powertools Tracer disables itself locally
        "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    })
    env.update(environment)
    if code_uri is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code_uri), os.environ.get("PYTHONPATH", "")]))
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
