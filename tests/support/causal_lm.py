"""Tiny causal language models built here, for the tests and the demo: no model hub is reachable.

Why: generation must be tested against the real thing (transformers' ``generate`` on PyTorch, the
onnxruntime-genai builder's export, a real byte-level BPE tokenizer and a real Jinja chat template),
and the only weights available offline are the ones we make. A model here is a random-weight (seeded)
Llama or Qwen2 from a transformers config, 2 layers and hidden size 64, with a byte-level BPE of 512
tokens trained with ``tokenizers`` on the documentation Python ships (``pydoc_data.topics``), and a
ChatML-style chat template (the tokenizer trainer and the template live in tierserve_tools.tiny_lm, which
also trains make demo's model). It is saved with ``save_pretrained`` in Hugging Face's layout, the layout
``tierserve compile`` reads. Each build is cached per session folder and takes a few seconds.

The tokenizer keeps byte-level tokens for non-ASCII text (``é``, ``€``, emoji are split across tokens),
so streamed detokenization is exercised on characters whose bytes arrive in different tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tierserve_tools.tiny_lm import CHAT_TEMPLATE, SPECIAL_TOKENS, hf_tokenizer
from tierserve_tools.tiny_lm import train_tokenizer as train_bpe

__all__ = ["CHAT_TEMPLATE", "MULTIBYTE_TEXT", "SPECIAL_TOKENS", "VOCAB_SIZE", "build_causal_lm", "config_of",
           "hf_greedy", "train_tokenizer"]

VOCAB_SIZE = 512
#: Text with multi-byte characters, for prompts whose tokens split characters across bytes.
MULTIBYTE_TEXT = "Café, naïve façade: 5 € — ½ 🙂 über straße"


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [*topics.values(), MULTIBYTE_TEXT]


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """The tests' byte-level BPE (tierserve_tools.tiny_lm.train_tokenizer) on Python's documentation and
    :data:`MULTIBYTE_TEXT`; deterministic."""
    return train_bpe(vocab_size, _corpus())


def build_causal_lm(out: Path, family: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64,
                    chat_template: str | None = CHAT_TEMPLATE, max_positions: int = 1024) -> Path:
    """Write a random-weight (seeded) causal LM of ``family`` (llama | qwen2) with its tokenizer to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    eos = tok.token_to_id("<|im_end|>")
    fast = hf_tokenizer(tok, chat_template)
    common: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE, "hidden_size": hidden, "intermediate_size": hidden * 2,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": max_positions, "eos_token_id": eos, "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "bos_token_id": None, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    torch.manual_seed(seed)
    model: Any
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"family {family!r}: use llama or qwen2")
    with torch.no_grad():  # larger weights than the default init, so that greedy text is not one token repeated
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


def hf_greedy(folder: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' ``generate(do_sample=False)`` on PyTorch: the reference continuation (new ids only)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), pad_token_id=0)
    return [int(t) for t in out[0, len(prompt_ids):]]


def config_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())  # type: ignore[no-any-return]
