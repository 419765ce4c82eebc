"""tierserve_tools.tiny_lm: the tokenizer trainer, the chat template and the trainer make demo (and the tests'
tiny models) build on. They must be deterministic (a rerun of the demo gets the same model), and the model folder
must be the Hugging Face layout `tierserve compile` and transformers read."""

from __future__ import annotations

import json

import pytest

from tierserve_tools import tiny_lm
from tierserve_tools.tiny_lm import MODEL_FILES, Recipe, train_model, train_tokenizer, trained

pytest.importorskip("tokenizers")

#: A recipe small enough to train in a second or two (the demo's is Recipe()).
SMALL = Recipe(vocab_size=300, layers=1, hidden=32, intermediate=64, heads=2, kv_heads=2, max_positions=64,
               batch=2, seq_len=16, steps=3)


def test_the_tokenizer_is_the_same_every_time_and_holds_the_special_tokens_first() -> None:
    texts = [text for _, text in tiny_lm.python_docs()[:10]]
    a, b = train_tokenizer(300, texts), train_tokenizer(300, texts)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 300
    assert [a.token_to_id(t) for t in tiny_lm.SPECIAL_TOKENS] == [0, 1, 2]
    assert a.decode(a.encode("Café € 🙂").ids) == "Café € 🙂"  # byte-level: any text round-trips


def test_a_vocabulary_without_room_for_the_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 259"):
        train_tokenizer(100, ["x"])


def test_the_python_docs_come_in_a_fixed_order() -> None:
    docs = tiny_lm.python_docs()
    assert [k for k, _ in docs] == sorted(k for k, _ in docs) and len(docs) > 50


def test_chat_text_is_what_the_chat_template_renders() -> None:
    pytest.importorskip("transformers")
    fast = tiny_lm.hf_tokenizer(train_tokenizer(300, ["hello world"]))
    messages = [{"role": "user", "content": "What is a list?"}]
    assert tiny_lm.chat_text("What is a list?") == fast.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=True)
    whole = [*messages, {"role": "assistant", "content": "A sequence."}]
    assert tiny_lm.chat_text("What is a list?", "A sequence.") == fast.apply_chat_template(whole, tokenize=False)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("tiny-lm") / "model"
    return out, train_model(out, SMALL, log=lambda _line: None)


def test_the_model_folder_is_hugging_faces_layout_with_the_recipe(small_model) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, info = small_model
    names = {p.name for p in out.iterdir()}
    assert set(MODEL_FILES) <= names <= {*MODEL_FILES, "chat_template.jinja"}  # transformers 5 writes the .jinja
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (1, 32, 300)
    assert json.loads((out / "generation_config.json").read_text())["repetition_penalty"] == SMALL.repetition_penalty
    assert info["recipe"] == SMALL.key() and info["parameters"] > 0 and info["final_loss"] > 0
    assert trained(out, SMALL) == info
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == tiny_lm.CHAT_TEMPLATE
    assert config["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == info["parameters"]


def test_a_folder_of_another_recipe_or_missing_a_file_is_not_reused(small_model, tmp_path) -> None:
    import shutil

    out, _ = small_model
    assert trained(out, Recipe()) is None  # the demo's recipe: train again
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (partial / "model.safetensors").unlink()
    assert trained(partial, SMALL) is None
    assert trained(tmp_path / "absent", SMALL) is None
    other_text = tmp_path / "other-text"
    shutil.copytree(out, other_text)
    info = json.loads((other_text / "training.json").read_text())
    (other_text / "training.json").write_text(json.dumps({**info, "corpus_sha256": "0" * 64}))
    assert trained(other_text, SMALL) is None


def test_training_is_deterministic(small_model, tmp_path) -> None:
    out, info = small_model
    again = train_model(tmp_path / "again", SMALL, log=lambda _line: None)
    assert again["final_loss"] == info["final_loss"]
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
