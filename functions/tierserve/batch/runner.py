"""One batch job run: read the input in chunks, score each chunk, write parts, checkpoint, continue, finish.

Why: a job's progress lives in the JobTable (``tierserve.batch.state``): after every part the runner
checkpoints the next part number and the input position, so a crash or a timeout loses at most the part in
flight, and a part rewritten after a crash has the same bytes (part boundaries are pinned at the job's start
and the same rows always go through the model together). Parts hold CHUNK_ROWS lines (JSONL) or up to
COLUMNAR_CHUNK_ROWS rows (NPZ, Parquet: ``chunks.part_rows``); for NPZ and Parquet a part's objects and its
checkpoint are written on a background thread, in the same order, while the next chunk is scored
(``tierserve.batch.writer``). A job near its deadline continues in a new invocation (a continuation message; a
generation part that would outlast the margin is left unwritten first, ``tierserve.batch.generate``);
a large job fans out into shards (``tierserve.batch.shards``), each run here as a job of its own. How a job
ends (errors merged, ``_SUCCESS``) is ``tierserve.batch.closing``.

Output layout, under ``batch/out/{model}/{job}/`` (or the job message's ``output``):
``part-00000.jsonl`` ... (one line per scored input line, in order; ``part-SSSSS-PPPPP`` when the
job fanned out into shards), ``errors.jsonl`` (one line per malformed input line, with its line number),
and ``_SUCCESS`` (counts, model version, variant sha256, timings), always written last, once. Per-part
error fragments are kept under ``batch/work/`` until the job completes, so the output folder only ever
holds final files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from tierserve import errors
from tierserve.app import Runtime, get_runtime
from tierserve.batch.chunks import Batch, Chunk, iter_chunks, part_rows
from tierserve.batch.closing import Closing, work_prefix
from tierserve.batch.generate import (
    FORMAT_OPENAI,
    GenerationPart,
    PartOutOfTime,
    hand_off,
    job_format,
    require_engine,
    write_part,
)
from tierserve.batch.generate import part_rows as generation_part_rows
from tierserve.batch.locations import BatchInputError, input_format, version_pin
from tierserve.batch.parts import encode_errors, encode_parquet_part, encode_part
from tierserve.batch.readers import jsonl_records, npz_records, parquet_records
from tierserve.batch.records import Record
from tierserve.batch.shards import Shard, plan
from tierserve.batch.spec import JobSpec
from tierserve.batch.state import JobState, JobStore
from tierserve.batch.writer import PartWriter
from tierserve.manifest import ModelVersion
from tierserve.observability import MetricUnit, logger, metrics
from tierserve.tiering import Deadline

#: Test seam: called as hook(stage, part) with stage "written" (part object written, not yet
#: checkpointed) or "checkpointed". Tests raise from it to simulate a crash.
after_part_hook: Callable[[str, int], None] | None = None


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
    head = _head(s3, spec)  # checks a pinned version / eTag against the object
    # One pin per object version, however the job arrived (an S3 event, a job message pinning a version, an eTag or
    # nothing): the job key (and so "already completed") must not depend on the delivery's spelling
    spec = dataclasses.replace(spec, input_version=version_pin(head.get("VersionId"), head.get("ETag")))
    state = jobs.load(spec.job_key)
    if spec.shard is not None:
        return _run_shard(app, s3, jobs, spec, state, context)
    if state is not None and state.status == "completed":
        logger.info("batch job already completed", extra={"job": spec.job_key})
        return {**state.summary, "status": "already_completed"}
    if state is None:
        model = app.store.manifest().resolve(spec.model, spec.version)
        fmt = job_format(spec.format, model, spec.input.key)  # OpenAI batch lines, or tensors
    else:
        model = app.store.manifest().resolve(state.model, state.version)
        fmt = state.format
    # An OpenAI batch job goes to BatchGenerateFunction when GENERATION_JOBS_QUEUE_URL says so: before anything is
    # written, inside this delivery's idempotent run (a redelivery gets this result back and sends nothing again)
    handed = _hand_off_or_require_engine(app, spec, model, fmt,
                                         spec.input_version if state is None else state.input_version)
    if handed is not None:
        return handed
    if state is not None and state.status == "sharded":  # a redelivery (a crash while fanning out?)
        return _fan_out(app, spec, state)
    if state is None:
        size = int(head["ContentLength"])
        if spec.continuation is None:
            shards = _plan(app, s3, spec, size, model)
            if len(shards) > 1:
                parent = JobState(job_key=spec.job_key, status="sharded", model=model.name, version=model.version,
                                  variant_sha256=_variant_sha256(model), input_version=dict(spec.input_version),
                                  input_size=size, chunk_rows=_part_rows(app, spec, model), started_at=time.time(),
                                  invocations=1, shards=len(shards), shard_plan=[sh.bounds() for sh in shards],
                                  format=fmt)
                jobs.save(parent, None)
                return _fan_out(app, spec, parent)
        state = JobState(job_key=spec.job_key, model=model.name, version=model.version,
                         variant_sha256=_variant_sha256(model),
                         input_version=dict(spec.input_version), input_size=size,
                         chunk_rows=_part_rows(app, spec, model), started_at=time.time(), format=fmt)
        jobs.save(state, None)
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
    # A shard of an OpenAI job that reached BatchInferenceFunction (misrouted, or redriven from the wrong DLQ) goes to
    # BatchGenerateFunction as that shard, before anything is written here
    handed = _hand_off_or_require_engine(app, spec, model, parent.format, dict(parent.input_version))
    if handed is not None:
        return handed
    if state is None:
        state = JobState(job_key=spec.job_key, model=parent.model, version=parent.version,
                         variant_sha256=parent.variant_sha256, input_version=dict(parent.input_version),
                         input_size=parent.input_size, chunk_rows=parent.chunk_rows, started_at=time.time(),
                         next_offset=shard.start, next_line=shard.line, format=parent.format)
        jobs.save(state, None)
    if state.status == "completed":  # finished before: count it and close the job again (both idempotent)
        return {**Closing(s3, jobs, spec, state).complete_shard(), "status": "already_completed"}
    return _Runner(app, s3, jobs, spec, model, state, context).run()


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


def _part_rows(app: Runtime, spec: JobSpec, model: ModelVersion) -> int:
    if model.generative:  # bounded by the KV cache of a batch and the time to generate it
        return generation_part_rows(app, model)
    settings = app.settings
    return part_rows(input_format(spec.input.key), model, settings.chunk_rows, settings.columnar_chunk_rows,
                     settings.memory_mb)


def _variant_sha256(model: ModelVersion) -> str:
    """The artifact that scores the job: the CPU variant, or the selected one for GPU-only models."""
    if model.serves_cpu:
        return model.cpu_artifact.sha256
    selected = model.variants.get(model.selected_variant)
    return selected.sha256 if selected else ""


def _hand_off_or_require_engine(app: Runtime, spec: JobSpec, model: ModelVersion, fmt: str,
                                version: dict[str, str]) -> dict[str, Any] | None:
    """An OpenAI batch job (or its shard, or its continuation) handed to BatchGenerateFunction when
    GENERATION_JOBS_QUEUE_URL says so: the delivery's result. Otherwise None, once this function is known to hold the
    engine the job needs (a clear ConfigurationError before any work, when it does not)."""
    handed = hand_off(app, spec, model, fmt, version)
    if handed is not None:
        logger.info("batch generation job handed off", extra={"job": spec.job_key, "queue": handed["queue"]})
        return handed
    if fmt == FORMAT_OPENAI:
        require_engine()
    return None


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
        self.work_prefix = work_prefix(spec, state)
        self.writer: PartWriter | None = None
        self._pending: list[Callable[[], None]] = []  # the current part's writes, until its checkpoint
        self.generation = (GenerationPart(app, model, spec.input, spec.output.key, state.input_version, s3)
                           if state.format == FORMAT_OPENAI else None)  # OpenAI batch lines
        if self.generation is not None:
            self.generation.out_of_time = self._out_of_time

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
                try:
                    self._part(chunk)
                except PartOutOfTime:  # a generation part: nothing of it was written or queued
                    return self._abandon(expected, done_here)
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

    def _out_of_time(self, next_batch_s: float) -> bool:
        """Whether a generation part's next batch (about ``next_batch_s``) would run past the checkpoint margin;
        never without a continuation queue (nowhere to continue: run on), nor for parts of one line (cannot shrink)."""
        if not self.app.settings.continuation_queue_url or self.state.chunk_rows <= 1:
            return False
        remaining = _remaining_ms(self.context)
        return remaining is not None and remaining - next_batch_s * 1000 < self.app.settings.checkpoint_margin_ms

    def _abandon(self, expected: int, done_here: int) -> dict[str, Any]:
        """A generation part that ran out of time, left unwritten: continue from the last checkpoint. When the part
        began this invocation (a whole one was not enough), the job's parts halve from here: the new size is saved
        with the checkpoint before any part of that size is written, and an error fragment a crashed attempt at this
        part may have left is removed (the smaller part writes its own)."""
        st = self.state
        self._pending = []
        self._close_writer()
        if done_here == 0:
            st.chunk_rows = max(1, st.chunk_rows // 2)
            self.s3.delete_object(Bucket=self.spec.output.bucket,
                                  Key=f"{self.work_prefix}/errors-{st.next_part:05d}.jsonl")
        logger.warning("batch generation part would outlast the checkpoint margin; continuing in a new invocation",
                       extra={"job": st.job_key, "part": st.next_part, "chunk_rows": st.chunk_rows})
        self.jobs.save(st, expected)
        return self._continue()

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
        if self.generation is not None:  # OpenAI batch lines (tierserve.batch.generate)
            before = st.completion_tokens
            write_part(self.generation, chunk, st, self._put, f"{self.spec.output.key}/{self._part_name()}.jsonl",
                       f"{self.work_prefix}/errors-{st.next_part:05d}.jsonl")
            tokens = st.completion_tokens - before
            self._pending.append(lambda: metrics.add_metric("BatchCompletionTokens", MetricUnit.Count, tokens))
            return
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
        name = self._part_name()
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

    def _part_name(self) -> str:
        """part-PPPPP, or part-SSSSS-PPPPP for a shard: the names list in the input's order either way."""
        st = self.state
        return f"part-{st.next_part:05d}" if self.shard is None else f"part-{self.shard.index:05d}-{st.next_part:05d}"

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
        """The job's (or shard's) end, after its last part's checkpoint (``tierserve.batch.closing``)."""
        return Closing(self.s3, self.jobs, self.spec, self.state).finish(expected)
