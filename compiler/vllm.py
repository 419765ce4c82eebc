"""The GPU tier's entry for a generative model: a Triton model repository entry for NVIDIA's vLLM backend.

Why a module of its own: a causal LM is served on the GPU by vLLM from its Hugging Face weights, not by
onnxruntime from an ONNX graph, so its Triton entry is another kind of entry. What Triton's vLLM backend reads
(``triton-inference-server/vllm_backend``, ``src/model.py`` and ``samples/model_repository/vllm_model``):

* ``config.pbtxt`` with ``backend: "vllm"``, ``model_transaction_policy { decoupled: true }`` (the backend asserts
  it), ``max_batch_size: 0`` (vLLM batches on its own) and ``KIND_MODEL`` instances (vLLM takes the GPUs it is
  given); the inputs ``text_input``, ``stream``, ``sampling_parameters``, ``exclude_input_in_output`` and the output
  ``text_output`` (the backend's auto-complete adds its other optional ones);
* ``VERSION/model.json``: the engine arguments, passed as ``AsyncEngineArgs(**model_json)``. A misspelt key is a
  ``TypeError`` when Triton loads the model, so every ``model.json`` written here is checked first against the
  fields of the vLLM version the container ships, pinned in ``vllm_engine_args.json`` with its sources
  (:func:`check_engine_args`).

Layout, beside the ONNX entries (``tierserve_compiler.triton``)::

    DIR/NAME/VERSION/hf/...                 the Hugging Face weights, content-addressed in the manifest
                                            (GenerationSpec.hf_weights: every file with its sha256)
    DIR/triton/NAME/config.pbtxt            derived from the listed versions' own configs (lifecycle.triton_repo)
    DIR/triton/NAME/VERSION/config.pbtxt    this version's own config
    DIR/triton/NAME/VERSION/model.json      the engine arguments
    DIR/triton/NAME/VERSION/hf/...          the weights again, copied (as the ONNX entries copy model.onnx: the
                                            store refuses a hard-linked artifact)

vLLM reads ``model`` as a path on the machine that runs Triton and does not resolve it against the repository,
so ``model.json`` names an absolute path: ``/models/NAME/VERSION/hf`` for your own Triton (``GpuTier=url``: mount the
repository at ``/models``), rewritten to ``/opt/ml/model/NAME/VERSION/hf`` in the SageMaker archive, where SageMaker
unpacks ``model.tar.gz`` (:func:`model_json_text`, ``tierserve_compiler.sagemaker``).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from tierserve.manifest import ExternalFile, TensorSpec, Variant
from tierserve_compiler.data import sha256_file
from tierserve_compiler.errors import CompilerError

PINNED_ARGS = Path(__file__).with_name("vllm_engine_args.json")
MODEL_JSON = "model.json"
#: The weights' folder in a version folder and in a Triton version folder.
HF_DIR = "hf"
#: Where your own Triton (GpuTier=url) finds the repository, and where SageMaker unpacks model.tar.gz.
REPOSITORY_ROOT = "/models"
SAGEMAKER_REPOSITORY_ROOT = "/opt/ml/model"
#: The files of a Hugging Face causal LM folder that vLLM reads: config, weights, tokenizer, chat template.
HF_FILE_RE = re.compile(r"(?:config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|"
                        r"special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|tokenizer\.model|"
                        r"vocab\.json|merges\.txt|model\.safetensors\.index\.json|"
                        r"[A-Za-z0-9_.-]{1,96}\.safetensors)")
#: Triton's backend types (optional inputs the backend's auto-complete adds are left to it).
TRITON_TYPES = {"BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL"}
OPTIONAL_INPUTS = {"stream", "sampling_parameters", "exclude_input_in_output"}
#: vLLM's share of the GPU's memory for weights + KV cache (its default is 0.90; Triton's process needs a little).
GPU_MEMORY_UTILIZATION = 0.90


class EngineArgsError(CompilerError):
    """A ``model.json`` names an engine argument (or a value) that the pinned vLLM version does not accept."""


@functools.cache
def pinned() -> dict[str, Any]:
    """``vllm_engine_args.json``: the vLLM version, the Triton image that ships it, the fields and their choices."""
    return dict(json.loads(PINNED_ARGS.read_text()))


def _accepts(annotation: str, value: Any) -> bool:
    """Whether a JSON value fits a field's annotation as vLLM's source writes it (``Optional[int]``, ``float``...)."""
    if value is None:
        return "Optional" in annotation or "None" in annotation
    if isinstance(value, bool):
        return "bool" in annotation
    if isinstance(value, int):
        return any(t in annotation for t in ("int", "float"))
    if isinstance(value, float):
        return "float" in annotation
    if isinstance(value, str):
        return "str" in annotation
    if isinstance(value, dict):
        return any(t in annotation for t in ("dict", "Dict", "Mapping"))
    if isinstance(value, list):
        return any(t in annotation for t in ("List", "list", "Tuple", "tuple"))
    return False


def check_engine_args(args: dict[str, Any]) -> None:
    """Refuse a ``model.json`` that the pinned vLLM's ``AsyncEngineArgs(**args)`` would refuse: an unknown key (with
    the nearest known one), a value of the wrong type, or one outside the parser's choices."""
    pin = pinned()
    fields: dict[str, dict[str, Any]] = pin["fields"]
    where = f"vLLM {pin['vllm_version']} ({pin['triton_image']})"
    for key, value in args.items():
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise EngineArgsError(f"model.json: {key!r} is not an engine argument of {where}{hint} "
                                  f"(the list: {PINNED_ARGS.name})")
        if not _accepts(fields[key]["type"], value):
            raise EngineArgsError(f"model.json: {key}={value!r} does not fit {where}'s type {fields[key]['type']}")
        choices = pin["choices"].get(key)
        if choices is not None and value is not None and value not in choices:
            raise EngineArgsError(f"model.json: {key}={value!r} is not one of {where}'s choices {choices}")


def dtype_of(hf_folder: Path) -> str:
    """vLLM's ``dtype`` for the weights: ``bfloat16`` for bf16 checkpoints, else ``float16`` (what vLLM's ``auto``
    picks for fp32 and fp16 ones), named explicitly so that the entry says what the GPU computes in."""
    try:
        cfg = json.loads((hf_folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "float16"
    return "bfloat16" if str(cfg.get("torch_dtype") or cfg.get("dtype") or "") == "bfloat16" else "float16"


def engine_args(name: str, version: str, *, context_length: int, dtype: str, max_num_seqs: int = 64,
                gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION, enforce_eager: bool = False,
                root: str = REPOSITORY_ROOT) -> dict[str, Any]:
    """The engine arguments of ``NAME`` v``VERSION``, its weights under ``ROOT/NAME/VERSION/hf`` (checked)."""
    path = weights_path(root, name, version)
    args: dict[str, Any] = {
        "model": path,
        "tokenizer": path,
        "served_model_name": name,
        "load_format": "safetensors",
        "dtype": dtype,
        "max_model_len": int(context_length),
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_num_seqs": max_num_seqs,
        "enforce_eager": enforce_eager,
        "trust_remote_code": False,
        "tensor_parallel_size": 1,
        "seed": 0,
        "disable_log_requests": True,
    }
    check_engine_args(args)
    return args


def weights_path(root: str, name: str, version: str) -> str:
    return f"{root.rstrip('/')}/{name}/{version}/{HF_DIR}"


def model_json_text(args: dict[str, Any], root: str | None = None) -> str:
    """``model.json``'s text; with ``root``, the weights' paths moved under that repository root."""
    args = dict(args)
    if root is not None:
        for key in ("model", "tokenizer"):
            if isinstance(args.get(key), str):
                name, version = args[key].rstrip("/").split("/")[-3:-1]
                args[key] = weights_path(root, name, version)
    check_engine_args(args)
    return json.dumps(args, indent=2, sort_keys=True) + "\n"


# --- the weights -----------------------------------------------------------------------------------------


def weights_files(hf_folder: Path) -> list[Path]:
    """The files of a Hugging Face folder that vLLM needs (``HF_FILE_RE``), ``config.json`` first."""
    files = sorted(p for p in Path(hf_folder).iterdir() if p.is_file() and HF_FILE_RE.fullmatch(p.name))
    if not any(p.name == "config.json" for p in files) or not any(p.suffix == ".safetensors" for p in files):
        raise CompilerError(f"{hf_folder} has no config.json or no *.safetensors: vLLM serves a causal LM from its "
                            "Hugging Face weights; compile the Hugging Face folder")
    return sorted(files, key=lambda p: (p.name != "config.json", p.name))


def stage_weights(hf_folder: Path, dest: Path) -> Path:
    """Copy the weights vLLM needs into ``dest`` (a staging folder); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in weights_files(hf_folder):
        shutil.copyfile(f, dest / f.name)
    return dest


def weights_entry(name: str, version: str, staged: Path) -> Variant:
    """The manifest's record of the weights: ``config.json`` as the entry, every other file with its sha256, at the
    paths they have in the store (``NAME/VERSION/hf/FILE``)."""
    files = weights_files(staged)
    base = f"{name}/{version}/{HF_DIR}"

    def record(p: Path) -> ExternalFile:
        return ExternalFile(f"{base}/{p.name}", sha256_file(p), p.stat().st_size)

    head = record(files[0])
    return Variant(head.path, head.sha256, head.size_bytes, tuple(record(p) for p in files[1:]))


# --- the Triton entry -------------------------------------------------------------------------------------


def model_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], version: str | None = None) -> Any:
    """The entry's ``ModelConfig``: ``backend: "vllm"``, decoupled, no Triton batching, ``KIND_MODEL``; the
    vLLM backend's inputs (``stream``, ``sampling_parameters``, ``exclude_input_in_output`` optional, as its
    auto-complete declares them) and ``text_output``. ``version``: serve that version alone."""
    from tritonclient.grpc import model_config_pb2 as mc

    cfg = mc.ModelConfig(name=name, backend="vllm", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    if version is None:
        cfg.version_policy.all.SetInParent()
    else:
        cfg.version_policy.specific.versions.append(int(version))
    for specs, section in ((inputs, cfg.input), (outputs, cfg.output)):
        for s in specs:
            if s.datatype not in TRITON_TYPES:
                raise CompilerError(f"{s.name}: the vLLM backend's tensors are BYTES or BOOL, not {s.datatype}")
            t = section.add(name=s.name, data_type=mc.DataType.Value(TRITON_TYPES[s.datatype]))
            t.dims.extend(list(s.shape))
            if section is cfg.input and s.name in OPTIONAL_INPUTS:
                t.optional = True
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_MODEL, count=1)
    return cfg


def config_pbtxt(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], version: str | None = None) -> str:
    from google.protobuf import text_format

    return str(text_format.MessageToString(model_config(name, inputs, outputs, version)))


def is_vllm_entry(version_dir: Path) -> bool:
    """Whether a Triton version folder holds a vLLM entry (``model.json``) rather than an ONNX model."""
    return (Path(version_dir) / MODEL_JSON).is_file()


def write_repo(out_dir: Path, name: str, version: str, weights_dir: Path, inputs: list[TensorSpec],
               outputs: list[TensorSpec], args: dict[str, Any]) -> Path:
    """Write ``DIR/triton/NAME/VERSION/{config.pbtxt, model.json, hf/...}`` (the weights copied from
    ``weights_dir``, the store's copy) and ``DIR/triton/NAME/config.pbtxt`` for this version; returns the model's
    Triton folder. The model config is re-derived from every listed version by the publisher."""
    root = Path(out_dir) / "triton" / name
    vdir = root / version
    vdir.mkdir(parents=True, exist_ok=True)
    for f in weights_files(weights_dir):
        (vdir / HF_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, vdir / HF_DIR / f.name)  # a copy: the store refuses a hard-linked artifact (2 names)
    (vdir / MODEL_JSON).write_text(model_json_text(args))
    text = config_pbtxt(name, inputs, outputs)
    (vdir / "config.pbtxt").write_text(text)
    tmp = root / ".config.pbtxt.tmp"
    tmp.write_text(text)
    os.replace(tmp, root / "config.pbtxt")
    return root


def publish_gpu_entry(out_dir: Path, name: str, version: str, staged: Path, inputs: list[TensorSpec],
                      outputs: list[TensorSpec], args: dict[str, Any]) -> Path:
    """Move the staged weights into the store (``DIR/NAME/VERSION/hf``) and write the Triton entry. Runs before the
    manifest entry is written, so a reader never sees a version whose weights are missing."""
    dest = Path(out_dir) / name / version / HF_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for f in weights_files(staged):
        os.replace(f, dest / f.name)
    return write_repo(out_dir, name, version, dest, inputs, outputs, args)
