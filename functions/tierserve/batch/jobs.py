"""One batch job: read the input in chunks, score each chunk, write parts, checkpoint, finish.

A job is identified by its input object *version* and its output prefix. Its progress lives in
the JobTable (``tierserve.batch.state``): after every part the runner checkpoints the next part
number and the input position, so a crash or a timeout loses at most the part in flight, and a
part rewritten after a crash has the same bytes (part boundaries are pinned at the job's start
and the same rows always go through the model together). Parts hold CHUNK_ROWS lines (JSONL) or up to
COLUMNAR_CHUNK_ROWS rows (NPZ, Parquet: ``io.part_rows``); for NPZ and Parquet a part's objects and its
checkpoint are written on a background thread, in the same order, while the next chunk is scored
(``tierserve.batch.writer``).

Output layout, under ``batch/out/{model}/{job}/`` (or the job message's ``output``):
``part-00000.jsonl`` ... (one line per scored input line, in order; ``part-SSSSS-PPPPP`` when the
job fanned out into shards, ``tierserve.batch.shards``), ``errors.jsonl`` (one line per malformed
input line, with its line number), and ``_SUCCESS`` (counts, model version, variant sha256,
timings), always written last, once. Per-part error fragments are kept under
``batch/work/`` until the job completes, so the output folder only ever holds final files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tierserve import errors, telemetry
from tierserve.app import Runtime, get_runtime
from tierserve.batch.io import (
    OUTPUT_PREFIX,
    WORK_PREFIX,
    Batch,
    BatchInputError,
    Chunk,
    Record,
    S3Location,
    encode_errors,
    encode_parquet_part,
    encode_part,
    input_format,
    iter_chunks,
    jsonl_records,
    npz_records,
    parquet_records,
    parse_s3_uri,
    part_rows,
    split_input_key,
)
from tierserve.batch.shards import MAX_SHARDS, Shard, plan, shard_done
from tierserve.batch.state import JobState, JobStore, job_item_id
from tierserve.batch.writer import PartWriter
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
    shard: Shard | None = None  # one shard of a job that fanned out (tierserve.batch.shards)
    shards: int | None = None  # a job message may ask for this many shards

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
    idem = _hash(["job", {k: body[k] for k in sorted(body) if k != "idempotency_key"}])
    return JobSpec(model, loc, out, version, {k: str(v) for k, v in pin.items()}, cont, idem, shard, shards)


# --- running a job ----------------------------------------------------------------------------------


def _hook(stage: str, part: int) -> None:
    if after_part_hook:
        after_part_hook(stage, part)


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
                       spec.idempotency_key, spec.shard, spec.shards)
    state = jobs.load(spec.job_key)
    if spec.shard is not None:
        return _run_shard(app, s3, jobs, spec, state, context)
    if state is not None and state.status == "completed":
        logger.info("batch job already completed", extra={"job": spec.job_key})
        return {**state.summary, "status": "already_completed"}
    if state is not None and state.status == "sharded":  # a redelivery (a crash while fanning out?)
        return _fan_out(app, spec, state)
    if state is None:
        model = app.store.manifest().resolve(spec.model, spec.version)
        size = int(head["ContentLength"])
        if spec.continuation is None:
            shards = _plan(app, s3, spec, size, model)
            if len(shards) > 1:
                parent = JobState(job_key=spec.job_key, status="sharded", model=model.name, version=model.version,
                                  variant_sha256=_variant_sha256(model), input_version=dict(spec.input_version),
                                  input_size=size, chunk_rows=_part_rows(settings, spec, model), started_at=time.time(),
                                  invocations=1, shards=len(shards), shard_plan=[sh.bounds() for sh in shards])
                jobs.save(parent, None)
                return _fan_out(app, spec, parent)
        state = JobState(job_key=spec.job_key, model=model.name, version=model.version,
                         variant_sha256=_variant_sha256(model),
                         input_version=dict(spec.input_version), input_size=size,
                         chunk_rows=_part_rows(settings, spec, model), started_at=time.time())
        jobs.save(state, None)
    else:
        model = app.store.manifest().resolve(state.model, state.version)
    return _Runner(app, s3, jobs, spec, model, state, context).run()


def _plan(app: Runtime, s3: Any, spec: JobSpec, size: int, model: ModelVersion) -> list[Shard]:
    """The job's shards (tierserve.batch.shards); one when it is small, or when shards cannot be queued."""
    settings = app.settings
    if not settings.continuation_queue_url:
        if spec.shards and spec.shards > 1:
            logger.warning("CONTINUATION_QUEUE_URL is not set: the job runs in this invocation, not in shards",
                           extra={"job": spec.job_key, "shards": spec.shards})
        return []
    return plan(s3, spec.input, spec.input_version, size, model, settings.shard_bytes, settings.shard_rows,
                spec.shards)


def _run_shard(app: Runtime, s3: Any, jobs: JobStore, spec: JobSpec, state: JobState | None,
               context: Any) -> dict[str, Any]:
    """Run (or resume, or count and close again) one shard of a job that fanned out."""
    shard = spec.shard
    assert shard is not None
    parent = jobs.load(spec.parent_key)
    if (parent is None or parent.status not in ("sharded", "completed") or parent.shards != shard.count
            or len(parent.shard_plan) != shard.count or list(parent.shard_plan[shard.index]) != shard.bounds()):
        raise BatchInputError(
            f"shard {shard.index}/{shard.count} of {spec.input.uri} -> {spec.output.uri} does not match a plan of "
            "that job (its job was never fanned out, or was planned differently, or the input was replaced); "
            'shard messages come from the job\'s own fan-out: send the whole job, with "shards": N, instead')
    model = app.store.manifest().resolve(parent.model, parent.version)
    if state is None:
        state = JobState(job_key=spec.job_key, model=parent.model, version=parent.version,
                         variant_sha256=parent.variant_sha256, input_version=dict(parent.input_version),
                         input_size=parent.input_size, chunk_rows=parent.chunk_rows, started_at=time.time(),
                         next_offset=shard.start, next_line=shard.line)
        jobs.save(state, None)
    runner = _Runner(app, s3, jobs, spec, model, state, context)
    if state.status == "completed":  # finished before: count it and close the job again (both idempotent)
        return {**runner.complete_shard(), "status": "already_completed"}
    return runner.run()


def _fan_out(app: Runtime, spec: JobSpec, parent: JobState) -> dict[str, Any]:
    """Send one job message per shard of the stored plan to the jobs queue.

    Sent again on a redelivery: the same bodies, so the same idempotency keys; a shard already done or
    running is a no-op (or a retried failure) there."""
    shards = [Shard(i, parent.shards, *bounds) for i, bounds in enumerate(parent.shard_plan)]
    base = {"model": parent.model, "version": parent.version, "input": spec.input.uri, "output": spec.output.uri,
            "input_version": parent.input_version}
    sqs = app.aws("sqs")
    for i in range(0, len(shards), 10):
        entries = [{"Id": str(sh.index), "MessageBody": json.dumps({**base, "shard": sh.to_json()}, sort_keys=True)}
                   for sh in shards[i:i + 10]]
        failed = sqs.send_message_batch(QueueUrl=app.settings.continuation_queue_url, Entries=entries).get("Failed")
        if failed:
            raise errors.BackendUnavailableError(f"the jobs queue refused {len(failed)} shard message(s) "
                                                 f"({failed[0].get('Message', failed[0].get('Code'))}); this "
                                                 "delivery will be retried", retry_after_s=30)
    logger.info("batch job fanned out", extra={"job": parent.job_key, "shards": len(shards)})
    metrics.add_metric("BatchShards", MetricUnit.Count, len(shards))
    return {"status": "fanned_out", "job": spec.output.key.rsplit("/", 1)[-1], "shards": len(shards),
            "output": spec.output.uri}


def _part_rows(settings: Any, spec: JobSpec, model: ModelVersion) -> int:
    return part_rows(input_format(spec.input.key), model, settings.chunk_rows, settings.columnar_chunk_rows,
                     settings.memory_mb)


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
        self.shard = spec.shard
        if self.shard is None:
            self.work_prefix = f"{WORK_PREFIX}{state.item_id[4:36]}"
        else:  # under the whole job's prefix, so that the closing shard merges every shard's errors in order
            self.work_prefix = f"{WORK_PREFIX}{job_item_id(spec.parent_key)[4:36]}/s{self.shard.index:05d}"
        self.writer: PartWriter | None = None
        self._pending: list[Callable[[], None]] = []  # the current part's writes, until its checkpoint

    def run(self) -> dict[str, Any]:
        """Parts in order, each checkpointed after its objects are written. For NPZ and Parquet inputs the
        writes and checkpoints run on ``PartWriter``'s thread while the next chunk is read and scored (same
        order, same checkpoints, one part waiting at most). JSONL parts are written here, in between: its
        chunks are parsed by long GIL-holding calls (orjson, numpy) that starve a writer thread, which
        measured slower than writing in line (docs/benchmarks.md)."""
        st = self.state
        st.invocations += 1
        expected = st.next_part
        chunks = iter_chunks(self._records(), st.chunk_rows)
        done_here = 0
        margin = self.app.settings.checkpoint_margin_ms
        writer = self.writer = PartWriter() if input_format(self.spec.input.key) != "jsonl" else None
        try:
            while True:
                t0 = time.perf_counter()
                chunk = next(chunks, None)
                st.read_s += time.perf_counter() - t0
                if chunk is None:
                    break
                remaining = _remaining_ms(self.context)
                if done_here and remaining is not None and remaining < margin:
                    if self.app.settings.continuation_queue_url:  # the chunk read is read again there
                        self._close_writer()
                        self.jobs.save(st, expected)
                        return self._continue()
                    logger.warning("CONTINUATION_QUEUE_URL is not set; running on past the checkpoint margin")
                self._part(chunk)
                self._checkpoint(st.next_part - 1, expected)
                expected = st.next_part
                done_here += 1
            self._close_writer()
        finally:
            if self.writer is not None and writer is not None:  # failing: what was submitted, not its error
                self.writer, self._pending = None, []
                with contextlib.suppress(Exception):  # the exception in flight is the one to report
                    writer.close()
        return self._finish(expected)

    def _checkpoint(self, part: int, expected: int) -> None:
        """The part's objects, then ``written``, its checkpoint, ``checkpointed`` (the test hook's stages)."""
        st, writer = self.state, self.writer
        snapshot = dataclasses.replace(st, write_s=st.write_s + (writer.busy_s if writer else 0.0))
        tasks = [*self._pending, lambda: _hook("written", part),
                 lambda: self.jobs.save(snapshot, expected), lambda: _hook("checkpointed", part)]
        self._pending = []
        if writer is not None:
            writer.submit(tasks)
            return
        t0 = time.perf_counter()
        for task in tasks:
            task()
        st.write_s += time.perf_counter() - t0

    def _close_writer(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
            self.state.write_s += writer.busy_s

    def _records(self) -> Iterable[Record]:
        st = self.state
        fmt = input_format(self.spec.input.key)
        stop = self.shard.stop if self.shard is not None else None
        if fmt == "npz":
            return npz_records(self.s3, self.spec.input, st.input_version, self.model, st.next_offset,
                               st.chunk_rows, stop_row=stop)
        if fmt == "parquet":
            return parquet_records(self.s3, self.spec.input, st.input_version, self.model, st.next_offset,
                                   st.chunk_rows, stop_row=stop)
        return jsonl_records(self.s3, self.spec.input, st.input_version, self.model, st.next_offset,
                             st.next_line, st.input_size, stop=stop)

    def _part(self, chunk: Chunk) -> None:
        st = self.state
        t0 = time.perf_counter()
        good = chunk.assemble(self.model)  # the scorable lines as columns (one numpy call per input)
        feeds = good.feeds
        st.read_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        outputs = self._infer(feeds, good) if good else {}
        if good and outputs is None:  # the batch was refused: find the bad lines one at a time
            outputs = self._infer_each(good, feeds)
            good = good.without_errors()
        st.infer_s += time.perf_counter() - t0
        bad = good.bad
        t0 = time.perf_counter()
        if bad:
            self._put(f"{self.work_prefix}/errors-{st.next_part:05d}.jsonl", encode_errors(bad))
        # part-PPPPP, or part-SSSSS-PPPPP for a shard: the names list in the input's order either way
        name = f"part-{st.next_part:05d}" if self.shard is None else f"part-{self.shard.index:05d}-{st.next_part:05d}"
        if self.parquet:  # encoded where it is written: pyarrow lets the next chunk be scored meanwhile
            encode = functools.partial(encode_parquet_part, good, outputs or {})
            self._put(f"{self.spec.output.key}/{name}.parquet", encode, "application/vnd.apache.parquet")
        else:
            body = encode_part(good, outputs or {}, self.out_datatypes)
            self._put(f"{self.spec.output.key}/{name}.jsonl", body)
        st.write_s += time.perf_counter() - t0
        st.next_part += 1
        st.next_offset = chunk.end
        st.next_line = chunk.next_line
        st.lines += len(chunk)
        st.lines_ok += len(good)
        st.rows_ok += good.rows
        st.lines_error += len(bad)
        st.lines_blank += good.blank
        rows = good.rows
        self._pending.append(lambda: metrics.add_metric("BatchRows", MetricUnit.Count, rows))

    def _infer(self, feeds: dict[str, np.ndarray], good: Batch) -> dict[str, np.ndarray] | None:
        try:
            return self._score(feeds)
        except errors.InvalidRequestError:
            if len(good) == 1:
                raise
            return None

    def _infer_each(self, good: Batch, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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

    def _put(self, key: str, body: bytes | Callable[[], bytes], content_type: str = "application/x-ndjson") -> None:
        """Write an object with the part's checkpoint, just before it (``_checkpoint``); ``body`` may be a
        function that encodes it, called there."""
        def put() -> None:
            self.s3.put_object(Bucket=self.spec.output.bucket, Key=key, Body=body() if callable(body) else body,
                               ContentType=content_type)

        self._pending.append(put)

    def _continue(self) -> dict[str, Any]:
        st = self.state
        msg: dict[str, Any] = {"model": st.model, "version": st.version, "input": self.spec.input.uri,
                               "output": self.spec.output.uri, "input_version": st.input_version,
                               "continuation": st.next_part}
        if self.shard is not None:
            msg["shard"] = self.shard.to_json()
        self.app.aws("sqs").send_message(QueueUrl=self.app.settings.continuation_queue_url,
                                   MessageBody=json.dumps(msg, sort_keys=True))
        logger.info("batch job continues in a new invocation", extra={"job": st.job_key, "next_part": st.next_part})
        return {"status": "continued", "job": st.job_key, "next_part": st.next_part, "lines": st.lines}

    def _finish(self, expected: int) -> dict[str, Any]:
        if self.shard is not None:
            return self._finish_shard(expected)
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

    def _finish_shard(self, expected: int) -> dict[str, Any]:
        """This shard is done: its state says so first, then it is counted in the job's item."""
        st, shard = self.state, self.shard
        assert shard is not None
        st.status = "completed"
        st.summary = {"status": "completed", "shard": shard.index, "shards": shard.count, "parts": st.next_part,
                      "invocations": st.invocations,
                      "counts": {"lines": st.lines, "output_lines": st.lines_ok, "rows": st.rows_ok,
                                 "errors": st.lines_error, "blank_lines": st.lines_blank},
                      "timings_s": {"read": round(st.read_s, 3), "infer": round(st.infer_s, 3),
                                    "write": round(st.write_s, 3)}}
        self.jobs.save(st, expected)
        return self.complete_shard()

    def complete_shard(self) -> dict[str, Any]:
        """Count this (completed) shard in the job's item; the shard that completes the set closes the job.
        Idempotent: a redelivery after a crash anywhere here runs it again."""
        st, shard = self.state, self.shard
        assert shard is not None
        figures = {"lines": st.lines, "lines_ok": st.lines_ok, "rows_ok": st.rows_ok, "lines_error": st.lines_error,
                   "lines_blank": st.lines_blank, "invocations": st.invocations, "parts": st.next_part,
                   "read_s": round(st.read_s, 6), "infer_s": round(st.infer_s, 6), "write_s": round(st.write_s, 6)}
        closes, parent = shard_done(self.jobs.table, job_item_id(self.spec.parent_key), shard, figures)
        logger.info("batch shard completed", extra={"job": self.spec.parent_key, "shard": shard.index,
                                                     "closes_job": closes})
        if closes:
            self._close_job(parent)
        return dict(st.summary)

    def _close_job(self, parent: dict[str, Any]) -> None:
        """Every shard is in: errors merged in the input's order, then _SUCCESS (once), then the job's item."""
        from tierserve.batch.state import _to_dynamo

        out = self.spec.output
        counts = {"lines": parent["lines"], "output_lines": parent["lines_ok"], "rows": parent["rows_ok"],
                  "errors": parent["lines_error"], "blank_lines": parent["lines_blank"]}
        wall = time.time() - float(parent.get("started_at") or time.time())
        summary = {"status": "completed", "job": out.key.rsplit("/", 1)[-1], "model": parent["model"],
                   "model_version": parent["version"], "variant_sha256": parent.get("variant_sha256", ""),
                   "input": self.spec.input.uri, "input_version": parent.get("input_version", {}),
                   "output": out.uri, "shards": int(parent["shards"]), "parts": int(parent["parts"]),
                   "chunk_rows": parent.get("chunk_rows"), "counts": counts,
                   "invocations": int(parent["invocations"]),
                   "timings_s": {"read": round(float(parent["read_s"]), 3), "infer": round(float(parent["infer_s"]), 3),
                                 "write": round(float(parent["write_s"]), 3), "wall": round(wall, 3)}}
        self.work_prefix = f"{WORK_PREFIX}{job_item_id(self.spec.parent_key)[4:36]}"  # every shard's fragments
        key = f"{out.key}/_SUCCESS"
        # Each step can be run again by the closer's redelivery: once _SUCCESS exists, errors.jsonl (written
        # before it) is final and the fragments may already be gone, so neither is touched again.
        if not self._exists(key):
            self._merge_errors()  # s00000/errors-00000 ... sort in the input's order
            self._put_once(key, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        self._delete_work()
        self.jobs.table.update_item(Key={"id": job_item_id(self.spec.parent_key)},
                                    UpdateExpression="SET #s = :done, summary = :summary",
                                    ExpressionAttributeNames={"#s": "status"},
                                    ExpressionAttributeValues={":done": "completed", ":summary": _to_dynamo(summary)})
        telemetry.batch_job(parent["model"], parent["version"], rows=counts["rows"], errors=counts["errors"],
                            seconds=wall)
        logger.info("batch job completed", extra={"job": self.spec.parent_key, "counts": counts,
                                                  "shards": summary["shards"]})

    def _put_once(self, key: str, body: bytes) -> None:
        """PutObject If-None-Match: *, S3's conditional write: a second writer (which the ``closer`` claim
        already rules out) would get 412 and leave the first object alone."""
        from botocore.exceptions import ClientError

        try:
            self.s3.put_object(Bucket=self.spec.output.bucket, Key=key, Body=body, ContentType="application/json",
                               IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412",
                                                                   "ConditionalRequestConflict"):
                raise
            logger.warning("_SUCCESS was already written; left as it is", extra={"key": key})

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=self.spec.output.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

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
