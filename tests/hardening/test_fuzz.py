"""Schemathesis against `tierserve serve`, with a model-aware spec derived from openapi.yaml (issue 8's fuzz part,
Triton's L0_http_fuzz idea): positive and negative cases for every operation, each model's inference with
its own inputs' names, datatypes and ranks.

What must hold for every case: no 5xx, every response as the spec says (status, content type, schema),
and every JSON body standard JSON (no bare NaN or Infinity). 200 cases here, 2,000+ in the full run.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.hardening.conftest import FIGURES, scale, strict_json

ROOT = Path(__file__).resolve().parents[2]

_DATA = {
    "BOOL": {"type": "boolean"},
    "BYTES": {"type": "string", "maxLength": 8},
    "FP16": {"type": "number"}, "FP32": {"type": "number"}, "FP64": {"type": "number"},
}


def _item(datatype: str, value_range: Any) -> dict:
    if datatype in _DATA:
        return _DATA[datatype]
    item: dict[str, Any] = {"type": "integer"}
    if value_range is not None:
        item.update(minimum=int(value_range[0]) - 2, maximum=int(value_range[1]) + 2)  # across the boundary
    return item


def model_aware(spec: dict, manifest: Any) -> dict:
    """openapi.yaml with the served models' names as the only names, and one inference operation per model
    whose body names its inputs, datatypes and ranks (so the fuzzer reaches the tiers, not only the parser)."""
    spec = copy.deepcopy(spec)
    names = sorted(manifest.models)
    versions = sorted({v for m in manifest.models.values() for v in m.versions})
    params = spec["components"]["parameters"]
    params["name"]["schema"] = {"type": "string", "enum": names}
    params["version"]["schema"] = {"type": "string", "enum": versions}
    infer_op = spec["paths"]["/v2/models/{name}/infer"]["post"]
    for name in names:
        mv = manifest.resolve(name)
        inputs = [{"type": "object", "required": ["name", "datatype", "shape", "data"], "additionalProperties": False,
                   "properties": {"name": {"enum": [s.name]}, "datatype": {"enum": [s.datatype]},
                                  "shape": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 6},
                                            "minItems": len(s.shape), "maxItems": len(s.shape)},
                                  "data": {"type": "array", "maxItems": 48, "items": _item(s.datatype, s.value_range)}}}
                  for s in mv.inputs]
        body = {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string", "maxLength": 16},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"},
                                                            "target": {"enum": ["cpu", "gpu"]}}},
            "inputs": {"type": "array", "minItems": len(inputs), "maxItems": len(inputs), "items": {"anyOf": inputs}},
            "outputs": {"type": "array", "maxItems": len(mv.outputs), "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"enum": [o.name for o in mv.outputs]},
                               "parameters": {"type": "object",
                                              "properties": {"binary_data": {"type": "boolean"}}}}}}}}
        op = copy.deepcopy(infer_op)
        op["parameters"] = [p for p in op.get("parameters", []) if "inference-header" not in json.dumps(p)]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
        spec["paths"][f"/v2/models/{name}/infer"] = {"post": op}
    return spec


def test_fuzzing_the_api_finds_no_5xx_no_schema_violation_and_no_nonstandard_json(stack) -> None:
    import hypothesis
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    from tierserve.manifest import Manifest

    manifest = Manifest.loads((stack.models / "manifest.json").read_text())
    schema = schemathesis.openapi.from_dict(model_aware(yaml.safe_load((ROOT / "openapi.yaml").read_text()),
                                                        manifest))
    operations = [r.ok() for r in schema.get_all_operations()]
    total = scale(200, 2200)
    session = requests.Session()
    tried: list[tuple[str, int]] = []
    failures: list[str] = []
    nonstandard = 0

    def fuzz(op: Any, mode: Any, examples: int, round_: int) -> None:
        @hypothesis.seed(round_)
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[hypothesis.Phase.generate])
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            nonlocal nonstandard
            response = case.call(base_url=stack.url, session=session, timeout=60)
            tried.append((op.label, response.status_code))
            content_type = (response.headers.get("content-type") or [""])[0]
            if content_type.startswith("application/json") and response.content:
                try:
                    strict_json(response.content)
                except (AssertionError, ValueError) as exc:
                    nonstandard += 1
                    failures.append(f"{op.label}: non-standard JSON: {exc}")
            try:
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                                         status_code_conformance, content_type_conformance])
            except Exception as exc:  # a check failed: keep going, report them all at the end
                failures.append(f"{op.label} [{mode.value}] {response.status_code}: {str(exc)[:400]}")

        with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # nothing to negate (no parameters, no body)
            run()

    # Every operation, positive and negative; then more rounds on the inference operations (the largest
    # input spaces) until the total is reached. Seeded: a rerun tries the same cases.
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for op in operations:
        for mode in modes:
            fuzz(op, mode, 3, 0)
    infer_ops = [op for op in operations if op.label.endswith("/infer")]
    round_ = 0
    while len(tried) < total and round_ < 1000:
        round_ += 1
        for op in infer_ops:
            for mode in modes:
                fuzz(op, mode, 4, round_)
                if len(tried) >= total:
                    break

    server_errors = sum(1 for _, status in tried if status >= 500)
    FIGURES["fuzz cases tried"] = len(tried)
    FIGURES["fuzz 5xx"] = server_errors
    FIGURES["fuzz schema/JSON violations"] = len(failures)
    FIGURES["fuzz statuses"] = dict(sorted({s: sum(1 for _, t in tried if t == s) for _, s in tried}.items()))
    assert len(tried) >= total, len(tried)
    assert (server_errors, nonstandard) == (0, 0), failures[:10]
    assert failures == [], failures[:10]
    pytest.importorskip("schemathesis")
