"""Causal language models (task text-generation, issue 17): what the compiler knows about one, and its pipeline.

Why a module of its own: a causal LM is compiled like any other model (``tierserve compile SOURCE --name
NAME``), but each step means something else. Its source is a folder, in Hugging Face's layout (a
``*ForCausalLM`` ``config.json``, safetensors, ``tokenizer.json`` / ``tokenizer_config.json``, an optional chat
template) or already built for onnxruntime-genai (``genai_config.json``); its variants are onnxruntime-genai
folders written by the field's own tool, ``python -m onnxruntime_genai.models.builder -i HF -o OUT -p
fp32|int4|int8 -e cpu`` (:func:`run_builder`, one subprocess each); its accuracy gate compares token
predictions against transformers on PyTorch (:func:`tierserve_compiler.gate.gate_causal_lm`); it is profiled
in tokens/s and time to first token (:func:`tierserve_compiler.profile.profile_generative`) and placed by its
weights plus its KV cache (:func:`tierserve_compiler.placement.place_generation`). Selection
(``pipeline.select``), the variant registry (``variants.VARIANTS``), the report and publishing are the ones
every model goes through.

:func:`compile_causal_lm` runs: inspect the source (an unsupported architecture is refused before any work)
-> build the variants (in parallel) -> identity (a no-op for the same content) -> accuracy gate and chat
template check -> profile -> select -> place (CPU class, edge, GPU) -> manifest entry with a
:class:`~tierserve.manifest.GenerationSpec` -> report -> publish.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierserve.manifest import GENAI_FILE_RE, TASK_TEXT_GENERATION, GenerationSpec, ModelVersion, TensorSpec
from tierserve_compiler.config import CompileConfig
from tierserve_compiler.errors import AccuracyGateError, ConfigError, SourceError, VariantError

if TYPE_CHECKING:
    from tierserve_compiler.pipeline import BuiltVariant, CompileResult

#: The causal-LM architectures onnxruntime-genai's model builder (0.18) exports, by family.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "PhiForCausalLM": "phi",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "GraniteForCausalLM": "granite",
    "OlmoForCausalLM": "olmo",
    "NemotronForCausalLM": "nemotron",
    "InternLM2ForCausalLM": "internlm2",
    "SmolLM3ForCausalLM": "smollm3",
}
FAMILIES = ", ".join(dict.fromkeys(SUPPORTED_ARCHITECTURES.values()))

#: Triton's vLLM backend's input and output names: what a generative version's /config lists.
INPUTS = (
    TensorSpec("text_input", "BYTES", (1,)),
    TensorSpec("stream", "BOOL", (1,)),
    TensorSpec("sampling_parameters", "BYTES", (1,)),
    TensorSpec("exclude_input_in_output", "BOOL", (1,)),
)
OUTPUTS = (TensorSpec("text_output", "BYTES", (-1,)),)

DEFAULT_PROMPTS = Path(__file__).with_name("validation_prompts.json")
#: The gate compares every position of each prompt's first GATE_POSITIONS tokens, and GREEDY_TOKENS greedy
#: tokens after each prompt's first half.
GATE_POSITIONS = 64
GREEDY_TOKENS = 16
#: Options of the ONNX-model pipeline that mean nothing for a causal LM.
NOT_FOR_CAUSAL_LM = {
    "calibration": "--calibration (int4/int8 here are weight-only, MatMulNBits: nothing to calibrate)",
    "calibration_method": "--calibration-method",
    "per_channel": "--per-channel/--per-tensor (MatMulNBits quantizes per block of 32 weights)",
    "example_inputs": "--example-inputs (a causal LM's inputs are text)",
    "metrics": "--metric (a causal LM is gated on top-1 agreement, perplexity and greedy continuations)",
    "slo_ms": "--slo-ms (use --slo-ttft-ms and --slo-tokens-per-s)",
}


@dataclass
class CausalSource:
    """A causal LM folder, as the compiler understands it."""

    kind: str  # hf-causal-lm | onnxruntime-genai
    folder: Path
    architecture: str
    family: str
    context_length: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    layers: int
    kv_heads: int
    head_dim: int
    parameters: int = 0
    chat_template: str | None = None
    precision: str = "fp32"  # a prebuilt folder's weights: fp32 | int4 | int8
    inputs: tuple[TensorSpec, ...] = INPUTS
    outputs: tuple[TensorSpec, ...] = OUTPUTS
    notes: list[str] = field(default_factory=list)

    @property
    def model_file(self) -> Path:
        return self.folder / ("config.json" if self.kind == "hf-causal-lm" else "genai_config.json")

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 KV cache (the builder's CPU models keep it in float32, int4/int8 weights included)."""
        from tierserve_compiler.profile import kv_bytes_per_token

        return kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim, 4)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path} is not readable JSON ({exc}); fix or re-save the model folder") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{path} must hold a JSON object")
    return data


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def chat_template_of(folder: Path) -> str | None:
    """The chat template a folder ships: ``chat_template.jinja``, else ``tokenizer_config.json``'s."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        value = _read_json(tc).get("chat_template")
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # [{"name": "default", "template": "..."}, ...]
            named = {d.get("name"): d.get("template") for d in value if isinstance(d, dict)}
            return named.get("default") or next(iter(named.values()), None)
    return None


def inspect_source(folder: Path) -> CausalSource:
    """Read a causal LM folder; a :class:`SourceError` says what is missing or unsupported, before any work."""
    folder = Path(folder)
    if (folder / "genai_config.json").is_file():
        return _inspect_genai(folder)
    cfg = _read_json(folder / "config.json")
    archs = cfg.get("architectures") or []
    arch = str(archs[0]) if archs else ""
    if not arch.endswith("ForCausalLM"):
        raise SourceError(f"{folder}/config.json names architecture {arch or 'none'!r}; a causal LM folder's "
                          "config.json names a *ForCausalLM architecture (supported families: " + FAMILIES + ")")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise SourceError(f"{arch} cannot be exported: onnxruntime-genai's model builder supports the families "
                          f"{FAMILIES} ({', '.join(SUPPORTED_ARCHITECTURES)}); convert the model to one of them or "
                          "build it for onnxruntime-genai yourself and compile that folder (genai_config.json)")
    if not list(folder.glob("*.safetensors")):
        raise SourceError(f"{folder} has no *.safetensors weights; save the model with "
                          "save_pretrained(..., safe_serialization=True)")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise SourceError(f"{folder} has no {name}: onnxruntime-genai needs a fast tokenizer's files; save the "
                              "tokenizer with PreTrainedTokenizerFast.save_pretrained into the same folder")
    gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    eos = _ids(gen.get("eos_token_id")) or _ids(cfg.get("eos_token_id"))
    if not eos:
        raise SourceError(f"{folder}: neither generation_config.json nor config.json names an eos_token_id; set one")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    context = int(cfg.get("max_position_embeddings") or 0)
    if context < 2:
        raise SourceError(f"{folder}/config.json has no max_position_embeddings; it is the model's context length")
    params = 0
    try:
        from safetensors import safe_open

        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "np") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    n = 1
                    for d in st.get_slice(k).get_shape():
                        n *= int(d)
                    params += n
    except ImportError:
        pass
    return CausalSource(
        "hf-causal-lm", folder, arch, SUPPORTED_ARCHITECTURES[arch], context, eos, int(cfg["vocab_size"]),
        int(cfg["num_hidden_layers"]), int(cfg.get("num_key_value_heads") or heads),
        int(cfg.get("head_dim") or hidden // heads), params, chat_template_of(folder),
    )


def _inspect_genai(folder: Path) -> CausalSource:
    g = _read_json(folder / "genai_config.json")
    try:
        m = g["model"]
        d = m["decoder"]
        model_file = folder / str(d.get("filename", "model.onnx"))
        src = CausalSource(
            "onnxruntime-genai", folder, f"onnxruntime-genai {m.get('type', '?')}", str(m.get("type", "")),
            int(m["context_length"]), _ids(m.get("eos_token_id")), int(m["vocab_size"]), int(d["num_hidden_layers"]),
            int(d.get("num_key_value_heads") or d["num_attention_heads"]), int(d["head_size"]),
            chat_template=chat_template_of(folder),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"{folder}/genai_config.json lacks {exc} (model.context_length, vocab_size, eos_token_id, "
                          "decoder.num_hidden_layers/num_key_value_heads/head_size); rebuild it with the builder"
                          ) from exc
    if model_file.name != "model.onnx" or not model_file.is_file():
        raise SourceError(f"{folder}: genai_config.json's decoder file must be model.onnx, present in the folder")
    if not (folder / "tokenizer.json").is_file():
        raise SourceError(f"{folder} has no tokenizer.json; onnxruntime-genai needs it beside the model")
    if not src.eos_token_ids:
        raise SourceError(f"{folder}/genai_config.json names no eos_token_id")
    src.precision = _precision(model_file)
    return src


def _precision(model: Path) -> str:
    """fp32, int4 or int8, from the graph's MatMulNBits nodes (their ``bits``)."""
    import onnx

    bits = set()
    for n in onnx.load(str(model), load_external_data=False).graph.node:
        if n.op_type == "MatMulNBits":
            bits |= {a.i for a in n.attribute if a.name == "bits"}
    return "int4" if 4 in bits else "int8" if 8 in bits else "fp32"


def describe(src: CausalSource) -> list[str]:
    notes = [f"{src.kind}: {src.architecture} ({src.family}), {src.layers} layers, {src.kv_heads} KV heads x "
             f"{src.head_dim}, context {src.context_length}, vocabulary {src.vocab_size}, EOS {list(src.eos_token_ids)}"
             + (f", {src.parameters:,} parameters" if src.parameters else "")]
    notes.append("chat template: " + ("present" if src.chat_template else "none (/v1/chat/completions will be a 400)"))
    if src.kind == "onnxruntime-genai":
        notes.append(f"prebuilt onnxruntime-genai folder ({src.precision}): published as it is; no transformers "
                     "reference (no Hugging Face weights), so it is its own reference")
    return notes


def check_options(cfg: CompileConfig) -> None:
    """The options that mean nothing for a causal LM, and the source itself, refused before any work."""
    for attr, flag in NOT_FOR_CAUSAL_LM.items():
        if getattr(cfg, attr) not in (None, (), {}):
            raise ConfigError(f"{flag} does not apply to a causal LM; drop it")
    if cfg.dynamic_axes:
        raise ConfigError("--dynamic-axis does not apply to a causal LM (the builder's graph is dynamic); drop it")
    if cfg.validation is not None:
        v = Path(cfg.validation)
        if v.suffix not in (".txt", ".jsonl"):
            raise ConfigError(f"--validation {v}: a causal LM is validated on text: a .txt file (prompts separated "
                              "by blank lines) or a .jsonl file ({\"prompt\": \"...\"} per line)")
        if not v.is_file():
            raise ConfigError(f"--validation {v}: no such file; check the path")
    src = inspect_source(Path(cfg.source))
    if src.kind == "onnxruntime-genai" and cfg.quantize not in ("auto", "none"):
        raise ConfigError(f"--quantize {cfg.quantize}: {cfg.source} is already built for onnxruntime-genai "
                          f"({src.precision}) and is published as it is; compile the Hugging Face folder to build "
                          "other precisions")


def load_prompts(path: Path | None) -> tuple[list[str], str]:
    """Validation prompts: ``.txt`` (paragraphs separated by blank lines) or ``.jsonl`` (``{"prompt"|"text": ...}``
    or a JSON string per line); without a file, the package's default text. Returns (prompts, where from)."""
    if path is None:
        doc = json.loads(DEFAULT_PROMPTS.read_text())
        return list(doc["prompts"]), f"default text shipped with tierserve_compiler ({doc['source']})"
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--validation {path}, line {i}: not JSON ({exc})") from exc
            value = obj if isinstance(obj, str) else (
                obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"--validation {path}, line {i}: expected {{\"prompt\": \"...\"}} or a JSON string")
            prompts.append(value)
    else:
        prompts = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not prompts:
        raise ConfigError(f"--validation {path} holds no prompt")
    return prompts, f"--validation {path}"


# --- building variants -----------------------------------------------------------------------------------


def run_builder(src: Path, out: Path, precision: str) -> dict[str, Any]:
    """``python -m onnxruntime_genai.models.builder -i SRC -o OUT -p PRECISION -e cpu`` in a subprocess; the
    folder keeps only the files an onnxruntime-genai variant may list (``manifest.GENAI_FILE_RE``)."""
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix=f".builder-cache-{precision}-", dir=out.parent))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    # The builder stamps producer_version with `git rev-parse HEAD` run five folders above its own file, which in
    # a venv inside a git working tree is that tree's commit: model.onnx (and its sha256, the version's identity)
    # would change with every commit. Without a git directory it uses the package's own commit.
    env = {**os.environ, "GIT_DIR": str(cache / "no-git")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not (out / "model.onnx").is_file() or not (out / "genai_config.json").is_file():
        tail = (proc.stderr or proc.stdout)[-1500:]
        raise VariantError(f"onnxruntime-genai's builder failed for {precision} (exit {proc.returncode}): {tail}")
    dropped = []
    for p in sorted(out.iterdir()):
        if p.is_dir() or not GENAI_FILE_RE.fullmatch(p.name):
            dropped.append(p.name)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    info: dict[str, Any] = {"method": f"onnxruntime_genai.models.builder -p {precision} -e cpu",
                            "command": "python -m onnxruntime_genai.models.builder -i SRC -o OUT "
                                       f"-p {precision} -e cpu",
                            "seconds": round(seconds, 2), "precision": _precision(out / "model.onnx")}
    if dropped:
        info["dropped_files"] = dropped
    return info


def copy_prebuilt(src: Path, out: Path) -> dict[str, Any]:
    """A prebuilt onnxruntime-genai folder's servable files, copied as they are."""
    out.mkdir(parents=True, exist_ok=True)
    kept = []
    for p in sorted(src.iterdir()):
        if p.is_file() and GENAI_FILE_RE.fullmatch(p.name):
            shutil.copyfile(p, out / p.name)
            kept.append(p.name)
    return {"method": "prebuilt onnxruntime-genai folder, copied", "files": kept,
            "precision": _precision(out / "model.onnx")}


def build_variants(src: CausalSource, cfg: CompileConfig, work: Path) -> list[BuiltVariant]:
    """The variants ``--quantize`` asks for, built in parallel (each builder is its own process)."""
    from tierserve_compiler.pipeline import BuiltVariant
    from tierserve_compiler.variants import REFERENCE, filename, mode_variants, spec

    if src.kind == "onnxruntime-genai":
        dst = work / filename(src.precision if src.precision != "fp32" else REFERENCE, TASK_TEXT_GENERATION)
        key = dst.parent.name
        return [BuiltVariant(key, dst, copy_prebuilt(src.folder, dst.parent))]
    keys = mode_variants(cfg.quantize, TASK_TEXT_GENERATION)
    explicit = cfg.quantize != "auto"

    def build(key: str) -> BuiltVariant:
        dst = work / filename(key, TASK_TEXT_GENERATION)
        try:
            return BuiltVariant(key, dst, spec(key, TASK_TEXT_GENERATION).build(src.folder, dst, cfg, None))
        except VariantError as exc:
            if explicit or key == REFERENCE:
                raise
            return BuiltVariant(key, None, decision="rejected", reason=f"could not be built: {exc.message}",
                                error=exc.message)

    with ThreadPoolExecutor(max_workers=len(keys)) as pool:
        return list(pool.map(build, keys))


# --- the pipeline ------------------------------------------------------------------------------------------


def compile_causal_lm(cfg: CompileConfig) -> CompileResult:
    """Every step for a causal LM (``compile_model`` sends a causal LM folder here)."""
    from tierserve.generation.tokens import calibrate_folder
    from tierserve_compiler.gate import check_chat_template, gate_causal_lm
    from tierserve_compiler.pipeline import CompileResult, _unchanged, select, start_compile
    from tierserve_compiler.placement import place_generation, place_generation_edge
    from tierserve_compiler.profile import profile_generative
    from tierserve_compiler.publish import existing_version, publish, variant_entries
    from tierserve_compiler.report import build_generation_report
    from tierserve_compiler.sources import export

    out_dir, manifest, name, version, prices, prog = start_compile(cfg)
    prompts, prompts_from = load_prompts(cfg.validation)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as td:
        work = Path(td)
        exported = export(cfg, work)
        src: CausalSource = exported.causal
        with prog.step(f"build {cfg.quantize} variants of {src.architecture} with onnxruntime-genai's builder"):
            variants = build_variants(src, cfg, work)
        ref = variants[0]
        assert ref.path is not None
        identity = variant_entries(name, version, {ref.key: ref.path})[ref.key]
        existing = existing_version(manifest, out_dir, name, version, identity, explicit=cfg.version is not None,
                                    reference=ref.key)
        if existing is not None:
            prog.note(f"{name} v{existing.version} already holds this model: nothing to do")
            return _unchanged(out_dir, existing)
        built = {v.key: v.path.parent for v in variants if v.path is not None}
        with prog.step(f"accuracy gate against transformers on {len(prompts)} prompts"):
            gate = gate_causal_lm(src, built, prompts) if src.kind == "hf-causal-lm" else {
                "checked": False, "reason": "a prebuilt onnxruntime-genai folder has no Hugging Face weights to "
                "compare with; it is its own reference", "variants": {k: {} for k in built}}
            chat = check_chat_template(src, built[ref.key])
            gate.update({"validation": prompts_from, "prompts": len(prompts), "chat_template": chat})
        _judge(variants, gate, cfg)
        if chat.get("checked") and not chat.get("equal"):
            raise AccuracyGateError(f"the chat template rendered with jinja2's sandbox gives other token ids than "
                                    f"transformers' apply_chat_template: {chat.get('detail')}; fix the template")
        pcfg = dataclasses.replace(cfg.profile, batch_sizes=(1, 8))
        with prog.step("profile each variant in a subprocess (1 thread and all threads)"):
            for v in variants:
                if v.path is not None:
                    v.profile = profile_generative(
                        v.path.parent, context_length=src.context_length, vocab_size=src.vocab_size,
                        layers=src.layers, kv_per_token=src.kv_bytes_per_token, cfg=pcfg, workdir=work)
        sel = select(variants, dataclasses.replace(cfg, profile=pcfg), task=TASK_TEXT_GENERATION)
        by = {v.key: v for v in variants}
        with prog.step("place"):
            cpu = by[sel.cpu]
            assert cpu.profile is not None
            placement, figures = place_generation(src, cpu.profile, cfg, prices)
            edge_variant, edge_figures = place_generation_edge(placement, variants, src, cfg, prices)
        for r in placement.reasons:
            prog.note(f"{'ok ' if r.ok else 'NO '} {r.rule}: {r.detail}")
        tiers = dict(figures)
        if edge_figures is not None:
            tiers["edge"] = edge_figures
        hf_staged = _stage_gpu_weights(src, placement, work, prog)
        generation = GenerationSpec(
            context_length=src.context_length, eos_token_ids=src.eos_token_ids, chat_template=bool(src.chat_template),
            max_concurrency=int(placement.cpu.get("max_concurrency", 1)), kv_bytes_per_token=src.kv_bytes_per_token,
            vocab_size=src.vocab_size, family=src.family, tiers=tiers,
            default_max_tokens=min(256, src.context_length - 1), max_tokens_cap=min(4096, src.context_length - 1),
            slo_ttft_ms=cfg.slo_ttft_ms, slo_tokens_per_s=cfg.slo_tokens_per_s, slo_total_ms=cfg.slo_total_ms,
            **calibrate_folder(built[ref.key], prompts),
            hf_weights=None if hf_staged is None else _weights_entry(name, version, hf_staged),
        )
        staged = {v.key: v.path for v in variants if v.path is not None}
        from tierserve_compiler.publish import now_utc

        mv = ModelVersion(
            name=name, version=version, inputs=src.inputs, outputs=src.outputs,
            variants=variant_entries(name, version, staged), selected_variant=sel.selected,
            targets=tuple(placement.targets), cpu_variant=sel.cpu if "cpu" in placement.targets else None,
            edge_variant=edge_variant, max_batch_size=0, routing=placement.routing,
            cpu={k: placement.cpu[k] for k in ("memory_mb", "threads")}, created_at=now_utc(),
            task=TASK_TEXT_GENERATION, generation=generation,
        )
        report = build_generation_report(cfg, exported, variants, placement, mv, gate)
        with prog.step("publish"):
            if hf_staged is not None:  # the GPU tier's vLLM entry (tierserve_compiler.vllm): before the manifest entry
                report["gpu_entry"] = _publish_gpu_entry(out_dir, mv, src, hf_staged)
            vdir, _ = publish(out_dir, mv, staged, report, None)
            if hf_staged is not None:
                from tierserve_compiler.publish import write_triton_model_config

                write_triton_model_config(out_dir, name)
    prog.note(f"{name} v{version}: selected {sel.selected}, targets {list(placement.targets)} -> {vdir}")
    result = CompileResult(name, version, out_dir, vdir, mv, report)
    prog.note(result.next_steps)
    return result


def _stage_gpu_weights(src: CausalSource, placement: Any, work: Path, prog: Any) -> Path | None:
    """The Hugging Face weights staged for the GPU tier's vLLM entry when the placement names the GPU, else None."""
    if "gpu" not in placement.targets:
        return None
    if src.kind != "hf-causal-lm":
        prog.note("GPU tier: no vLLM entry written: vLLM serves a causal LM from its Hugging Face weights, which a "
                  "prebuilt onnxruntime-genai folder does not have; compile the Hugging Face folder")
        return None
    from tierserve_compiler.vllm import HF_DIR, stage_weights

    return stage_weights(src.folder, work / HF_DIR)


def _weights_entry(name: str, version: str, staged: Path) -> Any:
    from tierserve_compiler.vllm import weights_entry

    return weights_entry(name, version, staged)


def _publish_gpu_entry(out_dir: Path, mv: ModelVersion, src: CausalSource, staged: Path) -> dict[str, Any]:
    """Move the weights into the store and write ``triton/NAME/VERSION`` for vLLM; what the report says of it."""
    from tierserve_compiler import vllm

    args = vllm.engine_args(mv.name, mv.version, context_length=src.context_length, dtype=vllm.dtype_of(src.folder))
    vllm.publish_gpu_entry(out_dir, mv.name, mv.version, staged, list(mv.inputs), list(mv.outputs), args)
    pin = vllm.pinned()
    return {"backend": "vllm", "image": pin["triton_image"], "vllm_version": pin["vllm_version"],
            "engine_args": args, "triton": f"triton/{mv.name}/{mv.version}"}


def _judge(variants: list[BuiltVariant], gate: dict[str, Any], cfg: CompileConfig) -> None:
    """Each variant's gate metrics against its budget (``cfg.budget`` or its record's); fp32 must match exactly."""
    from tierserve_compiler.variants import REFERENCE, spec

    for v in variants:
        if v.path is None:
            continue
        m = gate["variants"].get(v.key) or {}
        v.metrics = {k: m.get(k) for k in ("top1_agreement", "perplexity_ratio", "greedy_match")}
        if not gate.get("checked"):
            v.within_budget, v.budget_reasons = True, ["not compared: " + str(gate.get("reason"))]
            continue
        b = cfg.budget if cfg.budget is not None and v.key != REFERENCE else spec(v.key, TASK_TEXT_GENERATION).budget
        checks = [
            ("top-1 agreement", m["top1_agreement"], b.min_top1_agreement, m["top1_agreement"] >= b.min_top1_agreement,
             ">="),
            ("perplexity ratio", m["perplexity_ratio"], b.max_perplexity_ratio,
             m["perplexity_ratio"] <= b.max_perplexity_ratio, "<="),
            ("greedy match", m["greedy_match"], b.min_greedy_match, m["greedy_match"] >= b.min_greedy_match, ">="),
        ]
        v.within_budget = all(ok for *_, ok, _ in checks)
        v.budget_reasons = [f"{'ok' if ok else 'over budget'}: {what} {val:.4f} (budget {op} {lim:g})"
                            for what, val, lim, ok, op in checks]
        if v.key == REFERENCE and m["greedy_match"] < 1.0:
            raise AccuracyGateError(
                f"the fp32 export's greedy continuations differ from transformers' on "
                f"{m['greedy_mismatches']} of {m['greedy_prompts']} prompts (first: {m.get('first_mismatch')}); "
                "the export is wrong: check the builder's version against the model's architecture")
