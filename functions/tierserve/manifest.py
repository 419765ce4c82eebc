"""The manifest: the contract between the compiler and the serving runtime.

``manifest.json`` sits at the root of a model store (a local folder or an S3 prefix)::

    {
      "schema_version": 1,
      "models": {
        "<name>": {
          "default_version": "1",
          "canary": {"version": "2", "percent": 10},          # optional
          "versions": {
            "1": {
              "inputs":  [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                          # optional per input: "dim_names": ["batch", ""], "value_range": [0, 30521]
                          # (on an integer output, value_range bounds its JSON width)
              "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
              "max_batch_size": 64,
              "variants": {
                "fp32":         {"path": "<name>/1/model.onnx", "sha256": "...", "size_bytes": 1234,
                                 "external_data": [                # optional: weights kept outside the .onnx
                                   {"path": "<name>/1/model.onnx.data", "sha256": "...", "size_bytes": 9876}]},
                "int8_dynamic": {"path": "<name>/1/int8_dynamic.onnx", "sha256": "...", "size_bytes": 456}
              },
              "selected_variant": "int8_dynamic",   # what the CPU tier serves
              "targets": ["cpu"],                   # "cpu", "gpu", or ["gpu", "cpu"] (GPU, CPU fallback);
                                                    # "edge" adds devices (with a cloud tier beside it)
              "cpu_variant": "int8_dynamic",        # optional, defaults to selected_variant
              "edge_variant": "int8_dynamic",       # optional: what an edge device serves (default: cpu's)
              "routing": {"gpu_min_rows": 64, "gpu_min_bytes": 1048576},
              "cpu": {"memory_mb": 1769, "threads": 1},
              "allow_non_finite": false,            # optional: NaN/Infinity inputs are refused (400)
              "task": "text-generation",            # optional: a causal LM (default "inference"); then
              "generation": {"context_length": 2048, "eos_token_ids": [2], "chat_template": true,
                             "default_max_tokens": 256, "max_tokens_cap": 4096, "max_concurrency": 4,
                             "kv_bytes_per_token": 4096, "vocab_size": 32000, "family": "llama",
                             "tiers": {"cpu": {"ttft_ms": {"16": 12.0, "128": 40.0, "512": 150.0},
                                               "tokens_per_s": 80.0, "cost_per_1m_tokens": 1.9,
                                               "source": "measured: ..."}}},
                                                    # and each variant is an onnxruntime-genai folder: path
                                                    # ".../model.onnx", external_data its other files
                                                    # (model.onnx.data, genai_config.json, tokenizer files)
              "created_at": "2026-11-24T12:00:00Z",
              "published_at": "2026-11-24T12:05:00Z",   # optional: set by `tierserve models publish`
              "published_by": "arn:aws:sts::123456789012:assumed-role/deployer/alice",
              "retired_at": ""                          # optional: set by `tierserve models retire`
            }
          },
          "previous_default": "1"                       # optional: what `rollback` returns to
        }
      },
      "revision": 7,                                    # optional: bumped by every lifecycle change
      "change": {...}                                   # optional: the change that made this revision
    }

Artifact paths are relative to the store root, use ``/`` and never leave it; a variant's external-data
files sit in its folder (or below it). Versions are positive integers, as in a Triton model repository.
Every allowlist is matched with ``re.fullmatch`` (``$`` would accept a trailing newline).

``revision`` and ``change`` belong to the lifecycle (``tierserve.lifecycle``): every change to a model's
routing (publish, canary, promote, rollback, retire) is one conditional write of the whole document that
bumps ``revision`` and records itself in ``change``, and the same record is kept in the store's append-only
history. A retired version stays in the manifest as a tombstone: it is neither listed nor served by name,
except to a request pinned to it within :data:`RETIRE_GRACE_S` of its retirement (a router whose manifest is
still the older one may be sending it to the CPU function), so retiring never breaks a request in flight.

One bad model entry takes down only that model: :meth:`Manifest.from_json` keeps it in
``Manifest.broken`` with the reason, :meth:`Manifest.resolve` answers that reason for it, and the other
models keep serving. This module is pure Python (no numpy), so that the router and the compiler can both
import it cheaply.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tierserve.errors import InvalidNameError, ManifestError, ModelNotFoundError
from tierserve.protocol.datatypes import DATATYPES
from tierserve.tiers import CLOUD_TIERS, Tier

T = TypeVar("T")

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

# Every pattern below is used with ``fullmatch``: never ``match`` with ``$``, which also matches before a
# final newline (``"nl\n"`` would pass).
#: Model names: letters, digits, ``_``, ``-``, ``.``; start with a letter or digit; at most 64.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Versions: a positive integer, as Triton requires for its version folders.
VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")
#: Artifact paths inside a store: relative, ``/``-separated, no ``..``, no absolute paths.
ARTIFACT_PATH_RE = re.compile(r"(?!/)(?!.*(?:^|/)\.\.(?:/|\Z))[A-Za-z0-9_.\-/]{1,512}")
#: Lower-case hex sha256.
SHA256_RE = re.compile(r"[0-9a-f]{64}")

#: Every tier a version may target (``tierserve.tiers.Tier``), as the manifest spells them.
TARGETS: tuple[str, ...] = tuple(t.value for t in Tier)
#: The tiers in the cloud; ``edge`` is a device running ``tierserve edge`` in front of them.
CLOUD_TARGETS: tuple[str, ...] = tuple(t.value for t in CLOUD_TIERS)
#: How long a retired version still answers requests pinned to it: longer than any manifest cache
#: (MANIFEST_TTL_S, at most 60 s) plus a request's time in flight (API Gateway's 30 s).
RETIRE_GRACE_S = 120.0



def _allowed(pattern: re.Pattern[str], value: object) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def check_model_name(name: str) -> str:
    if not _allowed(MODEL_NAME_RE, name) or ".." in name:
        raise InvalidNameError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def check_version(version: str) -> str:
    if not _allowed(VERSION_RE, version):
        raise InvalidNameError(f"invalid model version {version!r}: versions are positive integers, e.g. '1'")
    return version


def check_artifact_path(path: str) -> str:
    if not _allowed(ARTIFACT_PATH_RE, path):
        raise ManifestError(
            f"artifact path {path!r} is not a safe relative path inside the model store; "
            "recompile the model with tierserve compile"
        )
    return path


def _number(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{x!r} is not a number")
    return x


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(f"{what} must be true or false, got {value!r}")
    return value


def _fields(what: str, d: Any, parse: Callable[[Any], T]) -> T:
    """``parse(d)``, with any missing key or wrong type reported as a :class:`ManifestError` on ``what``."""
    try:
        return parse(d)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"bad {what} {d!r}: {exc!r}") from exc


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model.

    ``dim_names`` (optional) names the symbolic dimensions of the ONNX graph, "" for a fixed one:
    inputs that share a name (``input_ids`` and ``attention_mask`` both ``[batch, sequence]``) must
    agree on its size, which the runtime checks before anything runs. ``value_range`` (optional,
    inclusive) bounds an input's values where the model only accepts some, such as token ids that
    index an embedding of ``vocab`` rows (``[0, vocab - 1]``): a value outside is the client's error
    (400), never a tier failure. On an integer output (labels ``[0, 9]``) it bounds the width of its
    JSON values, so that the response-size check refuses only what cannot fit."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a dynamic dimension; the first one is the batch axis
    dim_names: tuple[str, ...] = ()
    value_range: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        if any(self.dim_names):
            d["dim_names"] = list(self.dim_names)
        if self.value_range is not None:
            d["value_range"] = list(self.value_range)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        def parse(d: dict[str, Any]) -> TensorSpec:
            names = tuple(str(n) for n in d.get("dim_names") or ())
            rng = d.get("value_range")
            value_range = None if rng is None else (_number(rng[0]), _number(rng[1]))
            if rng is not None and len(rng) != 2:
                raise ValueError("value_range must be [low, high]")
            return cls(str(d["name"]), str(d["datatype"]), tuple(int(x) for x in d["shape"]), names, value_range)

        spec = _fields("tensor spec", d, parse)
        if spec.datatype not in DATATYPES:
            raise ManifestError(
                f"tensor {spec.name!r} has unknown datatype {spec.datatype!r}; use one of {', '.join(DATATYPES)}")
        if spec.dim_names and len(spec.dim_names) != len(spec.shape):
            raise ManifestError(f"tensor {spec.name!r}: dim_names {list(spec.dim_names)} do not match its shape "
                                f"{list(spec.shape)}")
        if spec.value_range is not None and not spec.value_range[0] <= spec.value_range[1]:
            raise ManifestError(f"tensor {spec.name!r}: value_range {list(spec.value_range)} is empty")
        return spec


@dataclass(frozen=True)
class ExternalFile:
    """One external-data file of a variant (weights kept outside the ``.onnx``), verified like the model."""

    path: str
    sha256: str
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size_bytes": self.size_bytes}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExternalFile:
        f = _fields("artifact entry", d, lambda d: cls(str(d["path"]), str(d["sha256"]), int(d["size_bytes"])))
        check_artifact_path(f.path)
        if not _allowed(SHA256_RE, f.sha256):
            raise ManifestError(f"artifact {f.path!r} has an invalid sha256 {f.sha256!r}")
        if f.size_bytes < 0:
            raise ManifestError(f"artifact {f.path!r} has a negative size {f.size_bytes}")
        return f


@dataclass(frozen=True)
class Variant(ExternalFile):
    """A model file (``path``) and the external-data files it reads (none for most models)."""

    external_data: tuple[ExternalFile, ...] = ()

    @property
    def folder(self) -> str:
        return posixpath.dirname(self.path)

    def location(self, ext: ExternalFile) -> str:
        """Where the model refers to ``ext``: its path relative to the model's folder."""
        return posixpath.relpath(ext.path, self.folder) if self.folder else ext.path

    def files(self) -> tuple[ExternalFile, ...]:
        """The model and its external data: every file a session needs."""
        return (ExternalFile(self.path, self.sha256, self.size_bytes), *self.external_data)

    @property
    def digest(self) -> str:
        """The variant's identity: what its cache folder, its published objects and its sessions are keyed by.

        A variant is all of its files, not its ``.onnx`` alone: two versions of a causal LM can share
        ``model.onnx`` and differ in their chat template or tokenizer, and an ONNX graph with external data can be
        saved again with other weights under the same ``model.onnx``. Keyed by the model's sha256 alone, such
        versions shared one cache folder and one published prefix, so one served (or overwrote) the other's files.

        The digest is the sha256 of canonical JSON (sorted keys, no spaces) mapping each file's location relative
        to the model's folder (the model under its file name) to its sha256. A variant with no external files
        keeps its model's sha256 as its digest: one file already identifies it, and so the cache folders
        (``MODEL_CACHE_DIR/<sha256>/``), published objects (``_objects/<sha256>/``), sessions and edge state of
        plain ONNX models made before the digest existed stay valid, with nothing fetched or published again.
        Every file is still verified against its own sha256 and size at fetch; the digest only names the set."""
        if not self.external_data:
            return self.sha256
        listing = {posixpath.basename(self.path): self.sha256,
                   **{self.location(e): e.sha256 for e in self.external_data}}
        return hashlib.sha256(json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        if self.external_data:
            d["external_data"] = [e.to_json() for e in self.external_data]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Variant:
        model = ExternalFile.from_json(d)
        exts = _fields("external_data", d, lambda d: tuple(d.get("external_data") or ()))
        v = cls(model.path, model.sha256, model.size_bytes, tuple(ExternalFile.from_json(e) for e in exts))
        for e in v.external_data:
            if not e.path.startswith(f"{v.folder}/") or e.path == v.path:
                raise ManifestError(
                    f"external data {e.path!r} of {v.path!r} is not in the model's folder {v.folder!r}"
                )
        return v


#: The task of a model that answers in one forward pass (a classifier, an embedding): the default.
TASK_INFERENCE = "inference"
#: A causal language model, served token by token (OpenAI's routes, Triton's generate extension).
TASK_TEXT_GENERATION = "text-generation"
TASKS = (TASK_INFERENCE, TASK_TEXT_GENERATION)
#: The files of an onnxruntime-genai model folder that a variant may list beside its ``model.onnx``.
GENAI_FILE_RE = re.compile(r"(?:model\.onnx\.data|genai_config\.json|tokenizer\.json|tokenizer_config\.json|"
                           r"special_tokens_map\.json|chat_template\.jinja|added_tokens\.json|"
                           r"[A-Za-z0-9_.-]{1,96}\.onnx(?:\.data)?)")


@dataclass(frozen=True)
class TierFigures:
    """A generative model's measured (or cited) speed on one tier: what token-aware routing and placement use.

    ``ttft_ms`` maps a prompt length in tokens to the time to first token; ``tokens_per_s`` is decode speed at
    batch 1; ``source`` says where the figures come from ("measured: ..." or a citation)."""

    ttft_ms: dict[int, float]
    tokens_per_s: float
    cost_per_1m_tokens: float | None = None
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ttft_ms": {str(k): v for k, v in sorted(self.ttft_ms.items())},
                             "tokens_per_s": self.tokens_per_s}
        if self.cost_per_1m_tokens is not None:
            d["cost_per_1m_tokens"] = self.cost_per_1m_tokens
        if self.source:
            d["source"] = self.source
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TierFigures:
        def parse(d: dict[str, Any]) -> TierFigures:
            cost = d.get("cost_per_1m_tokens")
            return cls({int(k): float(_number(v)) for k, v in (d.get("ttft_ms") or {}).items()},
                       float(_number(d["tokens_per_s"])), None if cost is None else float(_number(cost)),
                       str(d.get("source") or ""))

        return _fields("tier figures", d, parse)

    def ttft_at(self, prompt_tokens: int) -> float:
        """Time to first token at ``prompt_tokens``, interpolated linearly between the measured lengths."""
        if not self.ttft_ms:
            return 0.0
        points = sorted(self.ttft_ms.items())
        if prompt_tokens <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            if prompt_tokens <= x1:
                return y0 + (y1 - y0) * (prompt_tokens - x0) / (x1 - x0)
        (x0, y0), (x1, y1) = points[-2:] if len(points) > 1 else (points[0], points[0])
        slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
        return y1 + slope * (prompt_tokens - x1)


@dataclass(frozen=True)
class GenerationSpec:
    """What the runtime needs to know of a causal LM before it loads it (``"generation"`` in the manifest).

    ``context_length``: prompt plus completion, in tokens (a request over it is a 400 before any work);
    ``eos_token_ids``: the ids that end a completion (``finish_reason: stop``); ``chat_template``: whether
    the tokenizer ships one (``/v1/chat/completions`` is a 400 without it); ``default_max_tokens``: a
    completion's length when the request names none; ``max_tokens_cap``: the most a request may ask for (in
    AWS nothing tells a function that its client went away, so this bounds the waste); ``max_concurrency``:
    generations of a version at once: across the router fleet where a usage table is configured
    (``tierserve.admission``: leased slots in DynamoDB), else per process (the edge, the CPU function);
    one more is a 429 with Retry-After;
    ``kv_bytes_per_token``: the KV cache's size per token (placement and batch sizing); ``tiers``: each
    tier's figures (:class:`TierFigures`).

    Token-aware routing (issue 18, ``routing.token_aware``) holds each tier to the model's objectives, written by
    ``tierserve compile --slo-ttft-ms / --slo-tokens-per-s / --slo-total-ms`` (None: no objective):
    ``slo_ttft_ms`` bounds the time to first token at the request's prompt length, ``slo_tokens_per_s`` the
    decode speed, ``slo_total_ms`` the estimated time to complete (first token plus ``max_tokens`` at the tier's
    speed). The router counts a prompt's tokens without the tokenizer with the compiler's calibration
    (``tierserve.generation.tokens``): ``chars_per_token`` for ASCII text, ``tokens_per_nonascii_byte`` for the
    rest, and ``token_estimate_error``, the largest relative error the compiler measured on its texts."""

    context_length: int
    eos_token_ids: tuple[int, ...]
    chat_template: bool = False
    default_max_tokens: int = 256
    max_tokens_cap: int = 4096
    max_concurrency: int = 4
    kv_bytes_per_token: int = 0
    vocab_size: int = 0
    family: str = ""
    tiers: dict[str, TierFigures] = field(default_factory=dict)
    #: The Hugging Face weights the GPU tier's vLLM loads (``config.json`` as the entry, the safetensors and tokenizer
    #: files as its other files, each with its sha256; the SageMaker packager checks them); None without a GPU entry.
    hf_weights: Variant | None = None
    slo_ttft_ms: float | None = None
    slo_tokens_per_s: float | None = None
    slo_total_ms: float | None = None
    chars_per_token: float | None = None
    tokens_per_nonascii_byte: float | None = None
    token_estimate_error: float | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "context_length": self.context_length, "eos_token_ids": list(self.eos_token_ids),
            "chat_template": self.chat_template, "default_max_tokens": self.default_max_tokens,
            "max_tokens_cap": self.max_tokens_cap, "max_concurrency": self.max_concurrency,
            "kv_bytes_per_token": self.kv_bytes_per_token, "vocab_size": self.vocab_size,
        }
        if self.family:
            d["family"] = self.family
        if self.tiers:
            d["tiers"] = {k: v.to_json() for k, v in sorted(self.tiers.items())}
        if self.hf_weights is not None:
            d["hf_weights"] = self.hf_weights.to_json()
        for key in GENERATION_OPTIONAL:
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GenerationSpec:
        def parse(d: dict[str, Any]) -> GenerationSpec:
            return cls(
                context_length=int(d["context_length"]),
                eos_token_ids=tuple(int(x) for x in d["eos_token_ids"]),
                chat_template=_flag(d.get("chat_template", False), "generation.chat_template"),
                default_max_tokens=int(d.get("default_max_tokens", 256)),
                max_tokens_cap=int(d.get("max_tokens_cap", 4096)),
                max_concurrency=int(d.get("max_concurrency", 4)),
                kv_bytes_per_token=int(d.get("kv_bytes_per_token", 0)),
                vocab_size=int(d.get("vocab_size", 0)),
                family=str(d.get("family") or ""),
                tiers={str(k): TierFigures.from_json(v) for k, v in (d.get("tiers") or {}).items()},
                hf_weights=Variant.from_json(d["hf_weights"]) if d.get("hf_weights") is not None else None,
                **{k: float(_number(d[k])) for k in GENERATION_OPTIONAL if d.get(k) is not None},
            )

        g = _fields("generation", d, parse)
        if g.context_length < 2 or not g.eos_token_ids:
            raise ManifestError("generation: context_length must be >= 2 and eos_token_ids non-empty")
        if not 1 <= g.default_max_tokens <= g.max_tokens_cap:
            raise ManifestError(f"generation: default_max_tokens {g.default_max_tokens} must be within "
                                f"[1, max_tokens_cap={g.max_tokens_cap}]")
        if g.max_concurrency < 1:
            raise ManifestError("generation: max_concurrency must be at least 1")
        if any(t not in TARGETS for t in g.tiers):
            raise ManifestError(f"generation.tiers names {sorted(g.tiers)}; tiers are {TARGETS}")
        for key in GENERATION_OPTIONAL:
            value = getattr(g, key)
            if value is not None and not (value > 0 or (key == "token_estimate_error" and value == 0)):
                raise ManifestError(f"generation.{key} must be positive, got {value}; recompile the model")
        return g


#: GenerationSpec's optional numbers (issue 18): the SLOs token-aware routing holds the tiers to, and the
#: prompt-token estimate's calibration; written only when set.
GENERATION_OPTIONAL = ("slo_ttft_ms", "slo_tokens_per_s", "slo_total_ms", "chars_per_token",
                       "tokens_per_nonascii_byte", "token_estimate_error")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: dict[str, Variant]
    selected_variant: str
    targets: tuple[str, ...] = (Tier.CPU,)
    cpu_variant: str | None = None
    max_batch_size: int = 0
    edge_variant: str | None = None
    routing: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    published_at: str = ""
    published_by: str = ""
    retired_at: str = ""

    @property
    def retired(self) -> bool:
        return bool(self.retired_at)

    def signature(self) -> tuple[Any, ...]:
        """What a client and the GPU tier's config see of this version: names, datatypes, shapes, batch."""
        return (tuple(self.inputs), tuple(self.outputs), self.max_batch_size)
    #: Whether NaN and Infinity are valid inputs; off by default (a non-finite input is a 400).
    allow_non_finite: bool = False
    #: ``inference`` (one forward pass) or ``text-generation`` (a causal LM, with ``generation`` set).
    task: str = TASK_INFERENCE
    generation: GenerationSpec | None = None

    @property
    def generative(self) -> bool:
        return self.task == TASK_TEXT_GENERATION

    @property
    def serves_cpu(self) -> bool:
        return Tier.CPU in self.targets

    @property
    def serves_gpu(self) -> bool:
        return Tier.GPU in self.targets

    @property
    def serves_edge(self) -> bool:
        return Tier.EDGE in self.targets

    @property
    def cloud_targets(self) -> tuple[str, ...]:
        """The targets in the cloud (what the router chooses among): ``edge`` left out."""
        return tuple(t for t in self.targets if t in CLOUD_TARGETS)

    @property
    def cpu_artifact(self) -> Variant:
        """The variant the CPU tier loads."""
        return self.variants[self.cpu_variant or self.selected_variant]

    @property
    def edge_artifact(self) -> Variant:
        """The variant an edge device loads: ``edge_variant``, else the CPU tier's."""
        return self.variants[self.edge_variant or self.cpu_variant or self.selected_variant]

    def input_spec(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "max_batch_size": self.max_batch_size,
            "variants": {k: v.to_json() for k, v in self.variants.items()},
            "selected_variant": self.selected_variant,
            "targets": list(self.targets),
            "routing": dict(self.routing),
            "cpu": dict(self.cpu),
            "created_at": self.created_at,
        }
        if self.cpu_variant:
            d["cpu_variant"] = self.cpu_variant
        if self.edge_variant:
            d["edge_variant"] = self.edge_variant
        for key in ("published_at", "published_by", "retired_at"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        if self.allow_non_finite:
            d["allow_non_finite"] = True
        if self.task != TASK_INFERENCE:
            d["task"] = self.task
        if self.generation is not None:
            d["generation"] = self.generation.to_json()
        return d

    @classmethod
    def from_json(cls, name: str, version: str, d: dict[str, Any]) -> ModelVersion:
        try:
            mv = cls(
                name=check_model_name(name),
                version=check_version(version),
                inputs=tuple(TensorSpec.from_json(x) for x in d["inputs"]),
                outputs=tuple(TensorSpec.from_json(x) for x in d["outputs"]),
                variants={str(k): Variant.from_json(v) for k, v in d["variants"].items()},
                selected_variant=str(d["selected_variant"]),
                targets=tuple(d.get("targets") or (Tier.CPU,)),
                cpu_variant=d.get("cpu_variant"),
                max_batch_size=int(d.get("max_batch_size", 0)),
                edge_variant=d.get("edge_variant"),
                routing=dict(d.get("routing") or {}),
                cpu=dict(d.get("cpu") or {}),
                created_at=str(d.get("created_at", "")),
                published_at=str(d.get("published_at") or ""),
                published_by=str(d.get("published_by") or ""),
                retired_at=str(d.get("retired_at") or ""),
                allow_non_finite=_flag(d.get("allow_non_finite", False), "allow_non_finite"),
                task=str(d.get("task") or TASK_INFERENCE),
                generation=GenerationSpec.from_json(d["generation"]) if d.get("generation") is not None else None,
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, InvalidNameError) as exc:
            raise ManifestError(f"version {version!r}: bad manifest entry ({exc})") from exc
        if mv.selected_variant not in mv.variants:
            raise ManifestError(f"v{version}: selected variant {mv.selected_variant!r} is not listed")
        if mv.cpu_variant and mv.cpu_variant not in mv.variants:
            raise ManifestError(f"v{version}: cpu variant {mv.cpu_variant!r} is not listed")
        if mv.edge_variant and mv.edge_variant not in mv.variants:
            raise ManifestError(f"v{version}: edge variant {mv.edge_variant!r} is not listed")
        if not mv.targets or any(t not in TARGETS for t in mv.targets):
            raise ManifestError(f"v{version}: targets {mv.targets!r} must be a subset of {TARGETS}")
        if mv.task not in TASKS:
            raise ManifestError(f"v{version}: task {mv.task!r} is not one of {TASKS}")
        if mv.generative != (mv.generation is not None):
            raise ManifestError(f"v{version}: a text-generation model needs a 'generation' entry, and only it has one")
        if mv.generative:
            for variant in mv.variants.values():
                if posixpath.basename(variant.path) != "model.onnx" or any(
                        not GENAI_FILE_RE.fullmatch(posixpath.basename(e.path)) for e in variant.external_data):
                    raise ManifestError(f"v{version}: a text-generation variant is an onnxruntime-genai folder "
                                        f"(model.onnx, genai_config.json, tokenizer files); {variant.path!r} lists "
                                        f"{[posixpath.basename(e.path) for e in variant.external_data]}")
                if "genai_config.json" not in {posixpath.basename(e.path) for e in variant.external_data}:
                    raise ManifestError(f"v{version}: variant {variant.path!r} lists no genai_config.json")
        if not mv.cloud_targets:
            raise ManifestError(f"v{version}: targets {list(mv.targets)} name no cloud tier; an edge model also "
                                "needs cpu or gpu, which serve what a device forwards (recompile with --target edge)")
        return mv


@dataclass(frozen=True)
class ModelEntry:
    """One model: its versions, which one requests get by default, and an optional canary split."""

    name: str
    default_version: str
    versions: dict[str, ModelVersion]
    canary: dict[str, Any] | None = None  # {"version": "2", "percent": 10}
    previous_default: str | None = None  # the default before the last promote (what `rollback` returns to)

    def listed(self) -> dict[str, ModelVersion]:
        """The versions served (not retired), by version."""
        return {v: mv for v, mv in self.versions.items() if not mv.retired}

    def to_json(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "default_version": self.default_version,
            "versions": {v: mv.to_json() for v, mv in sorted(self.versions.items(), key=lambda kv: int(kv[0]))},
        }
        if self.canary:
            m["canary"] = self.canary
        if self.previous_default:
            m["previous_default"] = self.previous_default
        return m

    @classmethod
    def from_json(cls, name: str, m: dict[str, Any]) -> ModelEntry:
        """One model's entry; raises :class:`ManifestError` saying what is wrong with it."""
        check_model_name(name)

        def parse(m: dict[str, Any]) -> dict[str, ModelVersion]:
            return {str(v): ModelVersion.from_json(name, str(v), body) for v, body in m["versions"].items()}

        versions = _fields("model entry", m, parse)
        if not versions:
            raise ManifestError("it lists no versions")
        default = str(m.get("default_version") or max(versions, key=int))
        if default not in versions:
            raise ManifestError(f"default_version {default!r} is not one of its versions")
        canary = m.get("canary")
        if canary is not None and not (
            isinstance(canary, dict)
            and str(canary.get("version")) in versions
            and _fields("canary", canary, lambda c: 0 <= float(c.get("percent", -1)) <= 100)
        ):
            raise ManifestError("canary needs a listed version and 0 <= percent <= 100")
        if versions[default].retired or (canary is not None and versions[str(canary["version"])].retired):
            raise ManifestError("the default version and the canary cannot be retired versions")
        previous = m.get("previous_default")
        return cls(name=name, default_version=default, versions=versions, canary=canary,
                   previous_default=str(previous) if previous else None)


@dataclass(frozen=True)
class Broken:
    """A model entry that cannot be served: why, and its JSON as it was (written back unchanged)."""

    reason: str
    raw: Any


@dataclass(frozen=True)
class Manifest:
    models: dict[str, ModelEntry]
    broken: dict[str, Broken] = field(default_factory=dict)
    revision: int = 0
    change: dict[str, Any] | None = None

    @classmethod
    def empty(cls) -> Manifest:
        return cls(models={})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """Parse the manifest. A bad model entry lands in ``broken`` with its reason; only a bad
        document (not an object, wrong schema version) fails the whole manifest."""
        if not isinstance(d, dict) or d.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version must be {SCHEMA_VERSION}; recompile the models with this tierserve"
            )
        entries = d.get("models") or {}
        if not isinstance(entries, dict):
            raise ManifestError("manifest 'models' must be an object of model name -> entry")
        models: dict[str, ModelEntry] = {}
        broken: dict[str, Broken] = {}
        for name, m in entries.items():
            try:
                models[name] = ModelEntry.from_json(name, m)
            except (ManifestError, InvalidNameError) as exc:
                broken[name] = Broken(exc.message, m)
        change = d.get("change")
        revision = d.get("revision", 0)
        if not isinstance(revision, int) or revision < 0:
            raise ManifestError(f"manifest 'revision' must be a non-negative integer, got {revision!r}")
        return cls(models=models, broken=broken, revision=revision,
                   change=change if isinstance(change, dict) else None)

    @classmethod
    def loads(cls, text: str | bytes) -> Manifest:
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "models": {}}
        for name, entry in sorted(self.models.items()):
            out["models"][name] = entry.to_json()
        for name, bad in sorted(self.broken.items()):
            out["models"].setdefault(name, bad.raw)
        if self.revision:
            out["revision"] = self.revision
        if self.change:
            out["change"] = self.change
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    def resolve(self, name: str, version: str | None = None) -> ModelVersion:
        """The model version a request names; without a version, the model's default version."""
        check_model_name(name)
        if name in self.broken:
            raise ManifestError(
                f"model {name!r} cannot be served: its manifest entry is invalid ({self.broken[name].reason}); "
                "recompile it with tierserve compile (the other models are not affected)"
            )
        entry = self.models.get(name)
        if entry is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"unknown model {name!r}; models served here: {known}")
        if version is None or version == "":
            version = entry.default_version
        check_version(version)
        mv = entry.versions.get(version)
        if mv is not None and mv.retired and not _within_grace(mv.retired_at):
            mv = None
        if mv is None:
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r}; versions: {', '.join(sorted(entry.listed(), key=int))}"
            )
        return mv

    def with_version(self, mv: ModelVersion, *, make_default: bool = True) -> Manifest:
        """A new manifest with ``mv`` added (the compiler's write path). The first version of a model is
        always its default; a later one only with ``make_default``."""
        entry = self.models.get(mv.name)
        versions = dict(entry.versions) if entry else {}
        versions[mv.version] = mv
        if entry is None:
            return self.with_entry(ModelEntry(mv.name, mv.version, versions))
        default = mv.version if make_default else entry.default_version
        previous = entry.default_version if default != entry.default_version else entry.previous_default
        return self.with_entry(ModelEntry(mv.name, default, versions, entry.canary, previous))

    def with_entry(self, entry: ModelEntry | None, name: str | None = None, *, revision: int | None = None,
                   change: dict[str, Any] | None = None) -> Manifest:
        """A new manifest with ``entry`` in place of its model's entry (None: ``name`` removed); a lifecycle
        change also sets the new ``revision`` and its ``change`` record."""
        name = entry.name if entry is not None else name
        assert name is not None
        models = {k: v for k, v in self.models.items() if k != name}
        if entry is not None:
            models[name] = entry
        broken = {k: v for k, v in self.broken.items() if k != name}  # a new entry replaces a bad one
        return Manifest(models=models, broken=broken, revision=self.revision if revision is None else revision,
                        change=self.change if revision is None else change)


def parse_time(text: str) -> float | None:
    """Seconds since the epoch for an ISO-8601 UTC time as the manifest writes it, or None."""
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return None


def _within_grace(retired_at: str) -> bool:
    at = parse_time(retired_at)
    return at is not None and time.time() - at < RETIRE_GRACE_S
