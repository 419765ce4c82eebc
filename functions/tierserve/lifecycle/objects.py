"""The model store as objects, with the conditional writes that make every lifecycle change atomic.

The serving runtime only reads a store (``tierserve.store``); the lifecycle writes it. A change to the
manifest is a read (bytes + ETag), a new document, and a put that succeeds only if the manifest still has
that ETag (``If-Match``); a history record or a content-addressed artifact is created only if it does not
exist yet (``If-None-Match: *``). Losing either race raises :class:`ConflictError`, and the caller re-reads,
merges and retries.

* **S3** has done this natively since 2024: ``PutObject`` with ``IfMatch`` / ``IfNoneMatch`` answers 412
  ``PreconditionFailed`` (or 409 ``ConditionalRequestConflict`` while another conditional write to the same
  key is in flight). moto_server implements both headers (``tests/integration/test_lifecycle_moto.py``
  checks it over HTTP).
* **A folder** gets the same contract from an exclusive ``flock`` on ``DIR/.manifest.lock`` (the lock the
  compiler takes to add a manifest entry, so the two never interleave), an ETag that is the MD5 of the
  bytes (S3's ETag for a single-part object), and temp file + ``os.replace`` so readers never see half a
  file. It is atomic between processes on one machine, not across machines sharing a network folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from tierserve.errors import ConfigurationError, ConflictError, LifecycleError
from tierserve.store import check_s3_key, sha256_file

LOCK_FILE = ".manifest.lock"
#: S3 error codes that mean "the condition did not hold": re-read and retry.
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def etag_of(data: bytes) -> str:
    """S3's ETag for a single-part object: the quoted MD5 of its bytes (an identity here, not security)."""
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


class ObjectStore(Protocol):
    """What the lifecycle needs from a store; keys are relative to the store's root (``manifest.json``)."""

    uri: str

    def get(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when it does not exist."""

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write ``data``; with ``if_match`` only over that ETag, with ``if_none_match`` only if absent
        (else :class:`ConflictError`). Returns the new ETag."""

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        """Upload a file, recording its sha256 (so that a later publish can skip it)."""

    def sha256(self, key: str) -> str | None:
        """The sha256 recorded for (or computed from) the object, or None when it does not exist."""

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, sorted."""

    def download(self, key: str, dst: Path) -> None:
        """Copy the object to a local file."""


class FolderObjects:
    """A store that is a local folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.uri = str(root)

    def _path(self, key: str) -> Path:
        return self.root / check_s3_key(key)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, etag_of(data)

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        path = self._path(key)
        with self._locked():
            if if_match is not None or if_none_match:
                current = self.get(key)
                if if_none_match and current is not None:
                    raise ConflictError(f"{path} already exists")
                if if_match is not None and (current is None or current[1] != if_match):
                    raise ConflictError(f"{path} changed since it was read (ETag {if_match} no longer matches)")
            _write_atomic(path, data)
        return etag_of(data)

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        dst = self._path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)  # a copy, never a hard link: the store refuses files with two names
            if sha256_file(Path(tmp)) != sha256:
                raise LifecycleError(f"{path} changed while it was being published; publish it again")
            os.replace(tmp, dst)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def sha256(self, key: str) -> str | None:
        path = self._path(key)
        return sha256_file(path) if path.is_file() else None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def download(self, key: str, dst: Path) -> None:
        shutil.copyfile(self._path(key), dst)


class S3Objects:
    """A store that is an S3 prefix, ``s3://bucket/prefix``."""

    def __init__(self, uri: str, client: Any = None) -> None:
        bucket, _, prefix = uri[5:].partition("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
            raise ConfigurationError(f"store {uri!r} does not name a valid S3 bucket")
        self.uri = uri
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_s3_key(self.prefix)
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            from tierserve import aws

            self._client = aws.client("s3")
        return self._client

    def key(self, key: str) -> str:
        return check_s3_key(f"{self.prefix}/{key}" if self.prefix else key)

    def get(self, key: str) -> tuple[bytes, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key(key))
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise LifecycleError(f"cannot read s3://{self.bucket}/{self.key(key)}: {_reason(exc)}") from exc
        return obj["Body"].read(), obj["ETag"]

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(key), "Body": data}
        if if_match is not None:
            args["IfMatch"] = if_match
        if if_none_match:
            args["IfNoneMatch"] = "*"
        try:
            return str(self.client.put_object(**args)["ETag"])
        except Exception as exc:
            code = _code(exc)
            if code in _CONFLICT_CODES or (if_match is not None and code in ("NoSuchKey", "404")):
                raise ConflictError(f"s3://{self.bucket}/{args['Key']} changed since it was read ({code})") from exc
            raise LifecycleError(f"cannot write s3://{self.bucket}/{args['Key']}: {_reason(exc)}") from exc

    def put_file(self, key: str, path: Path, sha256: str) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self.key(key), ExtraArgs={"Metadata": {"sha256": sha256}})
        except Exception as exc:
            raise LifecycleError(f"cannot upload {path} to s3://{self.bucket}/{self.key(key)}: {_reason(exc)}") from exc

    def sha256(self, key: str) -> str | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(key))
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise LifecycleError(f"cannot read s3://{self.bucket}/{self.key(key)}: {_reason(exc)}") from exc
        return str((head.get("Metadata") or {}).get("sha256") or "") or "unknown"

    def list(self, prefix: str) -> list[str]:
        full = self.key(prefix.rstrip("/")) + "/" if prefix.strip("/") else (f"{self.prefix}/" if self.prefix else "")
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys += [o["Key"][len(self.prefix) + 1 if self.prefix else 0:] for o in page.get("Contents") or ()]
        return sorted(keys)

    def download(self, key: str, dst: Path) -> None:
        self.client.download_file(self.bucket, self.key(key), str(dst))


def open_objects(uri: str, s3_client: Any = None) -> ObjectStore:
    """The store at ``uri``: ``s3://bucket/prefix`` or a folder."""
    if not uri:
        raise ConfigurationError("no model store given: pass --store URI or set MODEL_STORE_URI")
    if uri.startswith("s3://"):
        return S3Objects(uri, s3_client)
    return FolderObjects(uri)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    err = response.get("Error") or {}
    status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or "")
    return str(err.get("Code") or status)


def _reason(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    err = response.get("Error") or {}
    return f"{err.get('Code')} ({err.get('Message', '')})" if err else f"{type(exc).__name__}: {exc}"
