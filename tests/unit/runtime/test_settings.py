"""Typed, frozen settings parsed from the environment; a bad value names its variable."""

from __future__ import annotations

import pytest

from tierserve import errors
from tierserve.settings import parse_settings


def test_settings_parse_types_and_derive_threads_from_memory():
    s = parse_settings({"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3538", "MAX_PAYLOAD_BYTES": "1000",
                        "TRITON_TIMEOUT_S": "2.5"})
    assert (s.memory_mb, s.max_payload_bytes, s.triton_timeout_s, s.intra_op_threads) == (3538, 1000, 2.5, 2)
    assert parse_settings({}).intra_op_threads == 1


@pytest.mark.parametrize("env,needle", [
    ({"MAX_PAYLOAD_BYTES": "lots"}, "MAX_PAYLOAD_BYTES"),
    ({"MAX_PAYLOAD_BYTES": "-1"}, "must be positive"),
    ({"CPU_BACKEND": "gpu"}, "expected one of lambda, inprocess"),
    ({"CPU_BACKEND": "lambda"}, "CPU_FUNCTION_NAME"),
    ({"COLUMNAR_CHUNK_ROWS": "0"}, "COLUMNAR_CHUNK_ROWS=0 must be positive"),
])
def test_bad_settings_name_the_variable(env, needle):
    with pytest.raises(errors.ConfigurationError, match=needle):
        parse_settings(env)


def test_the_manifest_is_reread_every_10_s_by_default():
    # issue 11: a lifecycle change reaches every function within MANIFEST_TTL_S, at most 10 s by default
    assert parse_settings({}).manifest_ttl_s <= 10
    assert parse_settings({"MANIFEST_TTL_S": "2"}).manifest_ttl_s == 2


@pytest.mark.parametrize(("raw", "value"), [("TRUE", True), ("on", True), ("1", True), ("No", False), ("", False)])
def test_the_boolean_parser_takes_the_usual_spellings(raw: str, value: bool) -> None:
    from tierserve.settings import boolean

    assert boolean(raw) is value


def test_the_choice_parser_takes_only_what_it_lists_and_says_what_it_got() -> None:
    from tierserve.settings import boolean, choice

    parse = choice("http", "grpc")
    assert parse("grpc") == "grpc"
    with pytest.raises(ValueError, match="expected one of http, grpc, got 'GRPC'"):
        parse("GRPC")
    with pytest.raises(ValueError, match=r"expected true or false .* got 'maybe'"):
        boolean("maybe")


def test_the_generation_jobs_queue_is_a_queue_url_and_never_the_functions_own_queue() -> None:
    # issue 19: BatchInferenceFunction hands OpenAI batch jobs to BatchGenerateFunction's queue
    url = "https://sqs.us-east-1.amazonaws.com/123456789012/stack-BatchGenerateJobsQueue-X"
    assert parse_settings({}).generation_jobs_queue_url == ""
    assert parse_settings({"GENERATION_JOBS_QUEUE_URL": url}).generation_jobs_queue_url == url
    with pytest.raises(errors.ConfigurationError, match="GENERATION_JOBS_QUEUE_URL='BatchGenerateJobsQueue'"):
        parse_settings({"GENERATION_JOBS_QUEUE_URL": "BatchGenerateJobsQueue"})
    # a function handing its generation jobs to its own queue would hand them to itself for ever
    with pytest.raises(errors.ConfigurationError, match="GENERATION_JOBS_QUEUE_URL is CONTINUATION_QUEUE_URL"):
        parse_settings({"GENERATION_JOBS_QUEUE_URL": url, "CONTINUATION_QUEUE_URL": url})
