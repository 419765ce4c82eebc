"""What a generation yields, whatever the transport: the contract between the engine, the backends and
the adapters that render OpenAI's chunks, Triton's generate answers or the CPU function's streamed lines.

Why its own module: the router relays a CPU function's stream (issue 17) and continues a broken GPU stream
on the CPU (issue 18), so an event carries the token ids as well as the text, and serialises to one JSON
line (:meth:`GenerationEvent.to_json` / :meth:`from_json`) that crosses Lambda's response stream unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: Why a completion ended, as OpenAI names it.
FINISH_STOP = "stop"      # an EOS token or a stop sequence
FINISH_LENGTH = "length"  # max_tokens (or the context window) reached
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class GenerationEvent:
    """One step of a generation: new text (possibly empty: bytes held back until a character is whole), the
    ids of the tokens it came from, and on the last event the finish reason, the usage and timings.

    ``served_by`` is the tier that produced the event; ``ttft_ms`` (first event) and ``tokens_per_s`` (last)
    feed the metrics and the final chunk."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    served_by: str = ""
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"text": self.text, "token_ids": list(self.token_ids)}
        if self.finish_reason is not None:
            d["finish_reason"] = self.finish_reason
        if self.usage is not None:
            d["usage"] = self.usage.to_json()
        for key in ("served_by", "ttft_ms", "tokens_per_s"):
            value = getattr(self, key)
            if value not in (None, ""):
                d[key] = value
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GenerationEvent:
        usage = d.get("usage")
        return cls(text=str(d.get("text", "")), token_ids=tuple(int(t) for t in d.get("token_ids") or ()),
                   finish_reason=d.get("finish_reason"),
                   usage=Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"])) if usage else None,
                   served_by=str(d.get("served_by") or ""), ttft_ms=d.get("ttft_ms"),
                   tokens_per_s=d.get("tokens_per_s"), extra=dict(d.get("extra") or {}))


class HeldEvents:
    """A generation's events that hold something until they end (a cap's slot, a usage reservation, the edge's KV
    memory): :meth:`_end` runs when they end, whichever way: the final event, the end of the stream, an error, or
    :meth:`close` (the client went away), which closes the wrapped stream too. :meth:`_end` may run more than once
    and must act once. :meth:`_seen` sees each event before it is returned. Any other attribute is the wrapped
    stream's (``fallback``: the x-fallback of a routed generation...).

    Why here: the fleet's cap (``tierserve.admission``), the budgets (``tierserve.usage``) and the edge's KV
    admission (``tierserve.edge.dispatch``) each wrap a stream this way, and the three must end it alike."""

    def __init__(self, events: Iterator[GenerationEvent]) -> None:
        self._events = events

    def __iter__(self) -> HeldEvents:
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_events":
            raise AttributeError(name)
        return getattr(self._events, name)

    def __next__(self) -> GenerationEvent:
        try:
            event = next(self._events)
        except BaseException:  # StopIteration included: the stream is over either way
            self._end()
            raise
        self._seen(event)
        if event.final:
            self._end()
        return event

    def close(self) -> None:
        try:
            close = getattr(self._events, "close", None)
            if close is not None:
                close()
        finally:
            self._end()

    def _seen(self, event: GenerationEvent) -> None:
        """Each event as it passes (nothing by default)."""

    def _end(self) -> None:
        raise NotImplementedError
