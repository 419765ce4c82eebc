"""One batch job: read the input in chunks, score each chunk, write parts, checkpoint, finish.

A job is identified by its input object *version* and its output prefix. Its progress lives in
the JobTable (``tierserve.batch.state``): after every part the runner checkpoints the next part
number and the input position, so a crash or a timeout loses at most the part in flight, and a
part rewritten after a crash has the same bytes (part boundaries are pinned at the job's start
and the same rows always go through the model together).

Output layout, under ``batch/out/{model}/{job}/`` (or the job message's ``output``):
``part-00000.jsonl`` ... (one line per scored input line, in order), ``errors.jsonl`` (one line
per malformed input line, with its line number), and ``_SUCCESS`` (counts, model version,
variant sha256, timings), always written last. Per-part error fragments are kept under
``batch/work/`` until the job completes, so the output folder only ever holds final files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tierserve import errors, telemetry
from tierserve.app import Runtime, get_runtime
from tierserve.batch.io import (
    OUTPUT_PREFIX,
    WORK_PREFIX,
    BatchInputError,
    Record,
    S3Location,
    chunk_feeds,
    encode_errors,
    encode_parquet_part,
    encode_part,
    input_format,
    jsonl_records,
    npz_records,
    parquet_records,
    parse_s3_uri,
    split_input_key,
)
from tierserve.batch.state import JobState, JobStore
from tierserve.manifest import ModelVersion, check_model_name, check_version
from tierserve.observability import MetricUnit, logger, metrics
from tierserve.tiering import Deadline

#: Test seam: called as hook(stage, part) with stage "written" (part object written, not yet
#: checkpointed) or "checkpointed". Tests raise from it to simulate a crash.
after_part_hook: Callable[[str, int], None] | None = None


@dataclass(frozen=True)
class JobSpec:
    model: str
    input: S3Location
    output: S3Location  # a prefix: parts go to {output.key}/part-NNNNN.jsonl
    version: str | None = None
    input_version: dict[str, str] = field(default_factory=dict)  # {"version_id", "etag"}
    continuation: int | None = None
    idempotency_key: str = ""

    @property
    def job_key(self) -> str:
        pin = self.input_version.get("version_id") or self.input_version.get("etag") or ""
        return f"{self.input.uri}@{pin}->{self.output.uri}"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "input": self.input.uri, "output": self.output.uri}
        if self.version:
            d["version"] = self.version
        if self.input_version:
            d["input_version"] = dict(self.input_version)
        if self.continuation is not None:
            d["continuation"] = self.continuation
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
    idem = _hash(["job", {k: body[k] for k in sorted(body) if k != "idempotency_key"}])
    return JobSpec(model, loc, out, version, {k: str(v) for k, v in pin.items()}, cont, idem)


# --- running a job ----------------------------------------------------------------------------------


def _remaining_ms(context: Any) -> float | None:
    fn = getattr(context, "get_remaining_time_in_millis", None)
    return float(fn()) if fn else None


def run_job(spec: JobSpec, context: Any = None) -> dict[str, Any]:
    """Run (or resume, or recognise as finished) one job; return its summary."""
    app = get_runtime()
    settings = app.settings
    s3 = app.aws("s3")
    jobs = JobStore(settings.job_table, app.aws("dynamodb-resource"))
    head = _head(s3, spec)
    if not spec.input_version:  # a job message names an object: pin the version it has now
        pin = {k: v for k, v in (("version_id", head.get("VersionId")), ("etag", head.get("ETag"))) if v}
        spec = JobSpec(spec.model, spec.input, spec.output, spec.version, pin, spec.continuation,
                       spec.idempotency_key)
    state = jobs.load(spec.job_key)
    if state is not None and state.status == "completed":
        logger.info("batch job already completed", extra={"job": spec.job_key})
        return {**state.summary, "status": "already_completed"}
    if state is None:
        model = app.store.manifest().resolve(spec.model, spec.version)
        state = JobState(job_key=spec.job_key, model=model.name, version=model.version,
                         variant_sha256=_variant_sha256(model),
                         input_version=dict(spec.input_version), input_size=int(head["ContentLength"]),
                         chunk_rows=settings.chunk_rows, started_at=time.time())
        jobs.save(state, None)
    else:
        model = app.store.manifest().resolve(state.model, state.version)
    return _Runner(app, s3, jobs, spec, model, state, context).run()


def _variant_sha256(model: ModelVersion) -> str:
    """The artifact that scores the job: the CPU variant, or the selected one for GPU-only models."""
    if model.serves_cpu:
        return model.cpu_artifact.sha256
    selected = model.variants.get(model.selected_variant)
    return selected.sha256 if selected else ""


def _head(s3: Any, spec: JobSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"Bucket": spec.input.bucket, "Key": spec.input.key}
    vid = spec.input_version.get("version_id")
    if vid and vid != "null":
        kwargs["VersionId"] = vid
    try:
        head = s3.head_object(**kwargs)
    except Exception as exc:
        raise BatchInputError(f"cannot read {spec.input.uri}: {exc}; check that it exists and that the "
                              "function may read it") from exc
    etag = spec.input_version.get("etag")
    if etag and not kwargs.get("VersionId") and head.get("ETag", "").strip('"') != etag.strip('"'):
        raise BatchInputError(f"{spec.input.uri} was replaced since the event (etag {head.get('ETag')} != "
                              f"{etag}); the newer object has its own event. To invoke by hand, use the object's "
                              "current eTag "
                              "(tests/support/make_batch_events.py builds events/s3_put.json for its demo input)")
    return head


class _Runner:
    def __init__(self, app: Runtime, s3: Any, jobs: JobStore, spec: JobSpec, model: ModelVersion,
                 state: JobState, context: Any) -> None:
        self.app, self.s3, self.jobs, self.spec, self.model = app, s3, jobs, spec, model
        self.state, self.context = state, context
        self.out_datatypes = {o.name: o.datatype for o in model.outputs}
        self.parquet = input_format(spec.input.key) == "parquet"  # Parquet in, Parquet parts out
        self.work_prefix = f"{WORK_PREFIX}{state.item_id[4:36]}"

    def run(self) -> dict[str, Any]:
        st = self.state
        st.invocations += 1
        expected = st.next_part
        records = self._records()
        done_here = 0
        margin = self.app.settings.checkpoint_margin_ms
        while True:
            t0 = time.perf_counter()
            chunk = list(itertools.islice(records, st.chunk_rows))
            st.read_s += time.perf_counter() - t0
            if not chunk:
                break
            remaining = _remaining_ms(self.context)
            if done_here and remaining is not None and remaining < margin:
                if self.app.settings.continuation_queue_url:  # the chunk read is read again there
                    self.jobs.save(st, expected)
                    return self._continue()
                logger.warning("CONTINUATION_QUEUE_URL is not set; running on past the checkpoint margin")
            self._part(chunk)
            if after_part_hook:
                after_part_hook("written", st.next_part - 1)
            self.jobs.save(st, expected)
            expected = st.next_part
            done_here += 1
            if after_part_hook:
                after_part_hook("checkpointed", st.next_part - 1)
        return self._finish(expected)

    def _records(self) -> Iterator[Record]:
        st = self.state
        fmt = input_format(self.spec.input.key)
        if fmt == "npz":
            return npz_records(self.s3, self.spec.input, st.input_version, self.model, st.next_offset,
                               st.chunk_rows)
        if fmt == "parquet":
            return parquet_records(self.s3, self.spec.input, st.input_version, self.model, st.next_offset,
                                   st.chunk_rows)
        return jsonl_records(self.s3, self.spec.input, st.input_version, self.model, st.next_offset,
                             st.next_line, st.input_size)

    def _part(self, chunk: list[Record]) -> None:
        st = self.state
        t0 = time.perf_counter()
        feeds = chunk_feeds(chunk, self.model)  # one numpy call per input for a regular chunk
        good = [r for r in chunk if r.error is None]
        st.read_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        outputs = self._infer(feeds, good) if good else {}
        if good and outputs is None:  # the batch was refused: find the bad lines one at a time
            outputs = self._infer_each(good, feeds)
            good = [r for r in good if r.error is None]
        st.infer_s += time.perf_counter() - t0
        bad = [r for r in chunk if r.error]
        t0 = time.perf_counter()
        if bad:
            self._put(f"{self.work_prefix}/errors-{st.next_part:05d}.jsonl", encode_errors(bad))
        if self.parquet:
            body = encode_parquet_part(good, outputs or {})
            self._put(f"{self.spec.output.key}/part-{st.next_part:05d}.parquet", body,
                      "application/vnd.apache.parquet")
        else:
            body = encode_part(good, outputs or {}, self.out_datatypes)
            self._put(f"{self.spec.output.key}/part-{st.next_part:05d}.jsonl", body)
        st.write_s += time.perf_counter() - t0
        st.next_part += 1
        st.next_offset = chunk[-1].end
        st.next_line = chunk[-1].line + 1
        st.lines += len(chunk)
        st.lines_ok += len(good)
        st.rows_ok += sum(r.rows for r in good)
        st.lines_error += len(bad)
        st.lines_blank += sum(1 for r in chunk if r.error == "")
        metrics.add_metric("BatchRows", MetricUnit.Count, sum(r.rows for r in good))

    def _infer(self, feeds: dict[str, np.ndarray], good: list[Record]) -> dict[str, np.ndarray] | None:
        try:
            return self._score(feeds)
        except errors.InvalidRequestError:
            if len(good) == 1:
                raise
            return None

    def _infer_each(self, good: list[Record], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {o.name: [] for o in self.model.outputs}
        row = 0
        for r in good:  # ``feeds`` holds the good records' rows in order
            own = {k: v[row:row + r.rows] for k, v in feeds.items()}
            row += r.rows
            try:
                out = self._score(own)
            except errors.InvalidRequestError as exc:
                r.error = exc.message
                continue
            for name, arr in out.items():
                parts[name].append(arr)
        return {k: np.concatenate(v) for k, v in parts.items() if v}

    def _score(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One batched inference through the tier dispatcher: onnxruntime here, or Triton (with its
        CPU fallback) for GPU models when a GPU tier is configured."""
        return self.app.dispatcher.score(self.model, feeds, Deadline.from_context(self.context))

    def _put(self, key: str, body: bytes, content_type: str = "application/x-ndjson") -> None:
        self.s3.put_object(Bucket=self.spec.output.bucket, Key=key, Body=body, ContentType=content_type)

    def _continue(self) -> dict[str, Any]:
        st = self.state
        msg = {"model": st.model, "version": st.version, "input": self.spec.input.uri,
               "output": self.spec.output.uri, "input_version": st.input_version, "continuation": st.next_part}
        self.app.aws("sqs").send_message(QueueUrl=self.app.settings.continuation_queue_url,
                                   MessageBody=json.dumps(msg, sort_keys=True))
        logger.info("batch job continues in a new invocation", extra={"job": st.job_key, "next_part": st.next_part})
        return {"status": "continued", "job": st.job_key, "next_part": st.next_part, "lines": st.lines}

    def _finish(self, expected: int) -> dict[str, Any]:
        st = self.state
        out = self.spec.output
        t0 = time.perf_counter()
        self._merge_errors()
        st.write_s += time.perf_counter() - t0
        summary = {
            "status": "completed",
            "job": out.key.rsplit("/", 1)[-1],
            "model": st.model,
            "model_version": st.version,
            "variant_sha256": st.variant_sha256,
            "input": self.spec.input.uri,
            "input_version": st.input_version,
            "output": out.uri,
            "parts": st.next_part,
            "chunk_rows": st.chunk_rows,
            "counts": {"lines": st.lines, "output_lines": st.lines_ok, "rows": st.rows_ok,
                       "errors": st.lines_error, "blank_lines": st.lines_blank},
            "invocations": st.invocations,
            "timings_s": {"read": round(st.read_s, 3), "infer": round(st.infer_s, 3),
                          "write": round(st.write_s, 3), "wall": round(time.time() - st.started_at, 3)},
        }
        self.s3.put_object(Bucket=out.bucket, Key=f"{out.key}/_SUCCESS",
                           Body=(json.dumps(summary, indent=2, sort_keys=True) + "\n").encode(),
                           ContentType="application/json")
        st.status, st.summary = "completed", summary
        self.jobs.save(st, expected)
        self._delete_work()
        telemetry.batch_job(st.model, st.version, rows=st.rows_ok, errors=st.lines_error,
                            seconds=time.time() - st.started_at)
        logger.info("batch job completed", extra={"job": st.job_key, "counts": summary["counts"]})
        return summary

    def _work_keys(self) -> list[str]:
        keys: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.spec.output.bucket,
                                                                      Prefix=self.work_prefix + "/"):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)

    def _merge_errors(self) -> None:
        out = self.spec.output
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as f:
            for key in self._work_keys():
                body = self.s3.get_object(Bucket=out.bucket, Key=key)["Body"]
                while block := body.read(1 << 20):
                    f.write(block)
            f.seek(0)
            self.s3.upload_fileobj(f, out.bucket, f"{out.key}/errors.jsonl",
                                   ExtraArgs={"ContentType": "application/x-ndjson"})

    def _delete_work(self) -> None:
        keys = self._work_keys()
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=self.spec.output.bucket,
                                   Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
