"""A generation request once parsed, whatever protocol it came in: OpenAI's chat or completions, or Triton's
generate extension.

Why its own module: the protocol parsers (``generation/openai.py``, ``generation/triton_generate.py``) and
everything after them (admission, the engine, the backends, the CPU function's streamed Invoke, batch) share
one request type, so a parameter is validated once and means the same on every tier. It serialises to JSON
(:meth:`GenerationRequest.to_json`) for the router -> CPU function hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

#: Which protocol a request came in: it decides how the answer is rendered, not how it is generated.
KIND_CHAT = "chat"              # POST /v1/chat/completions
KIND_COMPLETION = "completion"  # POST /v1/completions
KIND_TRITON = "triton"          # POST /v2/models/{m}/generate[_stream]
KINDS = (KIND_CHAT, KIND_COMPLETION, KIND_TRITON)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters, validated by the protocol parser. ``temperature == 0`` is greedy; a ``seed`` makes
    sampling reproducible; ``max_tokens`` None means the model's ``default_max_tokens``."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: vLLM's ``ignore_eos``: an EOS id does not end the generation; it goes on to ``max_tokens`` (issue 19: the
    #: field's bench tools send it to fix the output length).
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def key(self) -> tuple[Any, ...]:
        """What must be equal for two requests to be generated together in one batch (issue 19)."""
        return (self.temperature, self.top_p, self.top_k, self.seed, self.stop, self.ignore_eos)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                             "top_k": self.top_k, "seed": self.seed, "stop": list(self.stop)}
        if self.ignore_eos:  # only when set: the hop's JSON is unchanged for every other request
            d["ignore_eos"] = True
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SamplingParams:
        return cls(max_tokens=d.get("max_tokens"), temperature=float(d.get("temperature", 1.0)),
                   top_p=float(d.get("top_p", 1.0)), top_k=int(d.get("top_k", 0)), seed=d.get("seed"),
                   stop=tuple(str(s) for s in d.get("stop") or ()), ignore_eos=bool(d.get("ignore_eos", False)))


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the model, the prompt (text, chat messages, or token ids already rendered), decoding
    parameters and how the answer is wanted.

    Exactly one of ``prompt`` (completions, Triton), ``messages`` (chat) or ``prompt_ids`` is set when it
    leaves a parser; the service renders the chat template and tokenizes, and fills ``prompt_ids``, before
    the model runs (a continuation on another tier, issue 18, starts from ids, never re-tokenized text)."""

    model: str
    version: str | None
    kind: str
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    prompt_ids: tuple[int, ...] | None = None
    stream: bool = False
    include_usage: bool = False
    #: vLLM's ``stream_options.continuous_usage_stats`` (with ``include_usage``): every chunk carries the usage so far.
    continuous_usage: bool = False
    request_id: str = ""
    #: Triton's generate: echo the prompt before the completion unless ``exclude_input_in_output``.
    echo_prompt: bool = False
    #: The caller (IAM principal, JWT sub or API key id) for usage and budgets; "" when unknown.
    caller: str = ""
    #: The ``x-target`` header / ``parameters.target`` hint; None lets the policy choose.
    hint: str | None = None
    #: Triton's generate: the vLLM backend's extra outputs asked for (``return_finish_reason``, ...).
    extras: tuple[str, ...] = ()

    def with_ids(self, prompt_ids: list[int] | tuple[int, ...]) -> GenerationRequest:
        return replace(self, prompt_ids=tuple(int(t) for t in prompt_ids))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "version": self.version, "kind": self.kind,
                             "params": self.params.to_json(), "stream": self.stream,
                             "include_usage": self.include_usage, "request_id": self.request_id,
                             "echo_prompt": self.echo_prompt, "caller": self.caller, "hint": self.hint}
        if self.prompt is not None:
            d["prompt"] = self.prompt
        if self.messages is not None:
            d["messages"] = list(self.messages)
        if self.prompt_ids is not None:
            d["prompt_ids"] = list(self.prompt_ids)
        if self.extras:
            d["extras"] = list(self.extras)
        if self.continuous_usage:
            d["continuous_usage"] = True
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GenerationRequest:
        messages = d.get("messages")
        ids = d.get("prompt_ids")
        return cls(model=str(d["model"]), version=d.get("version"), kind=str(d["kind"]),
                   params=SamplingParams.from_json(d.get("params") or {}), prompt=d.get("prompt"),
                   messages=tuple(messages) if messages is not None else None,
                   prompt_ids=tuple(int(t) for t in ids) if ids is not None else None,
                   stream=bool(d.get("stream", False)), include_usage=bool(d.get("include_usage", False)),
                   continuous_usage=bool(d.get("continuous_usage", False)),
                   request_id=str(d.get("request_id") or ""), echo_prompt=bool(d.get("echo_prompt", False)),
                   caller=str(d.get("caller") or ""), hint=d.get("hint"),
                   extras=tuple(str(x) for x in d.get("extras") or ()))
