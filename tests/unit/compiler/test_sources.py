"""Every source kind: ONNX file, sklearn estimator, sklearn factory, torch module."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import onnxruntime as ort
import pytest
from compiler_testlib import save_npz

from tests.support.onnx_external import external_linear, with_location
from tierserve.store import ModelStore
from tierserve_compiler.errors import SourceError
from tierserve_compiler.pipeline import compile_model


def test_onnx_file_compiles_to_a_manifest_entry(mlp_onnx, mlp_data, cfg_for, tmp_path):
    # Given a tiny ONNX regressor and validation data
    val, _ = mlp_data
    # When it is compiled without quantization
    res = compile_model(cfg_for(mlp_onnx, "mlp", validation=val, quantize="none"))
    # Then fp32 is written, checked, and described in the manifest
    mv = res.model_version
    assert mv.selected_variant == "fp32"
    assert (tmp_path / "models" / "mlp" / "1" / "model.onnx").is_file()
    assert [s.name for s in mv.inputs] == ["x"] and mv.inputs[0].shape == (-1, 16)
    assert res.report["source_kind"] == "onnx" and res.report["task"] == "regressor"
    assert res.report["gate"]["checked"] is False


def test_sklearn_estimator_object(user_module, cfg_for):
    # Given a module attribute holding a fitted classifier
    mod = user_module(
        """
        import numpy as np
        from sklearn.linear_model import LogisticRegression
        rng = np.random.default_rng(0)
        X = rng.standard_normal((120, 5)).astype("float32")
        y = (X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 1).astype(int)
        CLF = LogisticRegression(max_iter=500).fit(X, y)
        """
    )
    # When it is compiled
    res = compile_model(cfg_for(f"{mod}:CLF", "clf", quantize="none"))
    # Then the ONNX has `input` FP32 [-1, 5] and outputs `label` INT64 + `probabilities` FP32
    mv = res.model_version
    assert [(s.name, s.datatype, s.shape) for s in mv.inputs] == [("input", "FP32", (-1, 5))]
    assert [(s.name, s.datatype) for s in mv.outputs] == [("label", "INT64"), ("probabilities", "FP32")]
    assert res.report["task"] == "classifier" and res.report["gate"]["checked"]


def test_sklearn_zero_arg_factory_with_labels(tmp_path, cfg_for):
    # Given the bundled breast-cancer factory and its held-out split with labels
    from tierserve_compiler.demo import write_breast_cancer_validation

    val = write_breast_cancer_validation(tmp_path / "bc.npz")
    # When it is compiled
    res = compile_model(
        cfg_for("tierserve_compiler.demo:breast_cancer_classifier", "bc", validation=val, quantize="none")
    )
    # Then accuracy is reported against the labels and the gate passed on both outputs
    fp32 = res.report["variants"]["fp32"]
    assert fp32["metrics"]["accuracy"] > 0.9
    assert set(res.report["gate"]["outputs"]) == {"label", "probabilities"}


def test_sklearn_regressor(user_module, cfg_for):
    # Given a fitted linear regressor
    mod = user_module(
        """
        import numpy as np
        from sklearn.linear_model import Ridge
        rng = np.random.default_rng(0)
        X = rng.standard_normal((80, 4)).astype("float32")
        REG = Ridge().fit(X, X @ np.array([1.0, -2.0, 3.0, 0.5]) + 100.0)
        """
    )
    # When compiled / Then it is a regressor with relative-error metrics and a passed gate
    res = compile_model(cfg_for(f"{mod}:REG", "reg", quantize="none"))
    assert res.report["task"] == "regressor" and res.report["metrics"] == ["max_abs", "mean_rel"]
    assert all(o["ok"] for o in res.report["gate"]["outputs"].values())


def test_torch_module_multi_input_output(user_module, cfg_for, tmp_path):
    # Given a torch module with two inputs (one with a dynamic 2nd axis) and two outputs
    pytest.importorskip("torch")
    mod = user_module(
        """
        import torch
        class Two(torch.nn.Module):
            output_names = ("tokens", "pooled")
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.lin = torch.nn.Linear(8, 6)
            def forward(self, feats, mask):
                h = torch.relu(self.lin(feats))
                m = mask.unsqueeze(-1).to(h.dtype)
                return h, (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        def make():
            return Two()
        """
    )
    rng = np.random.default_rng(0)
    ex = save_npz(
        tmp_path / "ex.npz",
        feats=rng.standard_normal((2, 5, 8)).astype(np.float32),
        mask=np.ones((2, 5), dtype=np.int64),
    )
    val = save_npz(
        tmp_path / "v.npz",
        feats=rng.standard_normal((3, 7, 8)).astype(np.float32),
        mask=np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=np.int64),
    )
    # When it is compiled with the sequence axis dynamic
    res = compile_model(
        cfg_for(
            f"{mod}:make",
            "two",
            example_inputs=ex,
            validation=val,
            quantize="none",
            dynamic_axes={"feats": [1], "mask": [1]},
        )
    )
    # Then both axes are dynamic, both outputs exist and the gate compared them to torch
    mv = res.model_version
    assert [s.shape for s in mv.inputs] == [(-1, -1, 8), (-1, -1)]
    assert [s.name for s in mv.outputs] == ["tokens", "pooled"]
    assert res.report["gate"]["checked"] and res.report["source_kind"] == "torch"
    assert "non-padding" in res.report["gate"]["outputs"]["tokens"]["detail"]


def test_unknown_source_kind_is_refused(user_module, cfg_for):
    # Given a module attribute that is not a model
    mod = user_module("THING = 42\n")
    # When / Then
    with pytest.raises(SourceError, match=r"supported: \.onnx files"):
        compile_model(cfg_for(f"{mod}:THING", "x"))


# --- external data (issue 8, defects 8 and 9) ------------------------------------------------------


def test_onnx_with_external_data_compiles_and_is_served_from_the_store(tmp_path, cfg_for):
    # Given an ONNX file whose weights are in weights.bin next to it
    src, w, b = external_linear(tmp_path / "src", model="lin.onnx")
    # When it is compiled (every variant)
    res = compile_model(cfg_for(src, "ext", target="both"))
    # Then each variant's external data is in the version folder and in the manifest with sha256 and size
    root = tmp_path / "models"
    fp32 = res.model_version.variants["fp32"]
    assert fp32.external_data, "fp32 keeps its weights outside model.onnx"
    for var in res.model_version.variants.values():
        for ext in var.external_data:
            data = (root / ext.path).read_bytes()
            assert ext.path.startswith("ext/1/") and ext.size_bytes == len(data)
            assert ext.sha256 == hashlib.sha256(data).hexdigest()
    # And the runtime's store fetches and verifies every file, and the model computes x @ W + b
    store = ModelStore(str(root), tmp_path / "cache")
    served = store.manifest().resolve("ext")
    path = store.fetch(served.cpu_artifact)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    # (--quantize auto keeps int8 when it measures faster, which varies with the machine's load: its
    # quantization error is larger than fp32's or fp16's)
    tol = 5e-2 if (served.cpu_variant or served.selected_variant).startswith("int8") else 1e-2
    np.testing.assert_allclose(got, x @ w + b, rtol=tol, atol=tol)
    # And when fp32 is the GPU variant, the Triton version folder holds its external data next to model.onnx
    compile_model(cfg_for(src, "ext32", target="both", quantize="none"))
    files = sorted(p.name for p in (root / "triton" / "ext32" / "1").iterdir())
    assert files == ["config.pbtxt", "model.onnx", "model.onnx.data"]  # and the version's own Triton config


@pytest.mark.parametrize("in_constant", [False, True], ids=["initializer", "constant"])
@pytest.mark.parametrize(("location", "reason"), [
    ("w\x00eights.bin", "NUL byte"), ("/proc/self/environ", "absolute"), ("/etc/passwd", "absolute"),
    ("../secret.bin", "'..'"), ("link.bin", "symbolic link that leaves"),
])
def test_unsafe_external_data_locations_are_refused_by_compile(tmp_path, cfg_for, location, reason, in_constant):
    # Given an ONNX file with one tensor at an unsafe location (or a symlink leaving its folder)
    src, _, _ = external_linear(tmp_path / "src")
    (tmp_path / "secret.bin").write_bytes(b"\0" * 12)
    (tmp_path / "src" / "link.bin").symlink_to(tmp_path / "secret.bin")
    with_location(src, location, in_constant=in_constant)
    # When it is compiled / Then it is refused with a clear error naming the location, and nothing is written
    with pytest.raises(SourceError, match=f"external data.*{re.escape(repr(location))}.*{re.escape(reason)}"):
        compile_model(cfg_for(src, "bad"))
    assert not (tmp_path / "models" / "manifest.json").exists()
