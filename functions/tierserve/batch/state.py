"""Job state in the JobTable (partition key ``id``, TTL attribute ``expiration``).

One item per job, ``id = "job#<sha256 of the job key>"``, beside Powertools' idempotency
records (whose ids never start with ``job#``). A checkpoint is a conditional put: it only
succeeds when the stored ``next_part`` is the one this runner started from, so two runners
of the same job can never interleave their checkpoints.

Why: a job outlives the invocation that runs it (crashes, timeouts, redeliveries, continuations); what it
has done must live outside the function, and two runners of one job must never both advance it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tierserve.dynamo import from_dynamo, to_dynamo
from tierserve.errors import BackendUnavailableError, ConfigurationError

JOB_TTL_S = 30 * 86_400


class JobConflictError(BackendUnavailableError):
    """Another invocation checkpointed the same job first; retry later (SQS does)."""

    code = "job_conflict"


@dataclass
class JobState:
    job_key: str
    status: str = "running"  # running | sharded | completed
    model: str = ""
    version: str = ""
    variant_sha256: str = ""
    input_version: dict[str, str] = field(default_factory=dict)
    input_size: int = 0
    next_part: int = 0
    next_offset: int = 0  # JSONL: byte offset; NPZ: row index
    next_line: int = 1
    chunk_rows: int = 0  # pinned at the job's start: part boundaries never move
    lines: int = 0  # input lines (records) consumed
    lines_ok: int = 0  # output lines written
    rows_ok: int = 0  # tensor rows scored
    lines_error: int = 0
    lines_blank: int = 0
    invocations: int = 0
    read_s: float = 0.0
    infer_s: float = 0.0
    write_s: float = 0.0
    started_at: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    # A job that fanned out (status "sharded", tierserve.batch.shards): its plan, one [start, stop, line] a
    # shard, and the parts its shards wrote. The counters above are the finished shards' sums; the set of
    # finished shards (``done_shards``) and the shard closing the job (``closer``) live in the item beside them.
    shards: int = 0
    shard_plan: list[list[int]] = field(default_factory=list)
    parts: int = 0
    # The job's line format (pinned at its start; ``tierserve.batch.generate``): "tensors", or "openai" for a
    # text-generation model's OpenAI batch lines, whose token usage and 400-answered lines are counted here.
    format: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests_failed: int = 0

    @property
    def item_id(self) -> str:
        return job_item_id(self.job_key)


def job_item_id(job_key: str) -> str:
    return "job#" + hashlib.sha256(job_key.encode()).hexdigest()


class JobStore:
    def __init__(self, table_name: str, dynamodb: Any = None) -> None:
        if not table_name:
            raise ConfigurationError("JOB_TABLE is not set: batch jobs need the JobTable for idempotency and "
                                     "job state (template.yaml sets it; locally, create a table with key 'id')")
        if dynamodb is None:
            from tierserve import aws

            dynamodb = aws.resource("dynamodb")
        self.table = dynamodb.Table(table_name)

    def load(self, job_key: str) -> JobState | None:
        item = self.table.get_item(Key={"id": job_item_id(job_key)}, ConsistentRead=True).get("Item")
        if item is None:
            return None
        data = from_dynamo(item)
        known = set(JobState.__dataclass_fields__)
        return JobState(**{k: v for k, v in data.items() if k in known})

    def save(self, state: JobState, expected_next_part: int | None) -> None:
        """Write ``state``; ``expected_next_part`` None: the item must not exist yet."""
        from botocore.exceptions import ClientError

        item = to_dynamo(asdict(state))
        item["id"] = state.item_id
        item["expiration"] = int(time.time()) + JOB_TTL_S
        if expected_next_part is None:
            cond: dict[str, Any] = {"ConditionExpression": "attribute_not_exists(id)"}
        else:
            cond = {"ConditionExpression": "next_part = :p AND #s = :running",
                    "ExpressionAttributeValues": {":p": expected_next_part, ":running": "running"},
                    "ExpressionAttributeNames": {"#s": "status"}}
        try:
            self.table.put_item(Item=item, **cond)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise JobConflictError(f"job {state.job_key!r} was advanced by another invocation; "
                                       "this delivery will be retried", retry_after_s=30) from exc
            raise
