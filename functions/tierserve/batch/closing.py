"""How a batch job ends: errors merged in the input's order, ``_SUCCESS`` written last and once, the state.

Why: the end of a job is where a crash costs the most (a half-merged ``errors.jsonl``, a second
``_SUCCESS``, a shard counted twice or never), and each step must be safe to run again by the same
message's redelivery. A job that ran in one function ends in ``Closing.finish``; a shard ends in
``Closing.finish_shard``: its own state says "completed" first, then it is counted in the job's item
(``tierserve.batch.shards.shard_done``, once), and the shard that completes the set closes the whole job
(``Closing.close_job``). Per-part error fragments wait under ``batch/work/`` until then, so the output
folder only ever holds final files.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

from tierserve import telemetry
from tierserve.batch.locations import WORK_PREFIX
from tierserve.batch.shards import shard_done
from tierserve.batch.spec import JobSpec
from tierserve.batch.state import JobState, JobStore, job_item_id
from tierserve.dynamo import to_dynamo
from tierserve.observability import logger


def work_prefix(spec: JobSpec, state: JobState) -> str:
    """Where a job's error fragments wait: a shard's under the whole job's prefix, so that the closing shard
    merges every shard's errors in the input's order."""
    if spec.shard is None:
        return f"{WORK_PREFIX}{state.item_id[4:36]}"
    return f"{WORK_PREFIX}{job_item_id(spec.parent_key)[4:36]}/s{spec.shard.index:05d}"


class Closing:
    """The end of one job (or shard) run: ``state`` is the runner's own, updated in place."""

    def __init__(self, s3: Any, jobs: JobStore, spec: JobSpec, state: JobState) -> None:
        self.s3, self.jobs, self.spec, self.state, self.shard = s3, jobs, spec, state, spec.shard
        self.work_prefix = work_prefix(spec, state)

    def finish(self, expected: int) -> dict[str, Any]:
        """A whole job: errors merged, ``_SUCCESS``, then the state "completed" (over part ``expected``)."""
        if self.shard is not None:
            return self.finish_shard(expected)
        st = self.state
        out = self.spec.output
        t0 = time.perf_counter()
        self.merge_errors()
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
        _generation_summary(summary, st.format, vars(st))
        self.s3.put_object(Bucket=out.bucket, Key=f"{out.key}/_SUCCESS",
                           Body=(json.dumps(summary, indent=2, sort_keys=True) + "\n").encode(),
                           ContentType="application/json")
        st.status, st.summary = "completed", summary
        self.jobs.save(st, expected)
        self.delete_work()
        telemetry.batch_job(st.model, st.version, rows=st.rows_ok, errors=st.lines_error,
                            seconds=time.time() - st.started_at)
        logger.info("batch job completed", extra={"job": st.job_key, "counts": summary["counts"]})
        return summary

    def finish_shard(self, expected: int) -> dict[str, Any]:
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
        _generation_summary(st.summary, st.format, vars(st))
        self.jobs.save(st, expected)
        return self.complete_shard()

    def complete_shard(self) -> dict[str, Any]:
        """Count this (completed) shard in the job's item; the shard that completes the set closes the job.
        Idempotent: a redelivery after a crash anywhere here runs it again."""
        st, shard = self.state, self.shard
        assert shard is not None
        figures = {"lines": st.lines, "lines_ok": st.lines_ok, "rows_ok": st.rows_ok, "lines_error": st.lines_error,
                   "lines_blank": st.lines_blank, "invocations": st.invocations, "parts": st.next_part,
                   "read_s": round(st.read_s, 6), "infer_s": round(st.infer_s, 6), "write_s": round(st.write_s, 6),
                   "prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
                   "requests_failed": st.requests_failed}
        closes, parent = shard_done(self.jobs.table, job_item_id(self.spec.parent_key), shard, figures)
        logger.info("batch shard completed", extra={"job": self.spec.parent_key, "shard": shard.index,
                                                     "closes_job": closes})
        if closes:
            self.close_job(parent)
        return dict(st.summary)

    def close_job(self, parent: dict[str, Any]) -> None:
        """Every shard is in: errors merged in the input's order, then _SUCCESS (once), then the job's item."""
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
        _generation_summary(summary, str(parent.get("format") or ""), parent)
        self.work_prefix = f"{WORK_PREFIX}{job_item_id(self.spec.parent_key)[4:36]}"  # every shard's fragments
        key = f"{out.key}/_SUCCESS"
        # Each step can be run again by the closer's redelivery: once _SUCCESS exists, errors.jsonl (written
        # before it) is final and the fragments may already be gone, so neither is touched again.
        if not self.exists(key):
            self.merge_errors()  # s00000/errors-00000 ... sort in the input's order
            self.put_once(key, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        self.delete_work()
        self.jobs.table.update_item(Key={"id": job_item_id(self.spec.parent_key)},
                                    UpdateExpression="SET #s = :done, summary = :summary",
                                    ExpressionAttributeNames={"#s": "status"},
                                    ExpressionAttributeValues={":done": "completed", ":summary": to_dynamo(summary)})
        telemetry.batch_job(parent["model"], parent["version"], rows=counts["rows"], errors=counts["errors"],
                            seconds=wall)
        logger.info("batch job completed", extra={"job": self.spec.parent_key, "counts": counts,
                                                  "shards": summary["shards"]})

    def put_once(self, key: str, body: bytes) -> None:
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

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=self.spec.output.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def work_keys(self) -> list[str]:
        keys: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.spec.output.bucket,
                                                                      Prefix=self.work_prefix + "/"):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)

    def merge_errors(self) -> None:
        out = self.spec.output
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as f:
            for key in self.work_keys():
                body = self.s3.get_object(Bucket=out.bucket, Key=key)["Body"]
                while block := body.read(1 << 20):
                    f.write(block)
            f.seek(0)
            self.s3.upload_fileobj(f, out.bucket, f"{out.key}/errors.jsonl",
                                   ExtraArgs={"ContentType": "application/x-ndjson"})

    def delete_work(self) -> None:
        keys = self.work_keys()
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=self.spec.output.bucket,
                                   Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})


def _generation_summary(summary: dict[str, Any], fmt: str, figures: dict[str, Any]) -> None:
    """A generation job's ``_SUCCESS`` (``tierserve.batch.generate``): its format, token usage and the lines
    answered with a 400 (counted among ``output_lines``)."""
    if fmt != "openai":
        return
    from tierserve.batch.generate import usage_of

    summary["format"] = fmt
    summary["usage"] = usage_of(figures)
    summary["counts"]["failed_requests"] = int(figures.get("requests_failed") or 0)
