"""The chat template renders to transformers' own token ids (apply_chat_template, add_generation_prompt=True)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.genai_models import TinyLM
from tierserve.errors import ArtifactError, InvalidParameterError
from tierserve.generation.chat import ChatTemplate, special_tokens, template_source

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}],
    [{"role": "user", "content": "Café? 5 € 🙂"}, {"role": "assistant", "content": "Oui."},
     {"role": "user", "content": "  spaces\n\nand lines  "}],
    [{"role": "user", "content": "x", "name": None}],  # a None value is dropped, as transformers drops it
]

#: A Llama-3-like template: bos_token, namespace, loop controls, tojson, raise_exception, strftime_now,
#: and whitespace that trim_blocks / lstrip_blocks remove.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system='') %}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif %}
    {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('roles are user or assistant') }}{% endif %}
<|im_start|>{{ m['role'] }} {{ m['content'] | tojson }}{% if ns.system %} [{{ ns.system }}]{% endif %}<|im_end|>
    {% if loop.index > 5 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant {{ strftime_now('%Y') }}
{% endif %}"""


def _hf(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _ids(folder: Path, messages) -> list[int]:
    from tokenizers import Tokenizer

    template = ChatTemplate.from_folder(folder)
    assert template is not None
    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(template.render(messages),
                                                                      add_special_tokens=False).ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_token_ids_equal_transformers_for_each_conversation(tiny_lms: dict[str, TinyLM], family: str) -> None:
    # Given the exported model's folder (the files the runtime gets) and transformers' tokenizer of the source
    lm = tiny_lms[family]
    hf = _hf(lm.hf)
    for messages in CONVERSATIONS:
        # When both render the conversation with a generation prompt, Then the ids are the same
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert _ids(lm.genai, messages) == list(expected), messages


def _folder_with(tmp_path: Path, lm: TinyLM, template: str, *, in_config: bool) -> Path:
    folder = tmp_path / "tok"
    shutil.copytree(lm.hf, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|endoftext|>"
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    if in_config:
        config["chat_template"] = template
    else:
        (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("in_config", [False, True], ids=["chat_template.jinja", "tokenizer_config.json"])
def test_a_rich_template_renders_as_transformers_renders_it(tmp_path: Path, llama: TinyLM, in_config: bool) -> None:
    # Given a template with bos_token, namespace, loop controls, tojson and strftime_now, from either place
    folder = _folder_with(tmp_path, llama, RICH_TEMPLATE, in_config=in_config)
    hf = _hf(folder)
    assert template_source(folder) == RICH_TEMPLATE
    assert special_tokens(folder)["bos_token"] == "<|endoftext|>"
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        # Then the text and the ids are transformers'
        assert ChatTemplate.from_folder(folder).render(messages) == hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False)
        assert _ids(folder, messages) == list(expected)


def test_raise_exception_in_a_template_is_a_400_naming_messages(tmp_path: Path, llama: TinyLM) -> None:
    folder = _folder_with(tmp_path, llama, RICH_TEMPLATE, in_config=False)
    with pytest.raises(InvalidParameterError, match="roles are user or assistant") as err:
        ChatTemplate.from_folder(folder).render([{"role": "tool", "content": "x"}])
    assert err.value.param == "messages"


def test_the_sandbox_refuses_what_transformers_refuses(tmp_path: Path, llama: TinyLM) -> None:
    # Given a template that reaches for Python internals
    folder = _folder_with(tmp_path, llama, "{{ messages.__class__.__mro__ }}{% set ns = namespace(_x=1) %}",
                          in_config=False)
    # Then rendering it is refused, never executed
    with pytest.raises(InvalidParameterError, match="refused"):
        ChatTemplate.from_folder(folder).render([{"role": "user", "content": "x"}])


def test_a_broken_template_is_the_models_fault_not_the_clients(tmp_path: Path, llama: TinyLM) -> None:
    folder = _folder_with(tmp_path, llama, "{% for m in messages %}", in_config=False)
    with pytest.raises(ArtifactError, match="not valid Jinja"):
        ChatTemplate.from_folder(folder).render([{"role": "user", "content": "x"}])


def test_a_tokenizer_without_a_template_has_none(tmp_path: Path, llama: TinyLM) -> None:
    folder = tmp_path / "bare"
    shutil.copytree(llama.genai, folder)
    (folder / "chat_template.jinja").unlink()
    assert ChatTemplate.from_folder(folder) is None


def test_an_empty_conversation_is_a_400(llama: TinyLM) -> None:
    with pytest.raises(InvalidParameterError, match="at least one message"):
        ChatTemplate.from_folder(llama.genai).render([])
