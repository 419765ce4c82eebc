"""A function's execution environment in its own interpreter: import the handler once, then invoke it.

    python -m tierserve_tools.worker HANDLER --event EVENT.json   # one cold invocation (tierserve invoke)
    python -m tierserve_tools.worker HANDLER                      # warm: one JSON request per stdin line

Everything the function prints (logs, EMF metrics) goes to stderr, as Lambda sends it to CloudWatch;
stdout carries only the replies. A reply is ``{"result": ...}`` or, when the handler raised,
``{"error": {"errorMessage", "errorType", "stackTrace"}}`` as Lambda reports an unhandled error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from tierserve_tools.emulation import context_from_env


def _call(handler: Callable[[Any, Any], Any], event: Any, timeout_s: float | None) -> dict[str, Any]:
    try:
        return {"result": handler(event, context_from_env(timeout_s))}
    except Exception as exc:
        traceback.print_exc()
        return {"error": {"errorMessage": str(exc), "errorType": type(exc).__name__,
                          "stackTrace": traceback.format_exception(exc)[-5:]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tierserve_tools.worker")
    ap.add_argument("handler", help="module.function, e.g. tierserve.handlers.router.lambda_handler")
    ap.add_argument("--event", help="invoke once with this event file and exit")
    args = ap.parse_args(argv)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    module_name, _, func_name = args.handler.rpartition(".")
    handler = getattr(importlib.import_module(module_name), func_name)
    if args.event:
        from tierserve_tools.lambda_endpoint import (
            MAX_PAYLOAD_BYTES,
            MAX_RESPONSE_BYTES,
            request_too_large,
            response_too_large,
        )

        with open(args.event, "rb") as f:
            raw = f.read()
        if len(raw) > MAX_PAYLOAD_BYTES:  # Lambda refuses the event before the handler runs
            out.write(json.dumps(request_too_large(len(raw))) + "\n")
            return 1
        reply = _call(handler, json.loads(raw), None)
        text = json.dumps(reply.get("result", reply.get("error")))
        if "result" in reply and len(text.encode()) > MAX_RESPONSE_BYTES:  # ... and drops a result too large
            text = json.dumps(response_too_large(len(text.encode())))
            reply = {"error": text}
        out.write(text + "\n")
        return 0 if "result" in reply else 1
    out.write('{"ready": true}\n')
    for line in sys.stdin:
        req = json.loads(line)
        out.write(json.dumps(_call(handler, req["event"], float(req.get("timeout_s") or 3))) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
