"""Causal LMs through ``tierserve compile`` (issue 17): real builder, real transformers, real onnxruntime-genai.

The tiny models (tests/support/causal_lm.py) are built and compiled once per session (tests/support/genai_store.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.support.causal_lm import config_of, hf_greedy
from tests.support.genai_store import GENAI_MODEL, tierserve_compile
from tierserve.errors import ArtifactError
from tierserve.manifest import MANIFEST_FILE, Manifest
from tierserve.store import ModelStore
from tierserve_compiler.causal_lm import load_prompts
from tierserve_compiler.cli import main as compile_main
from tierserve_compiler.config import make_config
from tierserve_compiler.errors import ConfigError, SourceError

VLLM_INPUTS = ["text_input", "stream", "sampling_parameters", "exclude_input_in_output"]


def og_greedy(folder: Path, prompt_ids: list[int], n: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt_ids], dtype=np.int32))
    out: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def prompt_ids(hf: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(hf / "tokenizer.json")).encode("The with statement is used to").ids


def load(store: Path) -> Manifest:
    return Manifest.loads((store / MANIFEST_FILE).read_text())


def test_tiny_llama_compiles_to_a_generative_entry_served_from_the_store(genai_store, tiny_llama_hf, tmp_path):
    # Given tiny-llama compiled with `tierserve compile --quantize int4` (the genai_store fixture)
    mv = load(genai_store).resolve(GENAI_MODEL)
    # Then the manifest entry is a text-generation model with vLLM's input and output names
    assert mv.task == "text-generation" and mv.generative and mv.max_batch_size == 0
    assert [s.name for s in mv.inputs] == VLLM_INPUTS and [s.name for s in mv.outputs] == ["text_output"]
    # And its generation spec comes from the model's config (KV: 2 layers x 2 x 2 KV heads x 16 x 4 bytes)
    g, cfg = mv.generation, config_of(tiny_llama_hf)
    assert g is not None
    assert (g.context_length, g.eos_token_ids, g.chat_template) == (cfg["max_position_embeddings"], (2,), True)
    assert (g.kv_bytes_per_token, g.vocab_size, g.family) == (512, 512, "llama")
    # And each tier has figures: cpu measured, gpu estimated from the cited table, costs per 1M tokens
    assert set(g.tiers) == {"cpu", "gpu"} and set(g.tiers["cpu"].ttft_ms) == {16, 128, 512}
    assert g.tiers["cpu"].tokens_per_s > 0 and g.tiers["cpu"].source.startswith("measured")
    assert "gpu_generation.json" in g.tiers["gpu"].source and g.tiers["gpu"].cost_per_1m_tokens is not None
    # And the router's prompt-token estimate is calibrated on the validation text (issue 18), with its error
    assert g.chars_per_token is not None and 1.0 < g.chars_per_token < 6.0
    assert g.tokens_per_nonascii_byte is not None and 0 < g.tokens_per_nonascii_byte <= 1.0
    assert g.token_estimate_error is not None and 0 <= g.token_estimate_error < 0.5
    # And fp32 and int4 are onnxruntime-genai folders, int4 selected and on the CPU tier
    assert set(mv.variants) == {"fp32", "int4"} and mv.selected_variant == mv.cpu_variant == "int4"
    assert mv.targets == ("cpu",) and mv.cpu["memory_mb"] == 1769
    for key, variant in mv.variants.items():
        assert variant.path == f"{GENAI_MODEL}/1/{key}/model.onnx"
        names = {Path(e.path).name for e in variant.external_data}
        assert {"model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    # When the store fetches fp32 (every file verified) / Then its greedy continuation equals transformers'
    store = ModelStore(str(genai_store), cache_dir=tmp_path / "cache")
    folder = store.fetch(mv.variants["fp32"]).parent
    assert {p.name for p in folder.iterdir()} >= {"model.onnx", "genai_config.json", "tokenizer.json"}
    ids = prompt_ids(tiny_llama_hf)
    assert og_greedy(folder, ids, 12) == hf_greedy(tiny_llama_hf, ids, 12)


def test_the_report_explains_each_variant(genai_store):
    # Given the compiled tiny-llama's report
    report = json.loads((genai_store / GENAI_MODEL / "1" / "report.json").read_text())
    gate = report["gate"]
    # Then it says which validation text it used and that the chat template gives transformers' token ids
    assert gate["validation"].startswith("--validation") and gate["prompts"] == 3
    assert gate["chat_template"]["equal"] is True
    # And fp32 matches the source exactly; every variant has its gate metrics, decision and reason
    fp32, int4 = report["variants"]["fp32"], report["variants"]["int4"]
    assert fp32["metrics"]["greedy_match"] == 1.0 and fp32["metrics"]["top1_agreement"] >= 0.99
    for v in (fp32, int4):
        assert v["decision"] in ("selected", "kept", "rejected") and v["reason"]
        assert set(v["profile"]["threads"]["1"]["ttft_ms"]) == {"16", "128", "512"}
        assert set(v["profile"]["threads"]["1"]["batches"]) == {"1", "8"}
        # And the KV cache computed from the shape matches what onnxruntime-genai allocates
        assert v["profile"]["kv"]["matches"] and v["profile"]["kv"]["computed_bytes_per_token"] == 512
    assert int4["decision"] == "selected"
    assert any(why in int4["reason"] for why in ("--quantize int4 was requested", "within budget"))
    assert all(line.startswith(("ok: ", "over budget: ")) for line in int4["budget"])
    assert int4["size_bytes"] < fp32["size_bytes"]
    md = (genai_store / GENAI_MODEL / "1" / "report.md").read_text()
    assert "| int4 |" in md and "lambda_memory" in md and "KV cache" in md


def test_every_file_of_a_generative_variant_is_verified_and_published(genai_store, tmp_path):
    # Given a copy of the store whose fp32 tokenizer_config.json was changed after compiling
    bad = tmp_path / "bad"
    shutil.copytree(genai_store, bad)
    tc = bad / GENAI_MODEL / "1" / "fp32" / "tokenizer_config.json"
    tc.write_text(tc.read_text().replace("}", ' }', 1))
    mv = load(bad).resolve(GENAI_MODEL)
    # When the store fetches it / Then the changed file is refused
    with pytest.raises(ArtifactError):
        ModelStore(str(bad), cache_dir=tmp_path / "cache").fetch(mv.variants["fp32"])
    # And `tierserve models publish` uploads every file of every variant, which the new store then verifies
    from tierserve_tools.cli import main as tierserve

    dest = tmp_path / "published"
    assert tierserve(["models", "--store", str(dest), "--by", "test", "publish",
                      str(genai_store / GENAI_MODEL / "1")]) == 0
    published = load(dest).resolve(GENAI_MODEL)
    store = ModelStore(str(dest), cache_dir=tmp_path / "cache2")
    for variant in published.variants.values():
        assert all((dest / f.path).is_file() for f in variant.files())
        assert store.fetch(variant).parent.joinpath("genai_config.json").is_file()


def test_tiny_qwen2_compiles_with_int8_on_the_default_text(tiny_qwen2_hf, tmp_path):
    # Given a tiny Qwen2 / When compiled with the real CLI, --quantize int8 and no --validation
    out = tmp_path / "store"
    proc = tierserve_compile(str(tiny_qwen2_hf), "--name", "tiny-qwen2", "--quantize", "int8", "--out", str(out),
                             "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Then the manifest loads, family qwen2, fp32 + int8
    mv = load(out).resolve("tiny-qwen2")
    assert mv.generation is not None and mv.generation.family == "qwen2" and set(mv.variants) == {"fp32", "int8"}
    # And the report says the default text was used and why int8 was kept or rejected
    report = json.loads((out / "tiny-qwen2" / "1" / "report.json").read_text())
    assert report["gate"]["validation"].startswith("default text shipped with tierserve_compiler")
    assert report["gate"]["prompts"] == len(load_prompts(None)[0])
    assert report["variants"]["int8"]["reason"] and report["variants"]["int8"]["build"]["precision"] == "int8"
    # And fp32 from the store continues greedily exactly as transformers does
    folder = ModelStore(str(out), cache_dir=tmp_path / "cache").fetch(mv.variants["fp32"]).parent
    ids = prompt_ids(tiny_qwen2_hf)
    assert og_greedy(folder, ids, 12) == hf_greedy(tiny_qwen2_hf, ids, 12)


def test_an_unsupported_architecture_is_refused_before_any_work(tmp_path, capsys):
    # Given a GPT-2 folder (a causal LM that onnxruntime-genai's builder cannot export)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    # When compiled / Then exit 2 with a message naming the supported families; nothing is written
    out = tmp_path / "out"
    assert compile_main(["compile", str(gpt2), "--name", "g", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and all(f in err for f in ("llama", "qwen2", "phi"))
    assert not (out / MANIFEST_FILE).exists()
    # And a *ForCausalLM the builder does not know says the same
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2ForCausalLM"]}))
    with pytest.raises(SourceError, match="supports the families llama, mistral, qwen2"):
        make_config(str(gpt2), "g", out_dir=out).validate()


@pytest.mark.parametrize(("options", "message"), [
    ({"quantize": "dynamic"}, "does not apply to a causal LM"),
    ({"quantize": "fp16"}, "vLLM"),
    ({"slo_ms": 50.0}, "--slo-ttft-ms"),
    ({"per_channel": True}, "MatMulNBits"),
    ({"validation": Path("prompts.npz")}, ".txt file"),
])
def test_options_that_mean_nothing_for_a_causal_lm_are_refused(tiny_llama_hf, options, message):
    with pytest.raises(ConfigError, match=message):
        make_config(str(tiny_llama_hf), "m", **options).validate()


def test_llm_slos_are_refused_for_an_onnx_model(mlp_onnx):
    with pytest.raises(ConfigError, match="apply to causal LMs"):
        make_config(str(mlp_onnx), "m", slo_ttft_ms=100.0).validate()


def test_validation_prompts_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\nstill first\n\nsecond\n")
    assert load_prompts(txt) == (["first prompt\nstill first", "second"], f"--validation {txt}")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n"b"\n{"text": "c"}\n')
    assert load_prompts(jsonl)[0] == ["a", "b", "c"]
    jsonl.write_text('{"other": 1}\n')
    with pytest.raises(ConfigError, match="line 1"):
        load_prompts(jsonl)


def test_a_prebuilt_onnxruntime_genai_folder_is_published_as_it_is(genai_store, tmp_path):
    # Given the int4 folder of the compiled tiny-llama, as someone built it for onnxruntime-genai
    src = tmp_path / "prebuilt"
    shutil.copytree(genai_store / GENAI_MODEL / "1" / "int4", src)
    # When it is compiled / Then it is its one variant, its own reference, profiled and placed
    from tierserve_compiler.pipeline import compile_model

    res = compile_model(make_config(str(src), "pre", out_dir=tmp_path / "out", progress=False))
    mv = res.model_version
    assert set(mv.variants) == {"int4"} and mv.selected_variant == "int4" and mv.generative
    assert res.report["gate"]["checked"] is False and "own reference" in res.report["gate"]["reason"]
    # And re-quantizing it is refused
    with pytest.raises(ConfigError, match="already built for onnxruntime-genai"):
        make_config(str(src), "pre", quantize="int8").validate()


def test_a_tiny_phi3_exports_and_matches_transformers(tiny_llama_hf, tmp_path):
    # Given a tiny random-weight Phi-3 (the Phi family) with the tiny Llama's tokenizer files
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    src = tmp_path / "phi3"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tiny_llama_hf / name, src / name)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512, eos_token_id=2,
        pad_token_id=0, bos_token_id=None, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(src, safe_serialization=True)
    # When compiled (fp32 only) / Then the gate passed (fp32 greedy == transformers') and the entry says phi3
    out = tmp_path / "store"
    proc = tierserve_compile(str(src), "--name", "tiny-phi3", "--quantize", "none", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    mv = load(out).resolve("tiny-phi3")
    assert mv.generation is not None and (mv.generation.family, mv.generation.context_length) == ("phi3", 512)
    report = json.loads((out / "tiny-phi3" / "1" / "report.json").read_text())
    assert report["variants"]["fp32"]["metrics"]["greedy_match"] == 1.0


def test_the_edge_gets_a_causal_lm_with_its_figures_and_the_same_content_is_a_no_op(genai_store, tmp_path):
    # Given a prebuilt onnxruntime-genai folder
    src = tmp_path / "prebuilt"
    shutil.copytree(genai_store / GENAI_MODEL / "1" / "fp32", src)
    from tierserve_compiler.pipeline import compile_model

    # When compiled with --target edge / Then the edge serves it, with figures estimated for the device
    cfg = make_config(str(src), "e", out_dir=tmp_path / "out", progress=False, target="edge", edge_profile="rpi5")
    res = compile_model(cfg)
    mv = res.model_version
    assert mv.targets == ("edge", "cpu") and mv.edge_variant == "fp32"
    assert mv.generation is not None and set(mv.generation.tiers) == {"cpu", "gpu", "edge"}
    assert "rpi5" in mv.generation.tiers["edge"].source
    rules = {r["rule"]: r for r in res.report["placement"]["reasons"]}
    assert rules["edge_memory"]["ok"] and "KV cache" in rules["edge_memory"]["detail"]
    # And compiling the same content again writes nothing
    again = compile_model(make_config(str(src), "e", out_dir=tmp_path / "out", progress=False, target="edge",
                                      edge_profile="rpi5"))
    assert again.noop and again.version == "1"


def test_a_variant_depends_on_its_source_only_not_on_the_working_trees_git_commit(genai_store):
    # The builder stamps producer_version with `git rev-parse HEAD` run five folders above its own file: in a
    # venv inside a git working tree, that is the project's commit, so every commit changed model.onnx's sha256
    # and compiling the same source again was never a no-op.
    import subprocess

    import onnx

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    model = onnx.load(str(genai_store / GENAI_MODEL / "1" / "fp32" / "model.onnx"), load_external_data=False)
    assert model.producer_name == "onnxruntime-genai"
    assert not head or head[:7] not in model.producer_version
