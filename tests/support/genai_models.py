"""Tiny causal LMs exported with onnxruntime-genai's builder, and a model store written by hand around them.

Why: the generation tests (engine, service, data plane) need real onnxruntime-genai sessions on real exports,
built once per test session (the build and the export take about 15 s per family). Until the compiler's
``genai_store`` fixture (``tests/support/genai_store.py``, G1) exists, :func:`write_genai_store` lays a store
out by hand exactly as the manifest contract says: the variant's folder holds ``model.onnx`` and the files
beside it, each listed with its sha256 and size, so ``ModelStore.fetch`` verifies and lays them out.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tierserve.manifest import ExternalFile as ManifestFile
from tierserve.manifest import GenerationSpec, Manifest, ModelVersion, TensorSpec, Variant

#: Triton's vLLM backend names (the manifest contract of a generative version).
GENAI_INPUTS = (TensorSpec("text_input", "BYTES", (1,)), TensorSpec("stream", "BOOL", (1,)),
                TensorSpec("sampling_parameters", "BYTES", (1,)), TensorSpec("exclude_input_in_output", "BOOL", (1,)))
GENAI_OUTPUTS = (TensorSpec("text_output", "BYTES", (-1,)),)
#: The files an onnxruntime-genai folder may hold besides model.onnx (what the builder writes).
GENAI_FILES = ("model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")


@dataclass(frozen=True)
class TinyLM:
    family: str
    hf: Path      # the Hugging Face folder (transformers' reference)
    genai: Path   # the onnxruntime-genai export (fp32)

    @property
    def eos_id(self) -> int:
        from tests.support.causal_lm import config_of

        return int(config_of(self.hf)["eos_token_id"])


def export(root: Path, family: str) -> TinyLM:
    """Build the tiny ``family`` model under ``root`` and export it with the builder (fp32, CPU); cached."""
    from tests.support.causal_lm import build_causal_lm

    hf = build_causal_lm(root / f"{family}-hf", family=family)
    out = root / f"{family}-genai"
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", "fp32", "-e", "cpu"], cwd=root,
                       check=True, capture_output=True)
    return TinyLM(family, hf, out)


def _file(root: Path, rel: str, data: bytes) -> ManifestFile:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return ManifestFile(rel, hashlib.sha256(data).hexdigest(), len(data))


def write_genai_store(root: Path, name: str, lm: TinyLM, version: str = "1", *, chat_template: bool = True,
                      context_length: int = 1024, default_max_tokens: int = 32, max_tokens_cap: int = 512,
                      max_concurrency: int = 4, targets: tuple[str, ...] = ("cpu",),
                      drop: tuple[str, ...] = ()) -> ModelVersion:
    """Copy ``lm``'s export into ``root/NAME/VERSION/fp32/`` and add it to ``root/manifest.json``; ``drop``
    leaves files out (``chat_template.jinja``: a model without a template)."""
    folder = f"{name}/{version}/fp32"
    model = _file(root, f"{folder}/model.onnx", (lm.genai / "model.onnx").read_bytes())
    others = tuple(_file(root, f"{folder}/{f}", (lm.genai / f).read_bytes()) for f in GENAI_FILES
                   if (lm.genai / f).is_file() and f not in drop)
    import json

    config = json.loads((lm.genai / "genai_config.json").read_text())
    spec = GenerationSpec(context_length=context_length, eos_token_ids=(lm.eos_id,),
                          chat_template=chat_template and "chat_template.jinja" not in drop,
                          default_max_tokens=default_max_tokens, max_tokens_cap=max_tokens_cap,
                          max_concurrency=max_concurrency, vocab_size=int(config["model"]["vocab_size"]),
                          family=lm.family)
    mv = ModelVersion(name=name, version=version, inputs=GENAI_INPUTS, outputs=GENAI_OUTPUTS,
                      variants={"fp32": Variant(model.path, model.sha256, model.size_bytes, others)},
                      selected_variant="fp32", targets=targets, created_at="2026-11-24T12:00:00Z",
                      task="text-generation", generation=spec)
    manifest_path = root / "manifest.json"
    manifest = Manifest.loads(manifest_path.read_text()) if manifest_path.exists() else Manifest.empty()
    manifest_path.write_text(manifest.with_version(mv).dumps())
    return mv
