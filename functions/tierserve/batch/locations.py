"""Where a batch job's input and output live: S3 URIs, the ``batch/in|out|work/`` key layout, the formats.

Why: every other batch module (the readers, the job spec, the planner of shards, the closing) names S3
objects and refuses bad ones the same way; the rules for a bucket, a key, a job's name and the input
formats are written once here, with ``BatchInputError``, the error that makes a message poison, and so is
the one read of an input object pinned to the version seen at the job's start (``get_body``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tierserve.errors import InvalidNameError, InvalidRequestError
from tierserve.manifest import check_model_name
from tierserve.store import check_s3_key

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
#: A job's name: the input object's file name without its extension.
JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
INPUT_PREFIX = "batch/in/"
OUTPUT_PREFIX = "batch/out/"
WORK_PREFIX = "batch/work/"
FORMATS = (".jsonl", ".npz", ".parquet")


class BatchInputError(InvalidRequestError):
    """A batch input (event, job message or object) cannot be processed; the message is poison."""

    code = "batch_input_error"


def parquet_needs_pyarrow(uri: str) -> BatchInputError:
    """The error for a Parquet input in a package without pyarrow (BatchGenerateFunction's: OpenAI batch lines
    only), raised where pyarrow is first imported instead of an ImportError."""
    return BatchInputError(f"{uri}: reading Parquet needs pyarrow, which this function's package does not hold "
                           "(BatchGenerateFunction runs OpenAI batch lines only): send the job to BatchJobsQueue "
                           "(BatchInferenceFunction, functions/requirements-batch.txt), or send .jsonl / .npz")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def check_bucket(bucket: str) -> str:
    if not isinstance(bucket, str) or not BUCKET_RE.fullmatch(bucket):
        raise InvalidNameError(f"bucket {bucket!r} is not a valid S3 bucket name")
    return bucket


def parse_s3_uri(uri: Any, what: str) -> S3Location:
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise BatchInputError(f"{what} must be an s3://bucket/key URI, got {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    key = key.rstrip("/") if what == "output" else key
    return S3Location(check_bucket(bucket), check_s3_key(key))


def input_format(key: str) -> str:
    for ext in FORMATS:
        if key.endswith(ext):
            return ext[1:]
    raise BatchInputError(f"input {key!r} must end in .jsonl, .npz or .parquet")


def split_input_key(key: str) -> tuple[str | None, str]:
    """(model, job) for ``batch/in/{model}/{job}.{jsonl,npz,parquet}``; (None, stem) for any other key."""
    check_s3_key(key)
    ext = "." + input_format(key)
    rest = key[len(INPUT_PREFIX):] if key.startswith(INPUT_PREFIX) else None
    parts = rest.split("/") if rest is not None else []
    if len(parts) == 2:
        model, name = parts[0], parts[1][: -len(ext)]
        check_model_name(model)
    else:
        model, name = None, key.rsplit("/", 1)[-1][: -len(ext)]
    if not JOB_NAME_RE.fullmatch(name):
        raise InvalidNameError(f"job name {name!r} (from {key!r}) must be 1-128 letters, digits, '_', '-', '.'")
    return model, name


# --- records ------------------------------------------------------------------------------------


def error_reason(exc: Exception) -> str:
    """An AWS error as ``Code: Message`` (or the exception's type and text), for a message to a person."""
    err = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    if err:
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


def version_pin(version_id: Any, etag: Any) -> dict[str, str]:
    """A job's input version, one spelling per object version: the VersionId (none in an unversioned bucket, nor
    "null": an object written while versioning was off or suspended) and the eTag without quotes (S3 events spell
    it so; HeadObject quotes it), so that an S3 event and a job message for the same version get one job key."""
    pin: dict[str, str] = {}
    if version_id and version_id != "null":
        pin["version_id"] = str(version_id)
    tag = str(etag or "").strip('"')
    if tag:
        pin["etag"] = tag
    return pin


def get_body(s3: Any, loc: S3Location, version: dict[str, str], start: int = 0, stop: int | None = None) -> Any:
    """A streaming body for bytes ``[start, stop)`` of ``loc`` (``stop`` None: to the end), pinned to the
    version seen at the job's start: its ``version_id``, else its ``etag`` (``IfMatch``)."""
    kwargs: dict[str, Any] = {"Bucket": loc.bucket, "Key": loc.key}
    if version.get("version_id") and version["version_id"] != "null":
        kwargs["VersionId"] = version["version_id"]
    elif version.get("etag"):  # quoted, as HTTP spells an entity tag (a job's pin has none: version_pin)
        kwargs["IfMatch"] = '"' + version["etag"].strip('"') + '"'
    if start or stop is not None:
        kwargs["Range"] = f"bytes={start}-{'' if stop is None else stop - 1}"
    try:
        return s3.get_object(**kwargs)["Body"]
    except Exception as exc:
        raise BatchInputError(f"cannot read {loc.uri} ({error_reason(exc)}); check that the object exists, "
                              "was not replaced during the job, and that the function may read it") from exc
