"""The engine: an onnxruntime-genai model and its tokenizer, generating one request token by token.

Why its own module: the loop that turns token ids into a stream of text events is where the subtle
promises of issue 17 live, and they hold on every tier that runs a model in process (the CPU function,
the edge, ``tierserve serve``):

- **Sessions.** :func:`load` caches one ``og.Model`` per model folder (the store's verified folder, named by
  the model's sha256) and thread count, for the life of the execution environment; the threads are set with
  an ``og.Config`` overlay of ``genai_config.json`` (``intra_op_num_threads``, one inter-op thread, no
  spinning: the vCPU Lambda bills must not spin between tokens).
- **Decoding.** ``temperature == 0`` is greedy (``do_sample`` off); otherwise sampling with temperature,
  ``top_p`` and ``top_k`` (0: no top-k filter), and ``seed`` becomes onnxruntime-genai's ``random_seed``, so
  the same seed gives the same text.
- **Text.** Token ids are detokenized incrementally (:class:`TextStream`): a delta is released only when
  the text decoded so far does not end in an incomplete character, so a multi-byte character split across
  tokens is never broken, and the concatenated deltas equal ``decode(all ids)`` exactly (the final flush
  releases whatever invalid bytes remain, as ``decode`` renders them). Special tokens are skipped, as vLLM's
  OpenAI server does by default.
- **Stop sequences** (:class:`StopMatcher`): text that could still be the start of a stop string is held
  back; the stop string itself is never emitted; ``finish_reason`` is ``stop``. An EOS id ends with ``stop``
  too; ``max_new_tokens`` with ``length``.
- **ignore_eos** (vLLM's extension, sent by the field's bench tools): an EOS id is generated and kept like any
  token, and the generation goes on to ``max_new_tokens`` (``length``), as vLLM does (its ``min_tokens`` is the
  other thing: it masks EOS). onnxruntime-genai has no such option: its ``min_length`` masks EOS's logits (that is
  ``min_tokens``), and a generator that produced one of ``genai_config.json``'s EOS ids is done for good (it pads
  after it; ``rewind_to`` on a CPU export then diverges from transformers, checked). So :class:`_PastEos` starts a
  new generator from the prompt and every id so far, the EOS included, when that happens: greedy output then equals
  transformers' ``generate`` with no EOS (tested); a seeded sampled one restarts its random stream there (still
  reproducible). The cost is one prefill per EOS the model produces.
- **Disconnects.** ``cancelled()`` is checked before the prompt is run and before every token, so a client
  that goes away stops the generation within one token.
- **Usage** is counted from ids: the prompt's ids, and every id the model produced (EOS included).

Heavy imports (onnxruntime_genai, tokenizers) happen inside functions, on first use only.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tierserve.errors import ArtifactError, InferenceError
from tierserve.generation.events import FINISH_LENGTH, FINISH_STOP, GenerationEvent, Usage
from tierserve.generation.requests import SamplingParams

REPLACEMENT = "\ufffd"
#: onnxruntime-genai's ``random_seed`` is a 32-bit signed int (negative: a random seed).
SEED_MODULUS = 2**31

_lock = threading.RLock()  # load() builds the tokenizer under it
_models: dict[tuple[str, int], LoadedModel] = {}
_tokenizers: dict[str, Any] = {}


def genai_overlay(threads: int) -> str:
    """The ``og.Config`` overlay that sets the decoder's threads (no spinning between tokens)."""
    return json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": int(threads), "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}}}})


def tokenizer(folder: Path) -> Any:
    """The ``tokenizers.Tokenizer`` of ``folder/tokenizer.json`` (cached per folder): what counts tokens without
    loading the model (the router may need it without onnxruntime-genai)."""
    key = str(folder)
    tok = _tokenizers.get(key)
    if tok is not None:
        return tok
    with _lock:
        tok = _tokenizers.get(key)
        if tok is None:
            from tokenizers import Tokenizer

            path = folder / "tokenizer.json"
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises its own Exception type
                raise ArtifactError(f"cannot read the model's tokenizer {path.name} ({exc}); recompile it") from exc
            _tokenizers[key] = tok
        return tok


def load(folder: Path, threads: int) -> LoadedModel:
    """The model in ``folder`` (an onnxruntime-genai folder), loaded once per folder and thread count."""
    key = (str(folder), int(threads))
    model = _models.get(key)
    if model is not None:
        return model
    with _lock:
        model = _models.get(key)
        if model is None:
            model = LoadedModel(folder, threads)
            _models[key] = model
        return model


def is_loaded(folder: Path, threads: int) -> bool:
    return (str(folder), int(threads)) in _models


def evict(shas: set[str]) -> None:
    """Forget the models whose folders are named by ``shas`` (the store's cache folders): versions no longer
    served. A generation in flight keeps the model it holds."""
    with _lock:
        for key in [k for k in _models if Path(k[0]).name in shas]:
            del _models[key]
        for folder in [k for k in _tokenizers if Path(k).name in shas]:
            del _tokenizers[folder]


def clear() -> None:
    with _lock:
        _models.clear()
        _tokenizers.clear()


def search_options(params: SamplingParams, max_length: int, **extra: Any) -> dict[str, Any]:
    """onnxruntime-genai's search options for ``params`` (greedy, or sampled with its seed), up to
    ``max_length`` tokens (prompt included); ``extra``: more options (``batch_size``)."""
    options: dict[str, Any] = {"max_length": max_length, "num_beams": 1, "num_return_sequences": 1,
                               "min_length": 0, "repetition_penalty": 1.0, **extra}
    if params.greedy:
        options["do_sample"] = False
    else:
        options.update(do_sample=True, temperature=float(params.temperature), top_p=float(params.top_p),
                       top_k=int(params.top_k))
        if params.seed is not None:
            options["random_seed"] = int(params.seed) % SEED_MODULUS
    return options


def new_generator(model: Any, options: dict[str, Any], ids: Any, what: str) -> Any:
    """An onnxruntime-genai generator over ``model`` with ``options``, ``ids`` appended (a prompt, or a batch's
    padded rows); onnxruntime-genai's refusal is an InferenceError naming ``what`` it refused."""
    import onnxruntime_genai as og

    try:
        gp = og.GeneratorParams(model)
        gp.set_search_options(**options)
        generator = og.Generator(model, gp)
        generator.append_tokens(ids)
    except Exception as exc:
        raise InferenceError(f"onnxruntime-genai refused {what} ({exc})") from exc
    return generator


class LoadedModel:
    """One onnxruntime-genai model with its tokenizer; :meth:`generate` runs one request."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.folder = folder
        self.threads = threads
        t0 = time.perf_counter()
        try:
            config = og.Config(str(folder))
            config.overlay(genai_overlay(threads))
            self.model = og.Model(config)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError / its own types
            raise ArtifactError(f"onnxruntime-genai cannot load {folder.name} ({exc}); recompile the model") from exc
        self.load_ms = (time.perf_counter() - t0) * 1000
        self.tokenizer = tokenizer(folder)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, eos_ids: Sequence[int],
                 max_new_tokens: int, cancelled: Callable[[], bool] = lambda: False,
                 served_by: str = "") -> Iterator[GenerationEvent]:
        """One generation, as events: one per token (its text may be empty while bytes or a possible stop
        string are held back), the last with ``finish_reason``, usage and tokens/s. Nothing at all when
        ``cancelled()`` before the first token; a cancelled generation simply ends (no final event)."""

        if max_new_tokens < 1:
            raise InferenceError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompt_ids:
            raise InferenceError("the prompt is empty: there is no token to continue from")
        t0 = time.perf_counter()
        options = search_options(params, len(prompt_ids) + max_new_tokens)
        if cancelled():
            return

        def start(ids: list[int]) -> Any:
            return new_generator(self.model, options, ids, "the prompt")

        if params.ignore_eos:  # every id is a token like any other: only max_new_tokens ends it
            generator: Any = _PastEos(start, list(prompt_ids))
            eos: frozenset[int] = frozenset()
        else:
            generator, eos = start(list(prompt_ids)), frozenset(int(e) for e in eos_ids)
        yield from self._loop(generator, len(prompt_ids), params.stop, eos, max_new_tokens, cancelled, served_by, t0)

    def _loop(self, generator: Any, prompt_len: int, stop: Sequence[str], eos: frozenset[int], max_new: int,
              cancelled: Callable[[], bool], served_by: str, t0: float) -> Iterator[GenerationEvent]:
        text = TextStream(self.decode)
        stops = StopMatcher(stop)
        n = 0
        first_at: float | None = None
        while True:
            if cancelled():
                return
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            n += 1
            now = time.perf_counter()
            ttft = None
            if first_at is None:
                first_at = now
                ttft = (now - t0) * 1000
            finish: str | None = None
            if token in eos:
                finish = FINISH_STOP
                delta, stopped = stops.finish(text.flush())
            else:
                text.add(token)
                if n >= max_new or generator.is_done():
                    finish = FINISH_LENGTH if n >= max_new else FINISH_STOP  # done early: the model's own EOS
                    delta, stopped = stops.finish(text.flush())
                else:
                    delta, stopped = stops.feed(text.step())
            if stopped:
                finish = FINISH_STOP
            if finish is None:
                yield GenerationEvent(delta, (token,), served_by=served_by, ttft_ms=ttft)
                continue
            decode_s = now - first_at
            tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else None
            yield GenerationEvent(delta, (token,), finish_reason=finish, usage=Usage(prompt_len, n),
                                  served_by=served_by, ttft_ms=ttft, tokens_per_s=tps)
            return


class _PastEos:
    """What :meth:`LoadedModel._loop` needs of a generator, for ``ignore_eos``: onnxruntime-genai's generator,
    started again from the prompt and every id so far (the EOS included) when it stopped at an EOS id of its own,
    so the generation goes on as if the EOS were any token. Never done: the loop counts ``max_new_tokens``."""

    def __init__(self, start: Callable[[list[int]], Any], prompt_ids: list[int]) -> None:
        self.start = start
        self.ids = list(prompt_ids)
        self.generator = start(self.ids)
        self.last: int | None = None
        self.restarts = 0

    def generate_next_token(self) -> None:
        if self.generator.is_done():  # its last token was one of genai_config.json's EOS ids: it would pad now
            self.generator = self.start(self.ids)
            self.restarts += 1
        self.generator.generate_next_token()
        self.last = int(self.generator.get_next_tokens()[0])
        self.ids.append(self.last)

    def get_next_tokens(self) -> list[int]:
        assert self.last is not None
        return [self.last]

    def is_done(self) -> bool:
        return False


class TextStream:
    """Incremental detokenization that never breaks a character.

    The text of a window of ids (from ``prefix``) is decoded as a whole, and what it adds to the text of the
    window up to ``read`` is released only when it does not end in U+FFFD (an incomplete UTF-8 sequence, as
    the byte-level decoder renders it). Decoding a window rather than one id keeps decoders that strip or add
    spaces at a boundary (SentencePiece's) right. :meth:`flush` releases the rest, invalid bytes included, so
    the concatenation equals ``decode(all ids)``."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> None:
        self.ids.append(token)

    def step(self) -> str:
        prefix_text = self.decode(self.ids[self.prefix:self.read])
        new_text = self.decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        prefix_text = self.decode(self.ids[self.prefix:self.read])
        new_text = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):]


class StopMatcher:
    """Stop sequences over streamed text: :meth:`feed` returns what may be released now and whether a stop
    string was found (the text before it is released, the stop string and anything after it never are)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stop:
            return delta, False
        self.pending += delta
        found = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        hold = self._held()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def finish(self, delta: str) -> tuple[str, bool]:
        """The last text: a stop string it completes still stops it; otherwise everything held is released."""
        out, stopped = self.feed(delta)
        if stopped:
            return out, True
        out, self.pending = out + self.pending, ""
        return out, False

    def _held(self) -> int:
        """The length of the longest end of the pending text that is the start of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:k]):
                    best = k
                    break
        return best


# --- batched generation (issue 19: batch jobs) ---------------------------------------------------------------


def pad_token_id(folder: Path) -> int | None:
    """The pad token onnxruntime-genai masks out of a padded batch (``genai_config.json``'s ``pad_token_id``)."""
    try:
        value = json.loads((folder / "genai_config.json").read_text())["model"].get("pad_token_id")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def genai_eos_ids(folder: Path) -> frozenset[int]:
    """The EOS ids onnxruntime-genai itself stops a sequence at (``genai_config.json``'s ``eos_token_id``)."""
    try:
        value = json.loads((folder / "genai_config.json").read_text())["model"].get("eos_token_id")
    except (OSError, ValueError, KeyError, TypeError):
        return frozenset()
    values = value if isinstance(value, list) else [value]
    return frozenset(int(v) for v in values if isinstance(v, int))


class _BatchStep:
    """One onnxruntime-genai generator over a right-padded batch, stepped once for all rows when the first
    row asks for a step's token."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self.steps = 0
        self.tokens: Any = None

    def token(self, row: int, step: int) -> int:
        while self.steps < step:
            self.generator.generate_next_token()
            self.tokens = self.generator.get_next_tokens()
            self.steps += 1
        return int(self.tokens[row])


class _RowGenerator:
    """What :meth:`LoadedModel._loop` needs of a generator (``generate_next_token``, ``get_next_tokens``,
    ``is_done``), for one row of a batch: the same loop, so the same text, stops and finish reasons."""

    def __init__(self, batch: _BatchStep, row: int, genai_eos: frozenset[int]) -> None:
        self.batch, self.row, self.genai_eos = batch, row, genai_eos
        self.step = 0
        self.last: int | None = None

    def generate_next_token(self) -> None:
        self.step += 1
        self.last = self.batch.token(self.row, self.step)

    def get_next_tokens(self) -> list[int]:
        assert self.last is not None
        return [self.last]

    def is_done(self) -> bool:
        # a row of a batch is done as a generator of its own would be: at onnxruntime-genai's EOS (its
        # max_length is the caller's max_new_tokens, which the loop counts itself)
        return self.last in self.genai_eos


def generate_batch(model: LoadedModel, prompts: Sequence[Sequence[int]], params: SamplingParams,
                   eos_ids: Sequence[int], max_new_tokens: Sequence[int], served_by: str = ""
                   ) -> list[list[GenerationEvent]]:
    """Several prompts generated together, one onnxruntime-genai generator over the batch (the prompts
    right-padded with the pad token, which onnxruntime-genai masks), each row's tokens decoded by the same loop
    as :meth:`LoadedModel.generate`: every row's events are those the row would get alone (greedy output
    equal token for token; tested). ``params`` is the rows' shared decoding (``SamplingParams.key()``); the
    caller runs a seeded, sampled prompt alone. A row stops at its own ``max_new_tokens``, EOS or stop string;
    the batch stops when every row has."""
    import numpy as np

    if len(prompts) != len(max_new_tokens) or not prompts:
        raise InferenceError("generate_batch needs one max_new_tokens per prompt, and at least one prompt")
    if any(not p for p in prompts) or any(n < 1 for n in max_new_tokens):
        raise InferenceError("every prompt needs a token and every row at least one new token")
    if params.ignore_eos:  # a batched row that produced an EOS is padded ever after: each row runs on its own
        return [list(model.generate(p, params, eos_ids, n, served_by=served_by))
                for p, n in zip(prompts, max_new_tokens, strict=True)]
    t0 = time.perf_counter()
    width = max(len(p) for p in prompts)
    pad = pad_token_id(model.folder)
    ids = np.full((len(prompts), width), 0 if pad is None else pad, dtype=np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    options = search_options(params, width + max(max_new_tokens), batch_size=len(prompts))
    generator = new_generator(model.model, options, ids, "the batch")
    step = _BatchStep(generator)
    genai_eos = genai_eos_ids(model.folder)
    eos = frozenset(int(e) for e in eos_ids)
    loops = [model._loop(_RowGenerator(step, i, genai_eos), len(p), params.stop, eos, n, lambda: False,
                         served_by, t0) for i, (p, n) in enumerate(zip(prompts, max_new_tokens, strict=True))]
    events: list[list[GenerationEvent]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    while live:  # one step for every row still going, in lockstep with the shared generator
        still = []
        for i in live:
            event = next(loops[i], None)
            if event is not None:
                events[i].append(event)
                if not event.final:
                    still.append(i)
        live = still
    return events
