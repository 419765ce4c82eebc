"""Counting a prompt's tokens in the router, within its cold-start budget (issue 18: token-aware routing).

Why: token-aware routing (``routing.token_aware``) needs the prompt's length in tokens before it picks a tier,
and the router must not pay for torch, transformers or a model's weights to know it. Two ways, both here:

- **exact**: the variant's ``tokenizer.json``, one of its files in the store, fetched alone (a few MB, not the
  weights), verified against the manifest's sha256 and size, and loaded with ``tokenizers`` (imported only
  then, on the first generative request; never when the router's handler is imported). A load runs in a
  thread of its own; :meth:`TokenCounter.count` waits for it at most ``budget_s``, so the first request to a
  model is not held by the fetch, and the tokenizer is there for the next ones (cached per sha256).
- **estimate**: the compiler's calibration in the manifest (``GenerationSpec.chars_per_token`` for ASCII
  text, ``tokens_per_nonascii_byte`` for the rest, ``token_estimate_error`` the largest relative error it
  measured): ASCII characters / chars_per_token + non-ASCII UTF-8 bytes x tokens_per_nonascii_byte. Counting
  non-ASCII text by its bytes keeps the estimate close on accented, CJK and emoji text, where characters per
  token are 2 to 4 times fewer than on English (``docs/architecture.md`` gives the errors measured).
  Without a calibration: 4 characters per token (English on a large vocabulary) and one token per
  non-ASCII byte (the most a byte-level BPE or a byte-fallback tokenizer gives).

A prompt whose ids are known (``GenerationRequest.prompt_ids``, prepared) is counted exactly with neither.
A chat is counted from its messages' roles and contents plus :data:`CHAT_TOKENS_PER_MESSAGE` per message and
:data:`CHAT_TOKENS_PRIMER` for the assistant's turn (the chat template is not rendered here: that needs
jinja2, and the engine renders it exactly before generating), so a chat's count is never marked exact.
"""

from __future__ import annotations

import math
import posixpath
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tierserve.generation.requests import GenerationRequest
    from tierserve.manifest import ExternalFile, GenerationSpec, ModelVersion, Variant

#: How long a request waits for its model's tokenizer to load before it is counted by the estimate.
DEFAULT_BUDGET_S = 0.2
#: After a tokenizer failed to load (missing, corrupt, the store unreachable), the estimate is used this long.
RETRY_AFTER_FAILURE_S = 60.0
#: A chat template's own tokens per message (ChatML: ``<|im_start|>``, the role, a newline, ``<|im_end|>``,
#: a newline) and for the assistant's turn it opens; an approximation for other templates.
CHAT_TOKENS_PER_MESSAGE = 5
CHAT_TOKENS_PRIMER = 3
TOKENIZER_FILE = "tokenizer.json"
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")

#: Text in several scripts for the compiler's calibration of non-ASCII bytes (its validation text is
#: usually English): accents, Cyrillic, Greek, Arabic, CJK, emoji.
MULTILINGUAL_PROBE = (
    "Le café de la gare ouvre à sept heures ; déjà les élèves arrivent, pressés et à moitié endormis.",
    "Über die Straße gehen Müller und Schäfer, während die Größe der Häuser zunimmt.",
    "Маршрутизатор выбирает самый дешёвый уровень, который укладывается в цель по задержке.",
    "Ο δρομολογητής επιλέγει το φθηνότερο επίπεδο που πληροί τον στόχο καθυστέρησης.",  # noqa: RUF001 (Greek, on purpose)
    "يختار الموجه أرخص طبقة تحقق هدف زمن الاستجابة.",
    "路由器根据提示的长度和答案的长度选择最便宜的层级。",
    "ルーターはプロンプトの長さに応じて最も安い階層を選びます。",
    "Ready 🚀 set ✨ go 🙂 — 5 € ½ ≈ 0.5",
)


@dataclass(frozen=True)
class Calibration:
    """How text turns into tokens for one tokenizer, on average (see the module's docstring)."""

    chars_per_token: float
    tokens_per_nonascii_byte: float
    #: The largest relative error measured on the calibration's texts; None when not calibrated.
    error: float | None = None

    def estimate(self, text: str) -> int:
        """About how many tokens ``text`` is (at least 1 for a non-empty text)."""
        if not text:
            return 0
        ascii_chars, nonascii = _split(text)
        return max(1, math.ceil(ascii_chars / self.chars_per_token + nonascii * self.tokens_per_nonascii_byte))

    @classmethod
    def of(cls, spec: GenerationSpec | None) -> Calibration:
        """The manifest's calibration for this model, else :data:`UNCALIBRATED`."""
        if spec is None or spec.chars_per_token is None or spec.tokens_per_nonascii_byte is None:
            return UNCALIBRATED
        return cls(spec.chars_per_token, spec.tokens_per_nonascii_byte, spec.token_estimate_error)


UNCALIBRATED = Calibration(4.0, 1.0, None)


def _split(text: str) -> tuple[int, int]:
    """(ASCII characters in ``text``, UTF-8 bytes of its non-ASCII characters)."""
    runs = _NON_ASCII.findall(text)
    return len(text) - sum(map(len, runs)), sum(len(r.encode()) for r in runs)


def calibrate(count: Callable[[str], int], texts: Iterable[str],
              multilingual: Iterable[str] = MULTILINGUAL_PROBE) -> Calibration:
    """The calibration of the tokenizer behind ``count`` (text -> number of tokens, no special tokens).

    Tokens per non-ASCII byte from the non-ASCII runs of ``multilingual``, each counted alone; then characters
    per token from ``texts`` (the compiler's validation text) once their non-ASCII bytes are accounted for;
    the error is the largest relative error of :meth:`Calibration.estimate` over both sets of texts."""
    texts, probe = [t for t in texts if t], [t for t in multilingual if t]
    if not texts:
        raise ValueError("calibrate needs at least one non-empty text")
    runs = [m.group() for t in probe for m in _NON_ASCII.finditer(t)]
    run_bytes = sum(len(r.encode()) for r in runs)
    tpb = sum(count(r) for r in runs) / run_bytes if run_bytes else 1.0
    ascii_chars = nonascii = tokens = 0
    for t in texts:
        a, b = _split(t)
        ascii_chars, nonascii, tokens = ascii_chars + a, nonascii + b, tokens + count(t)
    ascii_tokens = max(1.0, tokens - tpb * nonascii)
    cal = Calibration(ascii_chars / ascii_tokens, tpb)
    measured = [(cal.estimate(t), count(t)) for t in (*texts, *probe)]
    error = max(abs(est - n) / n for est, n in measured if n > 0)
    return Calibration(round(cal.chars_per_token, 4), round(tpb, 4), round(error, 4))


@dataclass(frozen=True)
class PromptTokens:
    """A prompt's length in tokens, and how it was known."""

    count: int
    exact: bool
    #: "prompt_ids", "tokenizer", "tokenizer+template" or "estimate".
    how: str
    #: The estimate's relative error bound as calibrated (None for an exact count or an uncalibrated estimate).
    error: float | None = None


def request_texts(request: GenerationRequest) -> tuple[list[str], int]:
    """The texts to count in ``request`` and the template's tokens around them (0 for a plain prompt)."""
    if request.messages is not None:
        texts = [f"{m.get('role', '')}\n{_content(m.get('content'))}" for m in request.messages]
        return texts, CHAT_TOKENS_PER_MESSAGE * len(texts) + CHAT_TOKENS_PRIMER
    return [request.prompt or ""], 0


def _content(content: Any) -> str:
    if isinstance(content, list):  # OpenAI's text parts
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def variant_of(model: ModelVersion, tier: str = "cpu") -> Variant:
    """The variant ``tier`` runs: the edge's at the edge, else the CPU tier's."""
    return model.edge_artifact if tier == "edge" else model.cpu_artifact


def tokenizer_file(model: ModelVersion, tier: str = "cpu") -> ExternalFile | None:
    """The ``tokenizer.json`` among the files of the variant ``tier`` runs (None when it lists none)."""
    variant = variant_of(model, tier)
    return next((e for e in variant.external_data if posixpath.basename(e.path) == TOKENIZER_FILE), None)


def read_verified(store: Any, variant: Variant, artifact: ExternalFile) -> bytes:
    """``artifact`` (one of ``variant``'s files) from ``store`` (a ``ModelStore``: a folder or S3), refused unless its
    sha256 and size are the manifest's (``IntegrityError``): ``ModelStore.read_file``. Only this file is read:
    not the variant's weights."""
    return bytes(store.read_file(variant, variant.location(artifact)))


class TokenCounter:
    """Counts prompts for the router: exact with the model's tokenizer once it is loaded, else the estimate.

    One per process (the router's runtime). ``store`` is the runtime's ``ModelStore``; ``budget_s`` is how
    long a request waits for a tokenizer that is still loading; ``load`` turns verified ``tokenizer.json``
    bytes into an object with ``encode(text, add_special_tokens=...)`` (``tokenizers.Tokenizer.from_str``)."""

    def __init__(self, store: Any, budget_s: float = DEFAULT_BUDGET_S,
                 load: Callable[[bytes], Any] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.budget_s = budget_s
        self._load = load or load_tokenizer
        self._clock = clock
        self._lock = threading.Lock()
        self._ready: dict[str, Any] = {}  # sha256 -> tokenizer
        self._loading: dict[str, threading.Event] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # sha256 -> (when, why)

    def count(self, model: ModelVersion, request: GenerationRequest, tier: str = "cpu") -> PromptTokens:
        if request.prompt_ids is not None:
            return PromptTokens(len(request.prompt_ids), True, "prompt_ids")
        texts, overhead = request_texts(request)
        tok = self.tokenizer(model, tier)
        if tok is not None:
            chat = request.messages is not None
            n = sum(len(tok.encode(t, add_special_tokens=not chat).ids) for t in texts) + overhead
            return PromptTokens(n, not chat, "tokenizer+template" if chat else "tokenizer")
        cal = Calibration.of(model.generation)
        return PromptTokens(sum(cal.estimate(t) for t in texts) + overhead, False, "estimate", cal.error)

    def tokenizer(self, model: ModelVersion, tier: str = "cpu") -> Any | None:
        """The model's tokenizer if it is loaded or loads within the budget; else None (the load goes on)."""
        artifact = tokenizer_file(model, tier)
        if artifact is None:
            return None
        key = artifact.sha256
        with self._lock:
            if key in self._ready:
                return self._ready[key]
            failed = self._failed.get(key)
            if failed is not None and self._clock() - failed[0] < RETRY_AFTER_FAILURE_S:
                return None
            done = self._loading.get(key)
            if done is None:
                done = self._loading[key] = threading.Event()
                threading.Thread(target=self._fetch, args=(variant_of(model, tier), artifact, done),
                                 name="tokenizer-load", daemon=True).start()
        done.wait(self.budget_s)
        with self._lock:
            return self._ready.get(key)

    def failure(self, model: ModelVersion, tier: str = "cpu") -> str | None:
        """Why the model's tokenizer could not be loaded, if it could not (for logs and tests)."""
        artifact = tokenizer_file(model, tier)
        failed = self._failed.get(artifact.sha256) if artifact is not None else None
        return None if failed is None else failed[1]

    def _fetch(self, variant: Variant, artifact: ExternalFile, done: threading.Event) -> None:
        try:
            tok = self._load(read_verified(self.store, variant, artifact))
        except Exception as exc:  # any failure: the estimate serves, and it is retried later
            with self._lock:
                self._failed[artifact.sha256] = (self._clock(), f"{type(exc).__name__}: {exc}")
        else:
            with self._lock:
                self._ready[artifact.sha256] = tok
                self._failed.pop(artifact.sha256, None)
        finally:
            with self._lock:
                self._loading.pop(artifact.sha256, None)
            done.set()


def load_tokenizer(data: bytes) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``'s bytes, encoding a text's own tokens: no padding and no
    truncation, as transformers encodes a text it is not asked to pad or truncate."""
    from tokenizers import Tokenizer  # here only: the router's handler never imports it

    tok = Tokenizer.from_str(data.decode("utf-8"))
    tok.no_padding()  # a tokenizer.json may pad or truncate every encoding (sentence-transformers' do): a count
    tok.no_truncation()  # must see the text's own tokens
    return tok


_load_tokenizer = load_tokenizer


def calibrate_folder(folder: Any, texts: Iterable[str]) -> dict[str, float]:
    """The compiler's calibration of the ``tokenizer.json`` in ``folder`` (a variant's onnxruntime-genai folder) on
    ``texts`` (its validation text), as ``GenerationSpec`` fields; empty when the folder has no tokenizer.json."""
    from pathlib import Path

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        return {}
    tok = load_tokenizer(path.read_bytes())
    cal = calibrate(lambda t: len(tok.encode(t, add_special_tokens=False).ids), texts)
    return {"chars_per_token": cal.chars_per_token, "tokens_per_nonascii_byte": cal.tokens_per_nonascii_byte,
            "token_estimate_error": cal.error or 0.0}
