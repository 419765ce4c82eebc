"""Validation / calibration / example .npz files against the model's inputs."""

from __future__ import annotations

import numpy as np
import pytest
from compiler_testlib import save_npz

from tierserve_compiler.errors import InputDataError
from tierserve_compiler.pipeline import compile_model


def test_single_array_validation_and_mismatched_inputs(mlp_onnx, cfg_for, tmp_path):
    # Given a validation file with one unnamed array for a single-input model
    rng = np.random.default_rng(2)
    one = tmp_path / "one.npz"
    np.savez(one, rng.standard_normal((8, 16)).astype(np.float32))
    # When compiled / Then it is used as the input `x`
    res = compile_model(cfg_for(mlp_onnx, "one", validation=one, quantize="none"))
    assert res.report["evaluation_data"]["rows"] == 8
    # Given a validation file with the wrong feature count / Then the error names the input and the dims
    bad = save_npz(tmp_path / "bad.npz", x=rng.standard_normal((8, 5)).astype(np.float32))

    with pytest.raises(InputDataError, match=r"input 'x' dim 1 is 5, the model expects 16"):
        compile_model(cfg_for(mlp_onnx, "two", validation=bad))


def test_specs_keep_symbolic_dim_names_and_the_vocabulary_of_an_embeddings_ids():
    import onnx

    from tests.support.models import embedding_onnx
    from tierserve_compiler.data import specs_from_onnx

    # Given a model whose ids index an embedding of 10 rows and whose inputs share [batch, seq]
    inputs, outputs = specs_from_onnx(onnx.load_from_string(embedding_onnx(vocab=10)))
    ids, mask = inputs
    # Then the ids may be 0..9, the mask has no range, and both name their dims (outputs keep plain shapes)
    assert (ids.value_range, mask.value_range) == ((0, 9), None)
    assert ids.dim_names == mask.dim_names == ("batch", "seq")
    assert (outputs[0].shape, outputs[0].dim_names) == ((-1, 4), ())
