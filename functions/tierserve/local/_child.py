"""Child process of `tierserve invoke`: import the handler cold, call it once, print the response."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import uuid


class LocalContext:
    """The attributes of a real LambdaContext that handlers and Powertools use."""

    def __init__(self, name: str, memory_mb: int, timeout_s: int) -> None:
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


def main() -> int:
    handler_path, event_path = sys.argv[1], sys.argv[2]
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # everything the function prints (logs, EMF metrics) goes to stderr, as with SAM
    sys.stdout = sys.stderr
    module_name, _, func_name = handler_path.rpartition(".")
    with open(event_path) as f:
        event = json.load(f)
    handler = getattr(importlib.import_module(module_name), func_name)
    ctx = LocalContext(os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "function"),
                       int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")),
                       int(os.environ.get("AWS_LAMBDA_FUNCTION_TIMEOUT", "3")))
    try:
        result = handler(event, ctx)
    except Exception as exc:  # what Lambda reports for an unhandled error
        import traceback

        traceback.print_exc()
        result = {"errorMessage": str(exc), "errorType": type(exc).__name__}
        os.write(real_stdout, (json.dumps(result) + "\n").encode())
        return 1
    os.write(real_stdout, (json.dumps(result) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
