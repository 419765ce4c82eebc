"""Two versions of one model that share ``model.onnx`` and differ in one other file (issue 17, content addressing).

Why: a variant is all of its files, not its ``model.onnx`` alone. A causal LM recompiled with another chat template
or tokenizer, or an ONNX model whose external weights were retrained under the same graph, has the same
``model.onnx`` as the version before it. The store's cache, the edge's cache and the published objects must keep
such versions apart; the runtime's, the edge's and the publishing tests all build the pair with :func:`write_pair`.

Kinds:

* ``genai``: a text-generation variant built by hand in onnxruntime-genai's layout, ``NAME/VERSION/fp32/`` with
  ``model.onnx`` (a tiny graph whose weights are in ``model.onnx.data``), ``genai_config.json``,
  ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``; the versions differ in the template.
* ``external``: an ONNX model with external data, ``NAME/VERSION/model.onnx`` + ``weights.bin``; the versions have
  the same graph and other weights.

Both versions target the edge and the CPU tier; v1 is the default and v2 the canary, so an edge device holds both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.support.onnx_external import external_linear
from tierserve.manifest import ExternalFile, GenerationSpec, Manifest, ModelVersion, TensorSpec, Variant

KINDS = ("genai", "external")
TARGETS = ("edge", "cpu")
#: Triton's vLLM backend's names, as a generative version lists them.
GENAI_INPUTS = (TensorSpec("text_input", "BYTES", (1,)), TensorSpec("stream", "BOOL", (1,)),
                TensorSpec("sampling_parameters", "BYTES", (1,)), TensorSpec("exclude_input_in_output", "BOOL", (1,)))
GENAI_OUTPUTS = (TensorSpec("text_output", "BYTES", (-1,)),)
X = (TensorSpec("x", "FP32", (-1, 4)),)
Y = (TensorSpec("y", "FP32", (-1, 3)),)

Files = dict[str, bytes]


def _genai_files(folder: Path, version: str) -> Files:
    external_linear(folder, location="model.onnx.data", seed=0)  # the same graph and weights in both versions
    texts = {
        "genai_config.json": json.dumps({"model": {"type": "llama", "vocab_size": 32, "context_length": 64,
                                                   "eos_token_id": 2}, "search": {"max_length": 64}}),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}),
        "tokenizer_config.json": json.dumps({"eos_token": "</s>"}),
        # the one file that differs: v2 was recompiled with another chat template
        "chat_template.jinja": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                "{% endfor %}" if version == "1" else "{{ messages[0]['content'] }}"),
    }
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _external_files(folder: Path, version: str) -> Files:
    external_linear(folder, location="weights.bin", seed=int(version))  # same model.onnx, other weights.bin
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _record(rel: str, data: bytes) -> tuple[str, str, int]:
    return rel, hashlib.sha256(data).hexdigest(), len(data)


def write_pair(root: Path, name: str, kind: str) -> dict[str, Files]:
    """Write ``name`` v1 (default) and v2 (canary, 50%) of ``kind`` into the store (or compiler output) folder
    ``root`` and its manifest.json; returns each version's files: {version: {location beside model.onnx: bytes}}."""
    assert kind in KINDS, kind
    out: dict[str, Files] = {}
    manifest_path = root / "manifest.json"
    manifest = Manifest.loads(manifest_path.read_text()) if manifest_path.exists() else Manifest.empty()
    for version in ("1", "2"):
        sub = f"{name}/{version}/fp32" if kind == "genai" else f"{name}/{version}"
        files = (_genai_files if kind == "genai" else _external_files)(root / sub, version)
        out[version] = files
        others = tuple(ExternalFile(*_record(f"{sub}/{loc}", data)) for loc, data in files.items()
                       if loc != "model.onnx")
        variant = Variant(*_record(f"{sub}/model.onnx", files["model.onnx"]), others)
        if kind == "genai":
            mv = ModelVersion(name=name, version=version, inputs=GENAI_INPUTS, outputs=GENAI_OUTPUTS,
                              variants={"fp32": variant}, selected_variant="fp32", targets=TARGETS,
                              task="text-generation",
                              generation=GenerationSpec(context_length=64, eos_token_ids=(2,), chat_template=True,
                                                        default_max_tokens=8, max_tokens_cap=16))
        else:
            mv = ModelVersion(name=name, version=version, inputs=X, outputs=Y, variants={"fp32": variant},
                              selected_variant="fp32", targets=TARGETS)
        manifest = manifest.with_version(mv, make_default=version == "1")
    doc = manifest.to_json()
    doc["models"][name]["canary"] = {"version": "2", "percent": 50.0}
    manifest_path.write_text(Manifest.from_json(doc).dumps())
    assert out["1"]["model.onnx"] == out["2"]["model.onnx"], "the pair must share model.onnx"
    return out


def assert_holds(model_path: Path, files: Files) -> None:
    """``model_path`` (what a store's fetch returned) sits beside exactly ``files``, byte for byte."""
    folder = model_path.parent
    held = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    assert model_path.name == "model.onnx"
    differ = sorted(k for k in files.keys() | held.keys() if held.get(k) != files.get(k))
    assert not differ, f"{folder} does not hold this version's files: {differ} differ"
