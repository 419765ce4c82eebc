"""A batch job's specification: what to score and where, from an S3 event record or a job message.

Why: a job is identified by its input object *version* and its output prefix (``job_key``), whatever
delivered it: an S3 ``ObjectCreated`` record of ``batch/in/{model}/{job}.{jsonl,npz,parquet}``, a job
message ``{"model", "version"?, "input", "output"?, "shards"?, "format"?}``, a continuation of a job that ran out of
time, or one shard of a job that fanned out (``tierserve.batch.shards``). Every message is checked here,
before anything runs, with an error that says what was wrong; each delivery gets the idempotency key that
``tierserve.batch.service`` runs it under.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from tierserve.batch.locations import (
    OUTPUT_PREFIX,
    BatchInputError,
    S3Location,
    input_format,
    parse_s3_uri,
    split_input_key,
)
from tierserve.batch.shards import MAX_SHARDS, Shard
from tierserve.manifest import check_model_name, check_version


@dataclass(frozen=True)
class JobSpec:
    model: str
    input: S3Location
    output: S3Location  # a prefix: parts go to {output.key}/part-NNNNN.jsonl
    version: str | None = None
    # {"version_id", "etag"} as delivered; run_job makes it canonical (locations.version_pin) before the job key counts
    input_version: dict[str, str] = field(default_factory=dict)
    continuation: int | None = None
    idempotency_key: str = ""
    shard: Shard | None = None  # one shard of a job that fanned out (tierserve.batch.shards)
    shards: int | None = None  # a job message may ask for this many shards
    format: str | None = None  # a job message may name its lines' format (tierserve.batch.generate.FORMATS)

    @property
    def parent_key(self) -> str:
        pin = self.input_version.get("version_id") or self.input_version.get("etag") or ""
        return f"{self.input.uri}@{pin}->{self.output.uri}"

    @property
    def job_key(self) -> str:
        if self.shard is None:
            return self.parent_key
        return f"{self.parent_key}#shard{self.shard.index}/{self.shard.count}"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "input": self.input.uri, "output": self.output.uri}
        if self.version:
            d["version"] = self.version
        if self.input_version:
            d["input_version"] = dict(self.input_version)
        if self.continuation is not None:
            d["continuation"] = self.continuation
        if self.shard is not None:
            d["shard"] = self.shard.to_json()
        if self.shards:
            d["shards"] = self.shards
        if self.format:
            d["format"] = self.format
        d["idempotency_key"] = self.idempotency_key
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobSpec:
        return job_from_message({k: v for k, v in d.items() if k != "idempotency_key"})


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def default_output(loc: S3Location, model: str) -> S3Location:
    key_model, name = split_input_key(loc.key)
    return S3Location(loc.bucket, f"{OUTPUT_PREFIX}{key_model or model}/{name}")


def job_from_s3_record(rec: dict[str, Any]) -> JobSpec:
    """A job for one S3 ``ObjectCreated`` record of ``batch/in/{model}/{job}.{jsonl,npz}``."""
    from urllib.parse import unquote_plus

    try:
        bucket = rec["s3"]["bucket"]["name"]
        obj = rec["s3"]["object"]
        key = unquote_plus(obj["key"])
    except (KeyError, TypeError) as exc:
        raise BatchInputError(f"S3 event record without s3.bucket.name / s3.object.key ({exc})") from exc
    loc = parse_s3_uri(f"s3://{bucket}/{key}", "input")
    model, _ = split_input_key(loc.key)
    if model is None:
        raise BatchInputError(f"S3 key {key!r} is not batch/in/{{model}}/{{job}}.jsonl|.npz")
    pin = {k: v for k, v in (("version_id", obj.get("versionId")), ("etag", obj.get("eTag"))) if v}
    idem = _hash(["s3", bucket, key, pin.get("version_id") or pin.get("etag") or obj.get("sequencer", "")])
    return JobSpec(model, loc, default_output(loc, model), None, pin, None, idem)


def job_from_message(body: dict[str, Any]) -> JobSpec:
    """A job for a job message ``{"model", "version"?, "input", "output"?}`` (or a continuation)."""
    if not isinstance(body, dict) or "model" not in body or "input" not in body:
        raise BatchInputError('a job message is {"model", "version"?, "input": "s3://...", "output"?: "s3://..."}')
    model = check_model_name(body["model"])
    version = body.get("version")
    if version is not None:
        version = check_version(str(version))
    loc = parse_s3_uri(body["input"], "input")
    input_format(loc.key)
    out = parse_s3_uri(body["output"], "output") if body.get("output") else default_output(loc, model)
    pin = body.get("input_version") or {}
    if not isinstance(pin, dict) or not all(isinstance(v, str) for v in pin.values()):
        raise BatchInputError("input_version must be {'version_id'?: str, 'etag'?: str}")
    cont = body.get("continuation")
    if cont is not None and (not isinstance(cont, int) or cont < 0):
        raise BatchInputError("continuation must be a non-negative part number")
    shard = Shard.from_json(body["shard"]) if "shard" in body else None
    shards = body.get("shards")
    if shards is not None:
        if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
            raise BatchInputError(f'"shards" must be a whole number from 1 to {MAX_SHARDS} (how many concurrent '
                                  f"invocations share the job), not {shards!r}")
        if shard is not None or cont is not None:
            raise BatchInputError('"shards" asks a whole job to fan out; a shard or continuation message '
                                  "cannot carry it")
    fmt = body.get("format")
    if fmt is not None and fmt not in ("openai", "tensors"):
        raise BatchInputError(f'"format" must be "openai" (OpenAI batch lines, for a text-generation model) or '
                              f'"tensors", not {fmt!r}; leave it out to follow the model')
    idem = _hash(["job", {k: body[k] for k in sorted(body) if k != "idempotency_key"}])
    return JobSpec(model, loc, out, version, {k: str(v) for k, v in pin.items()}, cont, idem, shard, shards, fmt)
