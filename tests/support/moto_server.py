"""A real moto_server for integration tests (the same one `tierserve serve` runs)."""

from __future__ import annotations

import os

from tierserve_tools.emulation import free_port
from tierserve_tools.moto import moto_server_command, running_moto_server

__all__ = ["aws_test_env", "free_port", "moto_server_command", "running_moto_server"]


def aws_test_env(endpoint: str) -> dict[str, str]:
    """Environment for boto3 clients that must talk to the moto_server at ``endpoint``."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        **{k: v for k, v in os.environ.items() if k == "PATH"},
    }
