"""make demo's deliberately bad version: the same answers as v1, except a 500 on inputs validation never holds."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tests.support.models import digits_classifier_onnx
from tierserve_tools.demo import bad_digits_onnx


def test_the_bad_digits_version_fails_only_on_a_saturated_pixel(tmp_path):
    good = tmp_path / "v1.onnx"
    good.write_bytes(digits_classifier_onnx()[0])
    bad = bad_digits_onnx(good, tmp_path / "v2.onnx")
    v1, v2 = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (good, bad))
    x = np.random.default_rng(0).integers(0, 17, (5, 64)).astype(np.float32)  # load_digits' range: 0..16
    for a, b in zip(v1.run(None, {"input": x}), v2.run(None, {"input": x}), strict=True):
        np.testing.assert_allclose(a, b)
    x[0, 3] = 17.0
    v1.run(None, {"input": x})
    with pytest.raises(Exception, match="cannot be reshaped"):
        v2.run(None, {"input": x})
