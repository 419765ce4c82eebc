"""In-process AWS (moto.mock_aws) with the batch resources, and the digits model in a local store (and the tiny
compiled Llama, ``genai_store``, for batch generation)."""

from __future__ import annotations

import pytest

from tests.support.batch_aws import BUCKET, TABLE, mocked_batch_aws
from tests.support.genai_store import genai_store, genai_validation, tiny_llama_hf  # noqa: F401 (test_generate)
from tierserve.batch import runner as batch_runner
from tierserve.manifest import Manifest

__all__ = ["BUCKET", "TABLE"]


@pytest.fixture
def aws(runtime_env, digits_store):
    with mocked_batch_aws(runtime_env, digits_store, CHUNK_ROWS="4", COLUMNAR_CHUNK_ROWS="4") as clients:
        yield clients
    batch_runner.after_part_hook = None


@pytest.fixture(scope="module")
def digits(digits_store):
    """The digits model's manifest entry (input FP32 [-1, 64])."""
    return Manifest.loads((digits_store / "manifest.json").read_text()).resolve("digits")
