"""Manifest schema, typed settings, and the single error -> HTTP status mapping."""

from __future__ import annotations

import json

import pytest

from tierserve import errors
from tierserve.http import STATUS_BY_ERROR, error_response, parse_http_event, status_for
from tierserve.manifest import Manifest, check_model_name, check_version
from tierserve.settings import parse_settings


def _manifest(**overrides) -> dict:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
            "variants": {"fp32": {"path": "m/1/model.onnx", "sha256": "a" * 64, "size_bytes": 10}},
            "selected_variant": "fp32", "targets": ["cpu"]}
    body.update(overrides)
    return {"schema_version": 1, "models": {"m": {"default_version": "1", "versions": {"1": body}}}}


def test_manifest_round_trips_and_resolves_default_version():
    m = Manifest.from_json(_manifest())
    assert Manifest.loads(m.dumps()).to_json() == m.to_json()
    assert m.resolve("m").version == "1"


@pytest.mark.parametrize("bad", [
    {"variants": {"fp32": {"path": "../../etc/passwd", "sha256": "a" * 64, "size_bytes": 1}}},
    {"variants": {"fp32": {"path": "m/1/model.onnx", "sha256": "nothex", "size_bytes": 1}}},
    {"selected_variant": "int8_dynamic"},
    {"targets": ["tpu"]},
])
def test_manifest_refuses_unsafe_or_inconsistent_entries(bad):
    with pytest.raises(errors.ManifestError):
        Manifest.from_json(_manifest(**bad))


def test_unknown_model_and_version_are_not_found_with_the_alternatives():
    m = Manifest.from_json(_manifest())
    with pytest.raises(errors.ModelNotFoundError, match="models served here: m"):
        m.resolve("other")
    with pytest.raises(errors.ModelNotFoundError, match="versions: 1"):
        m.resolve("m", "2")


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 65, "-lead", "a b"])
def test_model_names_outside_the_allowlist_are_refused(name):
    with pytest.raises(errors.InvalidNameError):
        check_model_name(name)


@pytest.mark.parametrize("version", ["0", "01", "v1", "1.0", "../1"])
def test_versions_must_be_positive_integers(version):
    with pytest.raises(errors.InvalidNameError):
        check_version(version)


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
])
def test_bad_settings_name_the_variable(env, needle):
    with pytest.raises(errors.ConfigurationError, match=needle):
        parse_settings(env)


def test_every_error_class_maps_to_a_status_in_the_one_table():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.TierserveError)]
    for cls in classes:
        assert status_for(cls.__new__(cls)) in {400, 404, 405, 413, 500, 503, 504}
    assert status_for(errors.InvalidNameError("x")) == 400
    assert status_for(errors.BackendTimeoutError("x")) == 504
    assert errors.TierserveError in STATUS_BY_ERROR


def test_unknown_exceptions_become_500_without_a_stack_trace():
    resp = error_response(ZeroDivisionError("secret detail"), request_id="r-1")
    body = json.loads(resp["body"])
    assert resp["statusCode"] == 500
    assert "secret detail" not in resp["body"] and "Traceback" not in resp["body"]
    assert "r-1" in body["error"]


def test_retry_after_is_set_for_unavailable_backends():
    resp = error_response(errors.BackendUnavailableError("down", retry_after_s=12.2))
    assert resp["statusCode"] == 503 and resp["headers"]["retry-after"] == "13"


def test_oversized_body_is_refused_before_decoding():
    ev = {"requestContext": {"http": {"method": "POST"}}, "rawPath": "/v2/models/m/infer",
          "body": "A" * 4000, "isBase64Encoded": True}
    with pytest.raises(errors.PayloadTooLargeError, match="limit is 1000 bytes"):
        parse_http_event(ev, max_body_bytes=1000)
