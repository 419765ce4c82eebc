"""tierserve_tools.bench.cold_start_s3's generation boot program (GENERATE_BOOT: artifact.BOOT_PRELUDE, then the
handler's stream read and timed): what a streaming handler sees in it and what the bench gets back.

The figure itself needs a built artifact and a generative model (docs); here a one-file artifact stands in."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.boot_artifact import one_file_artifact
from tierserve_tools.bench.cold_start_s3 import _generate_cold

HANDLER = '''
import json, os

class Answer:
    status = 200
    def __init__(self, lines):
        self.chunks = iter(lines)
        self.released = False
    def release(self):
        self.released = True

def handler(event, context):
    assert os.environ["TIERSERVE_STREAMING_RUNTIME"] == "1"
    seen = {"cwd": os.getcwd(), "name": context.function_name, "prompt": event["generate"]["prompt"],
            "remaining": context.get_remaining_time_in_millis() > 0}
    return Answer([json.dumps({"token": "a"}).encode() + b"\\n", json.dumps({"done": seen}).encode() + b"\\n"])

def buffered(event, context):
    return {"statusCode": 500, "body": "no stream"}
'''


@pytest.fixture
def task(tmp_path: Path) -> Path:
    return one_file_artifact(tmp_path, HANDLER)[0]


def test_a_streamed_answer_is_timed_and_its_last_event_returned(task: Path) -> None:
    out = _generate_cold(task, task.parent / "runtime", "app.handler", {"generate": {"prompt": "hi"}},
                         {"AWS_LAMBDA_FUNCTION_NAME": "CpuInferenceFunction"}, timeout_s=30)
    assert out["status"] == 200
    assert out["events"] == [{"done": {"cwd": str(task), "name": "CpuInferenceFunction", "prompt": "hi",
                                       "remaining": True}}]
    assert 0 <= out["first_token_s"] <= out["all_s"] and out["init_s"] >= 0


def test_a_buffered_answer_fails_the_run(task: Path) -> None:
    with pytest.raises(SystemExit, match="not streamed"):
        _generate_cold(task, task.parent / "runtime", "app.buffered", {"generate": {"prompt": "hi"}}, {},
                       timeout_s=30)
