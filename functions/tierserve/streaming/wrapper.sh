#!/bin/sh
# AWS_LAMBDA_EXEC_WRAPPER for the managed python3.12 runtime (issue 17): Lambda runs this script with the
# interpreter's path and the managed bootstrap's arguments; we keep the interpreter and start our own
# Runtime API loop (tierserve.streaming.runtime_loop), which can stream a handler's answer. The handler is
# the function's Handler setting (_HANDLER), as with the managed bootstrap.
set -eu
interpreter="${1:-python3}"
export PYTHONPATH="${LAMBDA_TASK_ROOT:-/var/task}${PYTHONPATH:+:$PYTHONPATH}"
exec "$interpreter" -m tierserve.streaming.runtime_loop
