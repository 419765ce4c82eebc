"""Tiny causal language models made on this machine: a byte-level BPE, a ChatML template, and a Llama trained
for about a minute on the documentation Python ships.

Why: no model hub is reachable here and no package ships the weights of a useful causal LM, yet `make demo`
has to show a generative model that writes something readable, and the tests need tokenizers and templates
exactly like real ones. Everything is built from ``pydoc_data.topics`` (about 0.5 MB of Python's reference
documentation, in every CPython): :func:`train_tokenizer` trains a GPT-2-style byte-level BPE on it with
``tokenizers``, :data:`CHAT_TEMPLATE` is ChatML as Qwen2 ships it, and :func:`train_model` trains the recipe
checked in ``/work/shared/ENVIRONMENT.md`` (:class:`Recipe`: a 3-layer Llama, hidden size 128, tied embeddings,
about 0.6M parameters, AdamW at lr 3e-3 on batches of 16 x 128 tokens) and saves it in Hugging Face's layout,
the layout ``tierserve compile`` reads. Training is seeded (weights, and the order of the batches) and runs a
fixed number of steps rather than a fixed time, so two runs on the same machine give the same weights.

The training text is each topic as a chat: ``user: What does "<topic>" mean in Python?`` (:func:`question`) and
the topic's text as the assistant's answer, rendered exactly as :data:`CHAT_TEMPLATE` renders it, so that the
model learns the template it is served with. Heavy imports (torch, transformers, tokenizers)
happen inside the functions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: ChatML, as Qwen2's tokenizer_config ships it (a real template: loops, conditionals, a generation prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"  # noqa: S105 - a token of the vocabulary, not a secret
PAD_TOKEN = "<|endoftext|>"  # noqa: S105
#: The system message CHAT_TEMPLATE adds when the conversation has none.
DEFAULT_SYSTEM = "You are a helpful assistant."
#: The files :func:`train_model` writes (Hugging Face's layout, plus the recipe and its loss in training.json);
#: transformers 5 also writes the chat template as chat_template.jinja.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "training.json")


def python_docs() -> list[tuple[str, str]]:
    """``pydoc_data.topics``: (topic, text) pairs, sorted by topic (a fixed order, whatever the dict's)."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def train_tokenizer(vocab_size: int, texts: Iterable[str] | None = None) -> Any:
    """A byte-level BPE (GPT-2 style) of ``vocab_size`` tokens, :data:`SPECIAL_TOKENS` first, trained on ``texts``
    (default: Python's documentation). Deterministic: the same texts give the same ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the 256 byte tokens and the special tokens; "
                         f"use at least {256 + len(SPECIAL_TOKENS)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) if texts is not None else [t for _, t in python_docs()], trainer)
    return tok


def hf_tokenizer(tok: Any, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """``tok`` as transformers' ``PreTrainedTokenizerFast`` (EOS ``<|im_end|>``, pad ``<|endoftext|>``, no BOS),
    with ``chat_template`` set: what ``save_pretrained`` writes as tokenizer.json and tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   bos_token=None, unk_token=None)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def chat_text(user: str, answer: str | None = None, system: str = DEFAULT_SYSTEM) -> str:
    """The text :data:`CHAT_TEMPLATE` renders for one user turn: with ``answer``, the whole exchange (a training
    sample); without, the prompt with the generation prompt (``add_generation_prompt=True``)."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return text if answer is None else f"{text}{answer}<|im_end|>\n"


def training_texts() -> list[str]:
    """Each documentation topic as a chat: the question names the topic, the answer is its text."""
    return [chat_text(question(topic), text.strip()) for topic, text in python_docs()]


def corpus_digest() -> str:
    """sha256 of :func:`training_texts`: a model trained on other text (another Python's documentation, another
    question) is not reused."""
    import hashlib

    return hashlib.sha256("\x00".join(training_texts()).encode()).hexdigest()


def question(topic: str) -> str:
    """The user's turn for a documentation topic in the training text (ask the trained model this way)."""
    return f'What does "{topic}" mean in Python?'


@dataclass(frozen=True)
class Recipe:
    """What :func:`train_model` builds; the defaults are the recipe checked in /work/shared/ENVIRONMENT.md."""

    vocab_size: int = 1024
    layers: int = 3
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 4
    max_positions: int = 1024
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    steps: int = 650
    seed: int = 0
    #: generation_config.json's default (transformers' generate applies it; see train_model's docstring)
    repetition_penalty: float = 1.3

    def key(self) -> dict[str, Any]:
        return asdict(self)


def trained(out: Path, recipe: Recipe) -> dict[str, Any] | None:
    """training.json of a complete model folder built with ``recipe`` on today's :func:`training_texts`, else None
    (absent, partial, another recipe or text)."""
    try:
        info = json.loads((out / "training.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("recipe") != recipe.key():
        return None
    if info.get("corpus_sha256") != corpus_digest():
        return None
    if not all((out / name).is_file() for name in MODEL_FILES):
        return None
    return info


def token_stream(tok: Any, texts: Sequence[str]) -> list[int]:
    """``texts`` encoded one after another into one stream of ids (special tokens recognised)."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)
    return ids


def training_threads() -> int:
    """The cores left idle by the rest of the machine (at least 1). torch's CPU threads spin while they wait for
    each other, so on a busy machine a step with every core takes over ten times as long as with one (measured
    here: 4.8 s against 0.35 s with a load of 11 on 2 cores). The weights do not depend on it: 1 and 2 threads
    gave bit-identical losses and weights here."""
    import os

    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, cores - round(busy)))


def build_model(recipe: Recipe, eos_id: int, pad_id: int) -> Any:
    """The untrained Llama of ``recipe`` (weights seeded with ``recipe.seed``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=recipe.vocab_size, hidden_size=recipe.hidden,
                         intermediate_size=recipe.intermediate, num_hidden_layers=recipe.layers,
                         num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
                         max_position_embeddings=recipe.max_positions, eos_token_id=eos_id, pad_token_id=pad_id,
                         bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def train_model(out: Path, recipe: Recipe = Recipe(), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``recipe`` on Python's documentation and save it to ``out`` (:data:`MODEL_FILES`); returns
    training.json's content (the recipe, parameters, steps, the final loss, seconds).

    Deterministic: torch's generator seeds the weights and a separate seeded generator picks every batch (random
    windows of ``seq_len + 1`` tokens from the token stream), and the run is ``recipe.steps`` steps, not a time.
    generation_config.json asks for ``repetition_penalty`` (what transformers' ``generate`` applies by default);
    onnxruntime-genai's builder does not carry it into genai_config.json, and tierserve's engine decodes with
    the request's parameters only, so greedy text served through the API is without it."""
    import torch
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(training_threads())
    texts = training_texts()
    tok = train_tokenizer(recipe.vocab_size, [t for _, t in python_docs()])
    eos_id, pad_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    data = torch.tensor(token_stream(tok, texts), dtype=torch.long)
    model = build_model(recipe, eos_id, pad_id)
    params = sum(p.numel() for p in model.parameters())
    log(f"  tokenizer: {recipe.vocab_size} tokens, {len(data):,} training tokens; model: Llama, "
        f"{recipe.layers} layers, hidden {recipe.hidden}, {params:,} parameters")
    batches = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    model.train()
    loss_value, started = float("nan"), time.monotonic()
    for step in range(1, recipe.steps + 1):
        starts = torch.randint(0, len(data) - recipe.seq_len - 1, (recipe.batch,), generator=batches)
        window = torch.stack([data[s:s + recipe.seq_len + 1] for s in starts.tolist()])
        loss = model(input_ids=window, labels=window).loss  # the model shifts labels: seq_len predictions
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if step == 1 or step % 100 == 0 or step == recipe.steps:
            log(f"  step {step:>4}/{recipe.steps}  loss {loss_value:.3f}  ({time.monotonic() - started:.0f} s)")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False,
                     repetition_penalty=recipe.repetition_penalty).save_pretrained(out)
    hf_tokenizer(tok).save_pretrained(out)
    info = {"recipe": recipe.key(), "corpus_sha256": corpus_digest(), "parameters": params,
            "training_tokens": len(data), "final_loss": loss_value,
            "train_s": round(time.monotonic() - started, 1), "total_s": round(time.monotonic() - t0, 1),
            "torch_threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
