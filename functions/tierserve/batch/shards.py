"""Batch jobs that fan out: a large input split into shards that run as concurrent invocations.

Why: one function at a time, with continuations, takes a day over 50 GB. Lambda scales an SQS event
source to many concurrent invocations, so a large job is cut into shards, each sent to the jobs queue as
its own job message and scored by whichever invocation receives it:

* **planning** (``plan``): a JSONL input splits into byte ranges aligned to line starts (the object is
  read once, in up to ``PLAN_STREAMS`` ranged GETs at a time, to count the lines before each boundary,
  so that every output line keeps its input line number); an NPZ or Parquet input splits into row ranges
  (the row count comes from the zip's central directory and the ``.npy`` header, or from Parquet's
  footer: ranged reads of a few KB, never the whole object). ``SHARD_BYTES`` / ``SHARD_ROWS`` decide how
  many, or a job message asks for ``"shards": N``; at most ``MAX_SHARDS``. The plan is stored in the
  job's item, so that a redelivered job message sends exactly the same shards again.
* **processing**: a shard is a job of its own (its own state, checkpoints, continuations and idempotency
  record), reading only its range and writing ``part-SSSSS-PPPPP.*`` (shard, part), so that the output's
  parts list in the input's order whoever ran them. A shard message that does not match its job's stored
  plan is refused as poison.
* **completion** (``shard_done``): the job's item holds the set of finished shards and the job's counters.
  One conditional update adds a shard to the set *and* its counts to the counters (a shard already in the
  set is never counted twice; a refusal whose item does not hold the shard is retried, never taken as
  counted). This relies on DynamoDB applying an UpdateItem atomically; moto does not, so ``tierserve serve``
  runs moto's DynamoDB requests one at a time (``tierserve_tools.moto_ext``: issue 16, defect 9).
  When the set is complete, one shard claims the closing (``closer``) and
  closes the job: errors merged in the input's order, then ``_SUCCESS`` (written once), then the item's
  status. A crash anywhere in between is retried by that shard's own redelivery: its state says
  "completed", so it runs the completion step again, which is idempotent.
* **failures**: a shard fails alone (its SQS message returns after the visibility timeout and goes to the
  DLQ after five receives); the other shards are unaffected, and the job closes when the last is in.

Item size: the job's item holds the plan (three numbers a shard), the set of finished shards and fixed
counters, never per-shard summaries: at ``MAX_SHARDS`` it stays near 40 KB, a tenth of DynamoDB's 400 KB
(``tests/unit/batch/test_shards.py`` checks the worst case). Each shard's own figures stay in its
own item.
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from tierserve.batch.locations import BatchInputError, S3Location, get_body, input_format, parquet_needs_pyarrow
from tierserve.batch.state import JobConflictError
from tierserve.dynamo import from_dynamo, to_dynamo

#: The most shards one job is cut into (the job's item holds the plan and the set of finished shards).
MAX_SHARDS = 1000
#: Concurrent ranged GETs while a JSONL input is planned.
PLAN_STREAMS = 16
#: The job's counters that every finished shard adds its own figures to (JobState fields).
COUNTERS = ("lines", "lines_ok", "rows_ok", "lines_error", "lines_blank", "invocations", "parts",
            "read_s", "infer_s", "write_s", "prompt_tokens", "completion_tokens", "requests_failed")
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    start: int  # JSONL: byte offset of its first line; NPZ / Parquet: first row
    stop: int  # exclusive
    line: int = 1  # JSONL: the input line number of its first line; NPZ / Parquet: start + 1

    def to_json(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count, "start": self.start, "stop": self.stop, "line": self.line}

    def bounds(self) -> list[int]:
        """What the job's item stores for this shard (its plan entry)."""
        return [self.start, self.stop, self.line]

    @classmethod
    def from_json(cls, d: Any) -> Shard:
        form = ('"shard" must be {"index", "count", "start", "stop", "line"} (whole numbers) as the job\'s '
                "fan-out wrote it; to split a job yourself, send the whole job with \"shards\": N instead")
        if not isinstance(d, dict) or any(not isinstance(d.get(k), int) or isinstance(d.get(k), bool)
                                          for k in ("index", "count", "start", "stop", "line")):
            raise BatchInputError(f"{form}, not {d!r}")
        s = cls(d["index"], d["count"], d["start"], d["stop"], d["line"])
        if not (0 <= s.index < s.count <= MAX_SHARDS and 0 <= s.start < s.stop and s.line >= 1):
            raise BatchInputError(f"shard {d!r} is out of range: 0 <= index < count <= {MAX_SHARDS}, "
                                  "0 <= start < stop, line >= 1")
        return s


def shard_count(size: int, per_shard: int, requested: int | None) -> int:
    """How many shards: the job message's ``shards``, else one per ``per_shard`` bytes or rows."""
    if requested:
        return max(1, min(MAX_SHARDS, requested))
    return max(1, min(MAX_SHARDS, math.ceil(size / per_shard)))


def plan(s3: Any, loc: S3Location, version: dict[str, str], size: int, model: Any, shard_bytes: int,
         shard_rows: int, requested: int | None) -> list[Shard]:
    """The shards of an input (a single shard: the job does not fan out)."""
    fmt = input_format(loc.key)
    if fmt == "jsonl":
        n = shard_count(size, shard_bytes, requested)
        return plan_jsonl(s3, loc, version, size, n) if n > 1 and size > 0 else [Shard(0, 1, 0, max(size, 1))]
    rows = count_rows(s3, loc, version, fmt, model, size)
    n = shard_count(rows, shard_rows, requested)
    bounds = [rows * k // n for k in range(n + 1)]
    ranges = [(a, b) for a, b in pairwise(bounds) if b > a] or [(0, 1)]
    return [Shard(i, len(ranges), a, b, a + 1) for i, (a, b) in enumerate(ranges)]


def plan_jsonl(s3: Any, loc: S3Location, version: dict[str, str], size: int, n: int) -> list[Shard]:
    """Byte ranges of about ``size / n`` bytes, each starting at a line start, with its first line number.

    The object is cut at ``size * k // n`` into ``n`` pieces read concurrently (ranged GETs): each piece
    yields its newline count and its first newline at or after the byte before its cut. Shard ``k`` starts
    just after that newline (the first line that starts at or after the cut; a line longer than a piece
    merges shards), and its first line number is one more than the newlines before it."""
    cuts = [size * k // n for k in range(n + 1)]

    def piece(k: int) -> tuple[int, int | None]:
        lo, hi = cuts[k], cuts[k + 1]
        first: int | None = None
        count = 0
        pos = max(lo - 1, 0)
        if hi <= pos:
            return 0, None
        body = get_body(s3, loc, version, pos, hi)
        try:
            while block := body.read(_BLOCK):
                if first is None and (j := block.find(b"\n")) >= 0:
                    first = pos + j
                skip = max(lo - pos, 0)  # the byte before the cut is not this piece's
                count += block.count(b"\n", skip)
                pos += len(block)
        finally:
            body.close()
        return count, first

    with ThreadPoolExecutor(max_workers=min(PLAN_STREAMS, n)) as pool:
        pieces = list(pool.map(piece, range(n)))
    starts: list[tuple[int, int]] = [(0, 1)]  # (offset of a shard's first line, its line number)
    before = [0]  # newlines before cuts[k]
    for count, _ in pieces:
        before.append(before[-1] + count)
    for k in range(1, n):
        # the first line start at or after cuts[k]: just after the first newline at or after cuts[k] - 1,
        # in this piece or (a line longer than the piece) a later one
        j = next((m for m in range(k, n) if pieces[m][1] is not None), None)
        if j is None:
            break
        nl = pieces[j][1]
        assert nl is not None
        offset, line = nl + 1, 1 + before[j] + (1 if nl >= cuts[j] else 0)
        if offset < size and offset > starts[-1][0]:
            starts.append((offset, line))
    bounds = [*starts, (size, 0)]
    return [Shard(i, len(starts), a[0], b[0], a[1]) for i, (a, b) in enumerate(pairwise(bounds))]


class _S3Range(io.RawIOBase):
    """A seekable, read-only file over the pinned version of an S3 object: each read is a ranged GET.

    Wrapped in a ``BufferedReader``, it lets zipfile and pyarrow read an archive's directory or a Parquet
    footer without downloading the object."""

    def __init__(self, s3: Any, loc: S3Location, version: dict[str, str], size: int) -> None:
        self.s3, self.loc, self.version, self.size, self.pos = s3, loc, version, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        body = get_body(self.s3, self.loc, self.version, self.pos, self.pos + n)
        try:
            data = body.read()
        finally:
            body.close()
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def count_rows(s3: Any, loc: S3Location, version: dict[str, str], fmt: str, model: Any, size: int) -> int:
    """Rows of an NPZ (its first input's first dimension, from the ``.npy`` header) or of a Parquet file
    (its footer's metadata), read with a few ranged GETs."""
    f = io.BufferedReader(_S3Range(s3, loc, version, size), buffer_size=1 << 16)
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise parquet_needs_pyarrow(loc.uri) from exc
        try:
            return int(pq.ParquetFile(f).metadata.num_rows)
        except BatchInputError:
            raise
        except Exception as exc:  # pyarrow raises ArrowInvalid (a ValueError) and OSError subclasses
            raise BatchInputError(f"{loc.uri} is not a readable Parquet file ({exc})") from exc
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(f) as zf:
            names = [s.name for s in model.inputs]
            member = next((f"{n}.npy" for n in names if f"{n}.npy" in zf.namelist()), None)
            if member is None:
                raise BatchInputError(f"{loc.uri} has no array {names[0]!r}; model {model.name!r} takes "
                                      f"{', '.join(names)}")
            with zf.open(member) as m:
                major, _ = np.lib.format.read_magic(m)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else \
                    np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(m)
    except BatchInputError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise BatchInputError(f"{loc.uri} is not a readable .npz archive ({exc})") from exc
    if not shape:
        raise BatchInputError(f"{loc.uri}: array {member[:-4]!r} is a scalar; arrays need a row dimension")
    return int(shape[0])


# --- completion ------------------------------------------------------------------------------------


def shard_done(table: Any, parent_id: str, shard: Shard, figures: dict[str, float]) -> tuple[bool, dict[str, Any]]:
    """Count ``shard`` in the job's item (once: its figures are added with it, in one conditional update).

    Returns (whether this call must close the job, the job's item). Closing falls to the one shard that
    claims it (``closer``); the same shard, redelivered after a crash, claims it again."""
    from botocore.exceptions import ClientError


    names = {f"#{k}": k for k in COUNTERS}
    values = {f":{k}": to_dynamo(figures.get(k, 0)) for k in COUNTERS}  # a counter left out adds nothing
    try:
        item = table.update_item(
            Key={"id": parent_id},
            UpdateExpression="ADD done_shards :i, " + ", ".join(f"#{k} :{k}" for k in COUNTERS),
            ConditionExpression="attribute_exists(id) AND NOT contains(done_shards, :n)",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={":i": {shard.index}, ":n": shard.index, **values},
            ReturnValues="ALL_NEW")["Attributes"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
            raise
        item = table.get_item(Key={"id": parent_id}, ConsistentRead=True).get("Item")
        if item is None:
            raise BatchInputError(f"shard {shard.index} finished, but its job's item {parent_id} is gone (expired?); "
                                  "send the whole job again") from None
        if shard.index not in {int(i) for i in item.get("done_shards") or ()}:
            # refused, yet not counted: never take it as "already counted" (its lines would be lost)
            raise JobConflictError(f"shard {shard.index}'s count was refused, but the job's item {parent_id} does "
                                   "not hold it; this delivery will be retried", retry_after_s=30) from None
    data = from_dynamo(item)
    complete = len(data.get("done_shards") or ()) >= int(data.get("shards") or 0) > 0
    if not complete or data.get("status") == "completed":
        return False, data
    try:
        table.update_item(Key={"id": parent_id}, UpdateExpression="SET closer = :i",
                          ConditionExpression="attribute_not_exists(closer) OR closer = :i",
                          ExpressionAttributeValues={":i": shard.index})
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
            raise
        return False, data
    return True, data
