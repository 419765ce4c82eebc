"""tierserve_tools.artifact's isolated boot program (BOOT, its BOOT_PRELUDE): what a handler sees in it.

The artifact builds and the template's events through it are tests/integration/test_sam_artifacts.py; here a
one-file artifact shows the prelude's part: argv, sys.path, working directory, the Lambda context, the event."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.boot_artifact import one_file_artifact
from tierserve.errors import ConfigurationError
from tierserve_tools.artifact import invoke

HANDLER = '''
import os, sys

def handler(event, context):
    print("a log line")  # the function's prints are its logs, not its result
    return {"event": event, "cwd": os.getcwd(), "path": sys.path[:2], "name": context.function_name,
            "memory": context.memory_limit_in_mb, "arn": context.invoked_function_arn,
            "remaining_ms": context.get_remaining_time_in_millis()}

def fails(event, context):
    raise ValueError("no such model")

def writes(event, context):
    open("created.txt", "w").write("x")
'''
ENV = {"AWS_LAMBDA_FUNCTION_NAME": "CpuInferenceFunction", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1769",
       "AWS_LAMBDA_FUNCTION_TIMEOUT": "30"}


@pytest.fixture
def task(tmp_path: Path) -> Path:
    return one_file_artifact(tmp_path, HANDLER)[0]


def test_the_handler_runs_in_the_artifact_with_a_lambda_context(task: Path) -> None:
    got = invoke(task, task.parent / "runtime", "app.handler", {"x": [1, 2]}, ENV, timeout_s=30)
    assert got.error is None, got.logs
    r = got.result
    assert r["event"] == {"x": [1, 2]}
    assert r["cwd"] == str(task.resolve())
    assert r["path"] == [str(task.resolve()), str(task.parent.resolve() / "runtime")]
    assert (r["name"], r["memory"]) == ("CpuInferenceFunction", 1769)
    assert r["arn"] == "arn:aws:lambda:us-east-1:123456789012:function:CpuInferenceFunction"
    assert 0 < r["remaining_ms"] <= 30_000
    assert "a log line" in got.logs and set(got.timings) == {"init_s", "invoke_s"}


def test_an_exception_is_lambdas_error_shape(task: Path) -> None:
    got = invoke(task, task.parent / "runtime", "app.fails", {}, ENV, timeout_s=30)
    assert got.result is None
    assert got.error == {"errorMessage": "no such model", "errorType": "ValueError"}


def test_a_write_into_the_artifact_fails_the_run(task: Path) -> None:
    with pytest.raises(ConfigurationError, match="read-only"):
        invoke(task, task.parent / "runtime", "app.writes", {}, ENV, timeout_s=30)
