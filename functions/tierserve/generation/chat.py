"""A model's chat template, rendered exactly as transformers' ``apply_chat_template(messages,
add_generation_prompt=True)`` renders it, without transformers.

Why our own renderer: onnxruntime-genai's template engine is not full Jinja and rejects real templates
(onnxruntime-genai #1835), and transformers (with torch) is far too heavy for a Lambda function or a device.
transformers renders with jinja2's ``ImmutableSandboxedEnvironment`` (templates come from model hubs: they
are untrusted code), so we do the same, with the same environment (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``; ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, and the
restricted ``dict`` and ``namespace``), the same variables (the tokenizer's named special tokens ``bos_token``,
``eos_token``, ...; ``messages``; ``tools``/``documents`` None; ``add_generation_prompt``), the same message
clean-up (keys whose value is None dropped, reasoning fields aliased), and the rendered text is tokenized
without adding special tokens again (``add_special_tokens=False``), so the ids are transformers' ids. The tests
check them against transformers for several conversations and templates.

The template comes from ``chat_template.jinja`` beside the tokenizer (transformers' own file; it wins) or from
``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates: ``default`` is used).
jinja2 is imported on first use only.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from tierserve.errors import ArtifactError, InvalidParameterError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
#: transformers' ``SPECIAL_TOKENS_ATTRIBUTES``: the named special tokens a template sees.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: Names a message's reasoning is passed under (transformers' ``_REASONING_FIELDS``).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

_lock = threading.Lock()
_compiled: dict[str, Any] = {}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path.name} is not readable JSON ({exc}); recompile the model") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def template_source(folder: Path) -> str | None:
    """The chat template of the tokenizer in ``folder``, or None when it has none."""
    path = folder / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = _read_json(folder / TOKENIZER_CONFIG).get("chat_template")
    if isinstance(template, list):  # named templates, as transformers saves several
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    elif isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def special_tokens(folder: Path) -> dict[str, str]:
    """transformers' ``special_tokens_map``: the named special tokens that are set (tokenizer_config.json, else
    special_tokens_map.json)."""
    found: dict[str, str] = {}
    for source in (_read_json(folder / SPECIAL_TOKENS_MAP), _read_json(folder / TOKENIZER_CONFIG)):
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(source.get(name))
            if text is not None:
                found[name] = text
    return found


def _compile(source: str) -> Any:
    """The template compiled in transformers' sandboxed environment (cached per template text)."""
    template = _compiled.get(source)
    if template is not None:
        return template
    with _lock:
        template = _compiled.get(source)
        if template is None:
            template = _environment().from_string(source)
            _compiled[source] = template
        return template


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore-prefixed attributes (no way to CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """transformers' clean-up: keys whose value is None dropped, reasoning fields aliased; plain JSON data."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise InvalidParameterError(f"each message must be an object, got {type(message).__name__}",
                                        param="messages", code="invalid_type")
        m = {str(k): _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((m[key] for key in REASONING_FIELDS if m.get(key) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _plain(value: Any) -> Any:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """One tokenizer's template and its special tokens: ``render(messages)`` -> the prompt text."""

    def __init__(self, source: str, tokens: dict[str, str]) -> None:
        self.source = source
        self.tokens = dict(tokens)

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        source = template_source(folder)
        return None if source is None else cls(source, special_tokens(folder))

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        """The conversation as the model reads it; a template error (``raise_exception`` included) is a 400."""
        import jinja2

        chat = normalize_messages(messages)
        if not chat:
            raise InvalidParameterError("messages must hold at least one message", param="messages")
        try:
            compiled = _compile(self.source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ArtifactError(f"the model's chat template is not valid Jinja ({exc}); fix it and recompile") from exc
        try:
            return str(compiled.render(messages=chat, tools=None, documents=None,
                                                    add_generation_prompt=add_generation_prompt, **self.tokens))
        except jinja2.exceptions.SecurityError as exc:
            raise InvalidParameterError(f"the model's chat template refused the conversation: {exc}",
                                        param="messages") from exc
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidParameterError(f"the model's chat template refused the conversation: {exc}",
                                        param="messages") from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise InvalidParameterError(f"the model's chat template could not render these messages ({exc}); "
                                        "check each message's role and content", param="messages") from exc


def render_ids(template: ChatTemplate, messages: Any, encode: Callable[[str, bool], list[int]]) -> list[int]:
    """The token ids of the rendered conversation, special tokens not added again (transformers' way)."""
    return encode(template.render(messages), False)
