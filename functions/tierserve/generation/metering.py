"""A generation's metrics, measured on its stream: TTFT, inter-token latency, tokens and tokens/s per model,
version and tier, emitted once after the last event (exhausted, failed or closed).

Why its own module: the process that sees a stream meters it, whichever tier produced it: the CPU function
and the edge meter the engine's events (``generation.service``), and the router meters the GPU tier's stream
(``tiering``), which no other process sees. Importing it costs nothing heavy and imports no entry module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from tierserve import telemetry
from tierserve.generation.events import GenerationEvent
from tierserve.manifest import ModelVersion


class MeteredStream:
    """The engine's events, with the admission slot held until the stream ends (exhausted, failed or closed)
    and the generation's metrics emitted after its last event."""

    def __init__(self, events: Iterator[GenerationEvent], release: Callable[[], None], model: ModelVersion,
                 tier: str) -> None:
        self._events = events
        self._release = release
        self._model = model
        self._tier = tier
        self._done = False
        self._ttft: float | None = None
        self._last: float | None = None
        self._gaps: list[float] = []
        self._tokens = 0
        self._final: GenerationEvent | None = None
        self.prompt_tokens: int | None = None

    def __iter__(self) -> MeteredStream:
        return self

    def __next__(self) -> GenerationEvent:
        if self._done:
            raise StopIteration
        try:
            event = next(self._events)
        except StopIteration:
            self._finish()
            raise
        except BaseException:
            self._finish()
            raise
        now = time.perf_counter()
        if self._last is not None:
            self._gaps.append((now - self._last) * 1000)
        self._last = now
        self._tokens += len(event.token_ids)
        if event.ttft_ms is not None and self._ttft is None:
            self._ttft = event.ttft_ms
        if event.final:
            self._final = event
        return event

    def close(self) -> None:
        """The client went away (or the adapter is done): stop the engine and free the slot."""
        if self._done:
            return
        close = getattr(self._events, "close", None)
        if close is not None:
            close()
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._release()
        final = self._final
        usage = final.usage if final is not None else None
        telemetry.generation(
            self._model.name, self._model.version, self._tier, ttft_ms=self._ttft,
            itl_ms=sum(self._gaps) / len(self._gaps) if self._gaps else None,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else self._tokens,
            tokens_per_s=final.tokens_per_s if final is not None else None)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._release()
