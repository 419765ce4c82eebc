"""Batch generation: OpenAI's batch input lines, generated a part at a time, answered in OpenAI's batch output shape.

Why: generation is at its cheapest in batch (nightly summaries, labelling, evaluation sets), and the people who run
those write OpenAI's batch format already (issue 19). A JSONL input for a text-generation model holds one request
a line, ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}``;
it runs through the same job machinery as a tensor job (``tierserve.batch.runner``: streamed input,
exactly-once per object version, a checkpoint after every part, continuation, shards), and each part is:

- **parsed** line by line: a line that is not such an object (not JSON, no string ``custom_id``, a method other
  than POST, another url, no ``body`` object) is malformed and goes to ``errors.jsonl`` with its line number; a
  body is parsed by the synchronous API's own parser (``generation.openai``) and prepared by its own service
  (``generation.service.prepare``: chat template, tokens, ``max_tokens``), so a request the API would refuse
  with a 400 gets that 400, in OpenAI's error shape, as its output line's response (as OpenAI's batch does);
  ``model`` may be left out (the job's model), and must name the job's model (and version) when given;
- **generated together**: lines with equal decoding parameters (``SamplingParams.key()``) are generated as one
  onnxruntime-genai batch (``generation.engine.generate_batch``: right-padded prompts; each row's events are
  those it would get alone, token for token, which the tests check for greedy decoding); a seeded, sampled
  line runs alone (``LoadedModel.generate``), as does a prompt holding the pad token; a group is split so that
  its KV cache at its longest row (``kv_bytes_per_token`` x (prompt + max_tokens) x rows) fits the budget;
- **answered** in the input's order, one line each, ``{"id", "custom_id", "response": {"status_code",
  "request_id", "body"}, "error": null}``, whose body is what ``generation.openai.completion_body`` renders for
  the synchronous API, except ``id`` and ``created``: the ids are hashed from the input's key, the job's name
  and the ``custom_id``, ``created`` is the input version's LastModified, so a job fanned out over shards
  writes the same bytes as one run.

Part size (pinned at the job's start, like every part size): at most ``CHUNK_ROWS`` lines, as many as the KV
cache of all of them at the model's full context fits in the memory budget (half the function's memory less
the weights), and, when the compiler measured the CPU's tokens/s, as many as generate ``default_max_tokens``
each within half the checkpoint margin even one at a time (a part must end before the margin: raise
``CHECKPOINT_MARGIN_MS`` to batch more on a slow model). ``_SUCCESS`` carries the job's token usage.

Time bound at run time (the figure may be missing, or wrong for these prompts): before each batch of a part, the
runner's ``out_of_time`` compares the invocation's remaining time, less the longest batch so far, with the checkpoint
margin; when it is short, the part is abandoned unwritten (``PartOutOfTime``) and the job continues from its last
checkpoint in a new invocation (with ``CONTINUATION_QUEUE_URL``). A part abandoned in the invocation it started first
(a whole invocation was not enough) halves the job's part size from there, saved in its checkpoint before anything
more is written, so a part rewritten after a crash keeps its bytes; a part of one line runs on. Part boundaries only
decide which file a line lands in, never its answer (batched greedy output equals batch-1's; ids and ``created``
come from the job), so a job that halved its parts, or ran in shards, writes the same lines as one run.

Where it runs: a function whose package holds onnxruntime-genai, tokenizers and jinja2. In AWS that is
BatchGenerateFunction: BatchInferenceFunction (pyarrow, tritonclient: no room left under Lambda's 250 MB) receives
every S3 event and job message and, with ``GENERATION_JOBS_QUEUE_URL`` set, hands an OpenAI batch job to that queue
as a job message (``hand_off``: inside the delivery's idempotent run, before anything is written); without it and
without the engine, ``require_engine`` refuses the job with a ConfigurationError that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from tierserve import errors
from tierserve.batch.locations import BatchInputError, S3Location, error_reason, input_format, version_pin
from tierserve.batch.parts import encode_errors
from tierserve.batch.records import Record
from tierserve.generation.requests import KIND_CHAT, KIND_COMPLETION, GenerationRequest
from tierserve.manifest import ModelVersion

if TYPE_CHECKING:
    from tierserve.app import Runtime
    from tierserve.batch.chunks import Chunk
    from tierserve.batch.spec import JobSpec
    from tierserve.generation.events import GenerationEvent

#: A job's line format: OpenAI's batch lines (a text-generation model), or tensors (every other model).
FORMAT_OPENAI = "openai"
FORMAT_TENSORS = "tensors"
FORMATS = (FORMAT_OPENAI, FORMAT_TENSORS)
#: The urls a batch line may name, and the request kind each is.
URLS = {"/v1/chat/completions": KIND_CHAT, "/v1/completions": KIND_COMPLETION}
#: The tier that answers a batch line (the batch function runs the model in process, on its CPUs).
SERVED_BY = "cpu"
#: A delivery's status when BatchInferenceFunction handed its OpenAI batch job to BatchGenerateFunction (``hand_off``).
HANDED_OFF = "handed_off"
#: The share of the function's memory the KV caches of a batch may take (the rest: weights, runtime, the part).
KV_SHARE = 0.5


class PartOutOfTime(errors.TierserveError):
    """A generation part that would run past the checkpoint margin: nothing of it is written, and the runner
    continues the job from its last checkpoint (with parts half the size when the part had a whole invocation)."""

    code = "part_out_of_time"


def job_format(asked: str | None, model: ModelVersion, key: str) -> str:
    """The job's line format: ``asked`` (a job message's ``format``) when given, else the model's: OpenAI's batch
    lines for a text-generation model, tensors for any other. A mismatch is the job's poison (a clear 400)."""
    fmt = asked or (FORMAT_OPENAI if model.generative else FORMAT_TENSORS)
    if fmt not in FORMATS:
        raise BatchInputError(f'"format" must be one of {", ".join(FORMATS)}, not {asked!r}')
    if fmt == FORMAT_OPENAI:
        if not model.generative:
            raise BatchInputError(f"model {model.name!r} is not a text-generation model, so it cannot run OpenAI "
                                  "batch lines (/v1/chat/completions, /v1/completions); send tensor lines "
                                  '{"id", "inputs"} instead')
        if input_format(key) != "jsonl":
            raise BatchInputError(f"{key!r}: OpenAI batch input is JSONL (one request a line); send a .jsonl file")
    elif model.generative:
        raise BatchInputError(f"model {model.name!r} is a text-generation model: its batch input is OpenAI's batch "
                              'format, one {"custom_id", "method": "POST", "url", "body"} a line')
    return fmt


def require_engine() -> None:
    """Batch generation runs the model in this function: without onnxruntime-genai in its package, a clear error
    before any work, never an ImportError at the first line. (BatchInferenceFunction's package, with pyarrow and
    tritonclient, has no room for it under Lambda's 250 MB: in AWS it hands these jobs to BatchGenerateFunction,
    ``hand_off``; see docs/deploy.md.)"""
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise errors.ConfigurationError(
            "batch generation needs onnxruntime-genai, tokenizers and jinja2 in this function's package, and this "
            "one has none: set GENERATION_JOBS_QUEUE_URL to BatchGenerateFunction's queue (BatchGenerateJobsQueue; "
            "template.yaml does) so that this function hands OpenAI batch jobs to BatchGenerateFunction, or run the "
            "job where they are installed (tierserve serve), or send the requests to the streaming API")


def handoff_message(spec: JobSpec, model: ModelVersion, version: dict[str, str]) -> dict[str, Any]:
    """The job message that hands ``spec``'s job to BatchGenerateFunction: everything the job needs, the input's
    version pinned (``version``: the delivery's versionId / eTag, or the object's at the hand-off), the model's
    version resolved, the output (and so the job's name) and the format explicit. The eTag is written without
    quotes (an S3 event's spelling; HeadObject quotes it), so that an S3 event and a job message naming the same
    version hand off the same body: one idempotency key there, besides one job key. A continuation (of a job that
    BatchGenerateFunction began, misrouted here or sent by hand) keeps its part number: without it the body would
    be the original hand-off's, which BatchGenerateFunction's idempotency swallows, and the job would stay
    "running"; with it BatchGenerateFunction resumes the job from its last checkpoint."""
    pin = version_pin(version.get("version_id"), version.get("etag"))
    message: dict[str, Any] = {"model": model.name, "version": model.version, "input": spec.input.uri,
                               "input_version": pin, "output": spec.output.uri, "format": FORMAT_OPENAI}
    if spec.shards:
        message["shards"] = spec.shards
    if spec.shard is not None:  # one shard of a job BatchGenerateFunction fanned out, misrouted here: that shard
        message["shard"] = spec.shard.to_json()
    if spec.continuation is not None:  # a job BatchGenerateFunction began, whose continuation came here: resume it
        message["continuation"] = spec.continuation
    return message


def hand_off(runtime: Runtime, spec: JobSpec, model: ModelVersion, fmt: str,
             version: dict[str, str]) -> dict[str, Any] | None:
    """Send an OpenAI batch job to ``GENERATION_JOBS_QUEUE_URL`` (BatchGenerateFunction's queue) instead of running
    it here; the delivery's result says so. None (run it here) for a tensor job, or when the setting is unset
    (BatchGenerateFunction itself). A shard or a continuation of an OpenAI job (misrouted here) is handed off as
    that shard or continuation. Called by the runner inside the delivery's
    idempotent run, before anything is written: a redelivery gets this result back and sends nothing again."""
    url = runtime.settings.generation_jobs_queue_url
    if fmt != FORMAT_OPENAI or not url:
        return None
    message = handoff_message(spec, model, version)
    try:
        sent = runtime.aws("sqs").send_message(QueueUrl=url, MessageBody=json.dumps(message, sort_keys=True))
    except Exception as exc:  # the delivery fails and is retried (its idempotency record is released)
        raise errors.BackendUnavailableError(f"GENERATION_JOBS_QUEUE_URL {url} refused the job's hand-off "
                                             f"({error_reason(exc)}); this delivery will be retried",
                                             retry_after_s=30) from exc
    return {"status": HANDED_OFF, "job": spec.output.key.rsplit("/", 1)[-1], "output": spec.output.uri,
            "model": model.name, "version": model.version, "queue": url, "message_id": sent.get("MessageId", "")}


def budget_bytes(model: ModelVersion, memory_mb: int) -> int:
    """The bytes a batch's KV cache may take: ``KV_SHARE`` of the function's memory less the weights."""
    variant = model.cpu_artifact if model.serves_cpu else model.variants.get(model.selected_variant)
    weights = sum(f.size_bytes for f in variant.files()) if variant is not None else 0
    return max(0, int(memory_mb * (1 << 20) * KV_SHARE) - weights)


def kv_per_token(runtime: Runtime, model: ModelVersion) -> int:
    """The KV cache's bytes per token: the manifest's figure, else from the model folder's ``genai_config.json``."""
    from tierserve.generation.kv import kv_bytes_per_token
    from tierserve.generation.service import folder_of

    spec = model.generation
    if spec is not None and spec.kv_bytes_per_token > 0:
        return spec.kv_bytes_per_token
    return kv_bytes_per_token(model, folder_of(runtime, model))


def part_rows(runtime: Runtime, model: ModelVersion) -> int:
    """Lines per part of a generation job (pinned at its start): ``CHUNK_ROWS``, bounded by the KV cache of them
    all at the full context within the budget, and by the time to generate them within half the margin."""
    settings = runtime.settings
    spec = model.generation
    assert spec is not None
    rows = max(1, int(settings.chunk_rows))
    per_token = kv_per_token(runtime, model)
    if per_token > 0:
        rows = min(rows, max(1, budget_bytes(model, settings.memory_mb) // (per_token * spec.context_length)))
    figures = spec.tiers.get("cpu")
    if figures is not None and figures.tokens_per_s > 0:
        seconds = settings.checkpoint_margin_ms / 2000
        rows = min(rows, max(1, int(seconds * figures.tokens_per_s / max(1, spec.default_max_tokens))))
    return rows


def created_of(s3: Any, loc: S3Location, version: dict[str, str]) -> int:
    """``created`` of every answer of the job: the input version's LastModified (the same for every shard)."""
    kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key}
    if version.get("version_id") and version["version_id"] != "null":
        kwargs["VersionId"] = version["version_id"]
    try:
        head = s3.head_object(**kwargs)
    except Exception as exc:
        raise BatchInputError(f"cannot read {loc.uri} ({error_reason(exc)}); check that the object exists") from exc
    etag = version.get("etag")  # compared here: an S3 event's eTag has no quotes, which If-Match refuses
    if etag and "VersionId" not in kwargs and str(head.get("ETag", "")).strip('"') != etag.strip('"'):
        raise BatchInputError(f"{loc.uri} was replaced during the job (etag {head.get('ETag')} != {etag}); the newer "
                              "object has its own event")
    return int(head["LastModified"].timestamp())


def line_ids(input_key: str, job: str, custom_id: str) -> tuple[str, str]:
    """(the output line's id, the hex its body's id is made of), from the job and the custom_id only."""
    digest = hashlib.sha256(f"{input_key}\n{job}\n{custom_id}".encode()).hexdigest()
    return f"batch_req_{digest[32:]}", digest[:32]


@dataclass
class Line:
    """One input line of a part: malformed (``error``), answered without generating (``response``: a 400), or
    waiting for its generation (``request``, prepared)."""

    line: int
    custom_id: Any = None
    error: str | None = None
    request: GenerationRequest | None = None
    response: tuple[int, dict[str, Any]] | None = None
    events: list[GenerationEvent] = field(default_factory=list)


def parse_line(raw: bytes, line: int) -> tuple[Line, dict[str, Any] | None, str | None]:
    """An input line's envelope: (the line, its body, its kind), or the line with its ``error`` when malformed."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return Line(line, error=f"not valid JSON: {exc}"), None, None
    form = ('each line is {"custom_id": "...", "method": "POST", "url": "/v1/chat/completions" or '
            '"/v1/completions", "body": {...}}')
    if not isinstance(obj, dict):
        return Line(line, error=f"not a JSON object: {form}"), None, None
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Line(line, custom_id, error=f"custom_id must be a non-empty string; {form}"), None, None
    if obj.get("method") != "POST":
        return Line(line, custom_id, error=f"method must be \"POST\", not {obj.get('method')!r}; {form}"), None, None
    kind = URLS.get(obj.get("url"))  # type: ignore[arg-type]
    if kind is None:
        return Line(line, custom_id, error=f"url must be one of {', '.join(URLS)} for a text-generation model, not "
                                           f"{obj.get('url')!r}"), None, None
    body = obj.get("body")
    if not isinstance(body, dict):
        return Line(line, custom_id, error=f"body must be the request's JSON object; {form}"), None, None
    return Line(line, custom_id), body, kind


class GenerationPart:
    """Parts of one generation job in this invocation: the model loaded once, each part parsed, generated in
    batches and written by the runner (``write``)."""

    def __init__(self, runtime: Runtime, model: ModelVersion, input_loc: S3Location, output_key: str,
                 version: dict[str, str], s3: Any) -> None:
        from tierserve.generation import engine, service

        require_engine()
        self.runtime, self.model = runtime, model
        self.spec = service.spec_of(model)
        self.input_key = input_loc.key
        self.job = output_key.rsplit("/", 1)[-1]
        self.created = created_of(s3, input_loc, version)
        self.folder = service.folder_of(runtime, model)
        self.loaded = engine.load(self.folder, service.threads_for(runtime))
        self.pad = engine.pad_token_id(self.folder)
        self.kv_per_token = kv_per_token(runtime, model)
        self.budget = budget_bytes(model, runtime.settings.memory_mb)
        #: generations run together in the last part: (rows, greedy) per batch, for tests and logs
        self.batches: list[tuple[int, bool]] = []
        #: set by the runner: out_of_time(seconds the next batch may take) says whether starting it would run past the
        #: checkpoint margin; the part is then abandoned unwritten (``PartOutOfTime``)
        self.out_of_time: Callable[[float], bool] | None = None
        self.longest_batch_s = 0.0  # the longest batch in this invocation: the next one's estimate

    # --- one part ---------------------------------------------------------------------------------------------

    def run(self, raws: list[bytes], first_line: int) -> tuple[bytes, list[Record], dict[str, int]]:
        """A part: (its output lines, its malformed lines, its counts)."""
        lines: list[Line] = []
        blank = 0
        for i, raw in enumerate(raws):
            if not raw.strip():
                blank += 1
                continue
            lines.append(self.prepare(raw, first_line + i))
        self.generate([ln for ln in lines if ln.request is not None])
        out: list[bytes] = []
        counts = {"ok": 0, "failed": 0, "blank": blank, "prompt_tokens": 0, "completion_tokens": 0}
        for ln in lines:
            if ln.error is not None:
                continue
            out.append(self.answer(ln, counts))
        bad = [Record(ln.line, 0, ln.custom_id, error=ln.error) for ln in lines if ln.error is not None]
        return (b"\n".join(out) + b"\n") if out else b"", bad, counts

    def prepare(self, raw: bytes, line: int) -> Line:
        """The line parsed and prepared as the synchronous API would (its 400 as its response)."""
        from tierserve.generation import openai, service
        from tierserve.protocol.rendering import render_error

        ln, body, kind = parse_line(raw, line)
        if body is None:
            return ln
        _, hexid = line_ids(self.input_key, self.job, ln.custom_id)
        try:
            if body.get("model") is None:
                body = {**body, "model": self.model.name}
            request = openai.parse_chat(body, hexid) if kind == KIND_CHAT else openai.parse_completion(body, hexid)
            if request.stream:
                raise errors.InvalidParameterError("stream is not supported in a batch: each line gets its whole "
                                                   "answer in the output file; leave stream out", param="stream",
                                                   code="unsupported_parameter")
            if request.model != self.model.name or request.version not in (None, self.model.version):
                raise errors.InvalidParameterError(
                    f"this batch job runs model {self.model.name!r} version {self.model.version}; the line asks for "
                    f"{openai.model_label(request)!r}: every line of a job names the job's model (or leaves it out)",
                    param="model", code="model_mismatch")
            ln.request = service.prepare(self.runtime, self.model, request)
        except errors.InvalidRequestError as exc:
            answer = render_error(exc, "openai")
            ln.response = (answer.status, answer.document)
        return ln

    def generate(self, lines: list[Line]) -> None:
        """Every line's events: lines with equal decoding parameters together, in batches within the budget."""
        self.batches = []
        groups: dict[Any, list[Line]] = {}
        for ln in lines:
            assert ln.request is not None
            params = ln.request.params
            alone = (not params.greedy and params.seed is not None) or (
                self.pad is not None and self.pad in (ln.request.prompt_ids or ()))
            groups.setdefault(("alone", ln.line) if alone else params.key(), []).append(ln)
        for group in groups.values():
            group.sort(key=lambda x: len(x.request.prompt_ids or ()))  # type: ignore[union-attr]
            for batch in self.split(group):
                if self.out_of_time is not None and self.out_of_time(self.longest_batch_s):
                    raise PartOutOfTime("the part would outlast the checkpoint margin; it is left unwritten")
                t0 = time.perf_counter()
                self.run_batch(batch)
                self.longest_batch_s = max(self.longest_batch_s, time.perf_counter() - t0)

    def split(self, group: list[Line]) -> list[list[Line]]:
        """Consecutive runs of ``group`` whose KV cache at their longest row fits the budget (one row at least)."""
        if self.kv_per_token <= 0:
            return [group]
        batches: list[list[Line]] = []
        current: list[Line] = []
        longest = 0
        for ln in group:
            req = ln.request
            assert req is not None and req.prompt_ids is not None and req.params.max_tokens is not None
            length = len(req.prompt_ids) + req.params.max_tokens
            grown = max(longest, length)
            if current and grown * self.kv_per_token * (len(current) + 1) > self.budget:
                batches.append(current)
                current, grown = [], length
            current.append(ln)
            longest = grown
        if current:
            batches.append(current)
        return batches

    def run_batch(self, batch: list[Line]) -> None:
        from tierserve.generation import engine

        reqs = [ln.request for ln in batch]
        assert all(r is not None and r.prompt_ids is not None and r.params.max_tokens is not None for r in reqs)
        params = reqs[0].params  # type: ignore[union-attr]
        self.batches.append((len(batch), params.greedy))
        if len(batch) == 1:
            r = reqs[0]
            assert r is not None and r.prompt_ids is not None and r.params.max_tokens is not None
            batch[0].events = list(self.loaded.generate(r.prompt_ids, r.params, self.spec.eos_token_ids,
                                                        r.params.max_tokens, served_by=SERVED_BY))
            return
        results = engine.generate_batch(self.loaded, [r.prompt_ids for r in reqs],  # type: ignore[union-attr,misc]
                                        params, self.spec.eos_token_ids,
                                        [r.params.max_tokens for r in reqs],  # type: ignore[union-attr,misc]
                                        served_by=SERVED_BY)
        for ln, events in zip(batch, results, strict=True):
            ln.events = events

    def answer(self, ln: Line, counts: dict[str, int]) -> bytes:
        """The line's output line: the synchronous API's body (or its 400), in OpenAI's batch output shape."""
        from tierserve.generation import openai

        line_id, hexid = line_ids(self.input_key, self.job, ln.custom_id)
        if ln.response is not None:
            status, body = ln.response
            counts["failed"] += 1
        else:
            assert ln.request is not None
            status, body = 200, openai.completion_body(ln.request, ln.events, created=self.created)
            usage = body["usage"]
            counts["prompt_tokens"] += int(usage["prompt_tokens"])
            counts["completion_tokens"] += int(usage["completion_tokens"])
        counts["ok"] += 1
        return orjson.dumps({"id": line_id, "custom_id": ln.custom_id,
                             "response": {"status_code": status, "request_id": f"req_{hexid}", "body": body},
                             "error": None})


def write_part(part: GenerationPart, chunk: Chunk, state: Any, put: Callable[[str, bytes], None],
               part_key: str, errors_key: str) -> None:
    """The runner's part of a generation job: generate ``chunk``'s lines, queue its objects (``put``: written with
    the part's checkpoint) and advance ``state`` (a ``JobState``)."""
    raws, first_line = getattr(chunk, "raws", None), getattr(chunk, "first_line", None)
    if raws is None or first_line is None:
        raise BatchInputError("OpenAI batch input is JSONL; this job's reader gave no lines")
    t0 = time.perf_counter()
    body, bad, counts = part.run(raws, first_line)
    state.infer_s += time.perf_counter() - t0
    if bad:
        put(errors_key, encode_errors(bad))
    put(part_key, body)
    state.next_part += 1
    state.next_offset = chunk.end
    state.next_line = chunk.next_line
    state.lines += len(chunk)
    state.lines_ok += counts["ok"]
    state.rows_ok += counts["ok"] - counts["failed"]
    state.lines_error += len(bad)
    state.lines_blank += counts["blank"]
    state.requests_failed += counts["failed"]
    state.prompt_tokens += counts["prompt_tokens"]
    state.completion_tokens += counts["completion_tokens"]


def usage_of(figures: dict[str, Any]) -> dict[str, int]:
    """``_SUCCESS``'s usage of a generation job from its counters."""
    prompt, completion = int(figures.get("prompt_tokens") or 0), int(figures.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

