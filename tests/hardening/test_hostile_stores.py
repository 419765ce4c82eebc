"""Hostile model stores: every way a compromised or careless store can hand the runtime a model, each refused
with its reason while the rest of the store keeps serving (issue 8, defects 6-9 and the custom-op allowlist).

One store holds a good model and every hostile one, side by side; RouterFunction's API serves it in this
process (the CPU tier in-process, as the CPU function runs it). For each hostile model: inference and
readiness both refuse it with the reason's code, nothing half-fetched stays in the cache, and the good
model answers the very next request.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.hardening.conftest import FIGURES
from tests.support.make_events import http_event
from tests.support.onnx_external import external_linear, with_custom_op, with_location, write_entry

LOCATIONS = {"absolute": "/etc/passwd", "dotdot": "../../etc/passwd", "nul": "w\x00eights.bin",
             "proc": "/proc/self/environ", "nested-dotdot": "sub/../../w.bin"}


def _hostile(root: Path, tmp: Path) -> dict[str, tuple[int, str, str]]:
    """Write every hostile model into ``root``; name -> (status, code, words of the reason)."""
    expect: dict[str, tuple[int, str, str]] = {}
    for kind, location in LOCATIONS.items():
        for where in ("initializer", "constant"):
            name = f"ext-{kind}-{where}"
            external_linear(root / name / "1")
            with_location(root / name / "1" / "model.onnx", location, in_constant=where == "constant")
            write_entry(root, name)
            expect[name] = (500, "unsafe_model", repr(location)[1:-1])
    # links: the store opens nothing that is not a regular file with one name
    external_linear(root / "ext-symlink" / "1")
    write_entry(root, "ext-symlink")
    weights = root / "ext-symlink" / "1" / "weights.bin"
    weights.rename(tmp / "kept.bin")
    weights.symlink_to(tmp / "kept.bin")
    expect["ext-symlink"] = (500, "unsafe_model", "not a regular file")
    external_linear(root / "ext-hardlink" / "1")
    write_entry(root, "ext-hardlink")
    os.link(root / "ext-hardlink" / "1" / "weights.bin", tmp / "second-name.bin")
    expect["ext-hardlink"] = (500, "unsafe_model", "hard link")
    # tampering after compilation: the weights, the model itself
    external_linear(root / "tampered-weights" / "1")
    write_entry(root, "tampered-weights")
    w = root / "tampered-weights" / "1" / "weights.bin"
    w.write_bytes((np.frombuffer(w.read_bytes(), np.float32) * 1000).tobytes())
    expect["tampered-weights"] = (500, "integrity_error", "weights.bin has sha256")
    external_linear(root / "tampered-model" / "1")
    write_entry(root, "tampered-model")
    m = root / "tampered-model" / "1" / "model.onnx"
    m.write_bytes(m.read_bytes() + b"\x00")
    expect["tampered-model"] = (500, "integrity_error", "model.onnx has sha256")
    # a custom-op domain that is not on the allowlist (top level and inside an If branch)
    for where in ("top", "branch"):
        name = f"custom-op-{where}"
        external_linear(root / name / "1")
        with_custom_op(root / name / "1" / "model.onnx", "evil.custom", in_subgraph=where == "branch")
        write_entry(root, name)
        expect[name] = (500, "unsafe_model", "'evil.custom', which are not on the allowlist")
    # a variant the manifest lists but the store does not hold
    external_linear(root / "missing-file" / "1")
    write_entry(root, "missing-file")
    (root / "missing-file" / "1" / "weights.bin").unlink()
    expect["missing-file"] = (500, "artifact_not_found", "missing from")
    # manifest entries that cannot be served: a selected variant not listed, a traversal name, trailing newlines
    external_linear(root / "no-variant" / "1")
    write_entry(root, "no-variant", selected_variant="int8_dynamic")
    expect["no-variant"] = (500, "manifest_error", "selected variant 'int8_dynamic' is not listed")
    manifest = json.loads((root / "manifest.json").read_text())
    good_entry = manifest["models"]["good"]
    manifest["models"]["../evil"] = good_entry
    manifest["models"]["nl\n"] = good_entry
    manifest["models"]["badversion"] = {"default_version": "1\n", "versions": {"1\n": good_entry["versions"]["1"]}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    expect["badversion"] = (500, "manifest_error", "invalid model version")
    return expect


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[int, str, str]], Any]:
    tmp = tmp_path_factory.mktemp("hostile-store")
    root = tmp / "models"
    _, w, b = external_linear(root / "good" / "1")
    write_entry(root, "good")
    expect = _hostile(root, tmp)
    return root, expect, (w, b)


@pytest.fixture
def api(store, runtime_env: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., dict]:
    from tierserve.api import handle_http
    from tierserve.app import build_runtime
    from tierserve.settings import Settings

    root, _, _ = store
    runtime = build_runtime(Settings(model_store_uri=str(root), model_cache_dir=str(tmp_path / "cache")))

    def call(method: str, path: str, body: dict | None = None) -> dict:
        event = http_event(method, path, f"{method} {path}", "", {}, {"content-type": "application/json"})
        event["body"] = json.dumps(body) if body is not None else None
        event["isBase64Encoded"] = False
        return handle_http(event, None, runtime)

    call.cache = tmp_path / "cache"  # type: ignore[attr-defined]
    return call


X = np.arange(8, dtype=np.float32).reshape(2, 4)
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}]}


def _good_is_served(api: Callable[..., dict], weights: Any) -> None:
    w, b = weights
    resp = api("POST", "/v2/models/good/infer", BODY)
    assert resp["statusCode"] == 200, resp["body"]
    y = np.asarray(json.loads(resp["body"])["outputs"][0]["data"], np.float32).reshape(2, 3)
    np.testing.assert_allclose(y, X @ w + b, rtol=1e-5)


def test_the_store_serves_its_good_model(api, store) -> None:
    _good_is_served(api, store[2])


@pytest.mark.parametrize("name", [
    *(f"ext-{k}-{w}" for k in LOCATIONS for w in ("initializer", "constant")),
    "ext-symlink", "ext-hardlink", "tampered-weights", "tampered-model", "custom-op-top", "custom-op-branch",
    "missing-file", "no-variant", "badversion",
])
def test_each_hostile_model_is_refused_with_its_reason_and_the_rest_keeps_serving(api, store, name) -> None:
    _, expect, weights = store
    status, code, words = expect[name]
    # When it is asked for, Then inference is refused with the reason's code and words, never a stack trace
    resp = api("POST", f"/v2/models/{name}/infer", BODY)
    error = json.loads(resp["body"])
    assert (resp["statusCode"], error["code"]) == (status, code), error
    assert words in error["error"] and "Traceback" not in error["error"]
    # And readiness says the same (not ready, the same code)
    ready = api("GET", f"/v2/models/{name}/ready")
    assert ready["statusCode"] in (500, 503) and json.loads(ready["body"])["code"] == code, ready["body"]
    # And nothing half-fetched is left in the cache
    cache: Path = api.cache  # type: ignore[attr-defined]
    if cache.exists():
        assert not [p for p in cache.iterdir() if p.name.startswith(".fetch-")]
    # And the good model is served by the very next request
    _good_is_served(api, weights)
    FIGURES.setdefault("hostile stores refused", 0)
    FIGURES["hostile stores refused"] += 1


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/v2/models/nl%0A/infer", 400, "invalid_name"),
    ("/v2/models/..%2Fevil/infer", 400, "invalid_name"),
])
def test_names_a_store_should_never_have_are_refused_at_the_door(api, store, path, status, code) -> None:
    resp = api("POST", path, BODY)
    assert resp["statusCode"] in (status, 404), resp["body"]
    _good_is_served(api, store[2])


def test_the_repository_index_lists_each_broken_entry_with_its_reason(api, store) -> None:
    resp = api("POST", "/v2/repository/index", {})
    index = {(m["name"], m["version"]): m for m in json.loads(resp["body"])}
    assert index[("good", "1")]["state"] == "READY"
    for broken in ("../evil", "nl\n", "no-variant", "badversion"):
        entry = index[(broken, "")]
        assert entry["state"] == "UNAVAILABLE" and entry["reason"], entry
