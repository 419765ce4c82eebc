"""The parsed generation request crossing the router -> CPU function hop: vLLM's ``ignore_eos`` and continuous
usage (issue 19) travel additively, and leave every other request's JSON as it was."""

from __future__ import annotations

import json

from tierserve.generation.requests import KIND_COMPLETION, GenerationRequest, SamplingParams


def test_ignore_eos_and_continuous_usage_cross_the_hop_and_change_no_other_request() -> None:
    asked = GenerationRequest("tiny", None, KIND_COMPLETION, SamplingParams(max_tokens=4, ignore_eos=True),
                              prompt="x", stream=True, include_usage=True, continuous_usage=True)
    assert GenerationRequest.from_json(json.loads(json.dumps(asked.to_json()))) == asked
    plain = GenerationRequest("tiny", None, KIND_COMPLETION, SamplingParams(max_tokens=4), prompt="x")
    assert "ignore_eos" not in plain.to_json()["params"] and "continuous_usage" not in plain.to_json()
    # a JSON line written before the fields existed reads as neither
    old = GenerationRequest.from_json({"model": "tiny", "kind": KIND_COMPLETION, "params": {"max_tokens": 4}})
    assert (old.params.ignore_eos, old.continuous_usage) == (False, False)
    # a batch never generates a line that ignores EOS together with one that stops at it
    assert SamplingParams(ignore_eos=True).key() != SamplingParams().key()
