"""A warm Lambda execution environment for `tierserve serve`: one process, one function.

Reads one JSON request per line on stdin ({"event": ..., "timeout_s": ...}) and writes one JSON
line per result on its original stdout: {"result": ...} or {"error": {"errorMessage", "errorType"}}.
Everything the function prints (logs, EMF metrics) goes to stderr, as in Lambda. The handler module
is imported once (cold start) and reused for every invocation (warm), exactly like Lambda.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


def main() -> int:
    handler_path = sys.argv[1]
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    module_name, _, func_name = handler_path.rpartition(".")
    handler = getattr(importlib.import_module(module_name), func_name)
    from tierserve.local._child import LocalContext

    name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "function")
    memory = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"))
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        ctx = LocalContext(name, memory, int(req.get("timeout_s") or os.environ.get("AWS_LAMBDA_FUNCTION_TIMEOUT", 3)))
        try:
            reply = {"result": handler(req["event"], ctx)}
        except Exception as exc:  # what Lambda reports as an unhandled function error
            traceback.print_exc()
            reply = {"error": {"errorMessage": str(exc), "errorType": type(exc).__name__}}
        out.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
