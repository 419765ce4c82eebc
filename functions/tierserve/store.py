"""The model store: read the manifest, fetch artifacts, verify them, cache them.

A store is a local folder or an ``s3://bucket/prefix``; ``manifest.json`` sits at its root
and artifact paths in it are relative to that root. Every artifact is verified against the
manifest's sha256 before anything loads it, and cached under ``MODEL_CACHE_DIR`` by its hash
(content-addressed), so a warm Lambda never downloads or hashes the same artifact twice.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tierserve.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    ConfigurationError,
    IntegrityError,
    InvalidNameError,
    ManifestError,
    UnsafeModelError,
)
from tierserve.manifest import MANIFEST_FILE, Manifest, Variant, check_artifact_path

#: S3 keys the store will read: the same safe alphabet as artifact paths.
S3_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-/]{1,1024}$")
_CHUNK = 1 << 20


def check_s3_key(key: str) -> str:
    if not S3_KEY_RE.match(key) or key.startswith("/") or any(p == ".." for p in key.split("/")):
        raise InvalidNameError(
            f"S3 key {key!r} is not allowed: use letters, digits, '_', '-', '.', '/' and no '..' segments"
        )
    return key


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_external_data(path: Path) -> None:
    """Refuse an ONNX model whose external-data locations leave the model's folder."""
    import mmap

    from tierserve.onnx_scan import ScanError, external_data_locations

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            locations = external_data_locations(mm)
    except (ScanError, ValueError) as exc:
        raise ArtifactError(f"{path.name} is not a readable ONNX model ({exc}); recompile it") from exc
    folder = path.parent.resolve()
    for tensor, location in locations:
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise UnsafeModelError(
                f"model {path.name} stores tensor {tensor!r} in external file {location!r}, which is "
                "outside the model's folder; refusing to load it. Re-export the model with its data inside."
            )


class ModelStore:
    """Fetch-verify-cache for one store URI (local folder or ``s3://bucket/prefix``)."""

    def __init__(self, uri: str, cache_dir: str | Path, manifest_ttl_s: float = 60.0, s3_client: Any = None):
        self.uri = uri
        self.cache_dir = Path(cache_dir)
        self.manifest_ttl_s = manifest_ttl_s
        self._s3 = s3_client
        self._lock = threading.Lock()
        self._manifest: Manifest | None = None
        self._manifest_at = 0.0
        self._verified: dict[str, Path] = {}  # sha256 -> verified local path
        if uri.startswith("s3://"):
            bucket, _, prefix = uri[5:].partition("/")
            if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
                raise ConfigurationError(f"MODEL_STORE_URI {uri!r} does not name a valid S3 bucket")
            self.bucket: str | None = bucket
            self.prefix = prefix.strip("/")
            if self.prefix:
                check_s3_key(self.prefix)
            self.root: Path | None = None
        else:
            self.bucket = None
            self.prefix = ""
            self.root = Path(uri)

    # --- manifest ---------------------------------------------------------------------------------

    def manifest(self) -> Manifest:
        """The manifest, re-read at most every ``manifest_ttl_s`` seconds."""
        now = time.monotonic()
        if self._manifest is not None and now - self._manifest_at < self.manifest_ttl_s:
            return self._manifest
        with self._lock:
            if self._manifest is None or time.monotonic() - self._manifest_at >= self.manifest_ttl_s:
                self._manifest = Manifest.loads(self._read_manifest_bytes())
                self._manifest_at = time.monotonic()
            return self._manifest

    def _read_manifest_bytes(self) -> bytes:
        if self.root is not None:
            path = self.root / MANIFEST_FILE
            if not path.is_file():
                raise ManifestError(
                    f"no manifest at {path}; compile a model first (tierserve compile ... --out {self.root})"
                )
            return path.read_bytes()
        key = self._key(MANIFEST_FILE)
        try:
            return self._s3_client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise ManifestError(f"cannot read s3://{self.bucket}/{key}: {_aws_reason(exc)}") from exc

    # --- artifacts --------------------------------------------------------------------------------

    def fetch(self, variant: Variant) -> Path:
        """A verified local path for ``variant``: sha256 checked before anyone loads it."""
        cached = self._verified.get(variant.sha256)
        if cached is not None and cached.exists():
            return cached
        with self._lock:
            cached = self._verified.get(variant.sha256)
            if cached is not None and cached.exists():
                return cached
            path = self._fetch_local(variant) if self.root is not None else self._fetch_s3(variant)
            check_external_data(path)
            self._verified[variant.sha256] = path
            return path

    def _fetch_local(self, variant: Variant) -> Path:
        assert self.root is not None
        root = self.root.resolve()
        path = (root / check_artifact_path(variant.path)).resolve()
        if not path.is_relative_to(root):
            raise ArtifactError(f"artifact {variant.path!r} resolves outside the model store {root}")
        if not path.is_file():
            raise ArtifactNotFoundError(
                f"artifact {variant.path!r} is listed in the manifest but missing from {root}; "
                "recompile the model or restore the file"
            )
        actual = sha256_file(path)
        if actual != variant.sha256:
            raise IntegrityError(
                f"artifact {variant.path!r} has sha256 {actual[:12]}..., the manifest expects "
                f"{variant.sha256[:12]}...; refusing to load it. Recompile or re-upload the model."
            )
        return path

    def _fetch_s3(self, variant: Variant) -> Path:
        key = self._key(check_artifact_path(variant.path))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        final = self.cache_dir / f"{variant.sha256}.onnx"
        if final.is_file() and sha256_file(final) == variant.sha256:
            return final
        fd, tmp_name = tempfile.mkstemp(dir=self.cache_dir, suffix=".part")
        tmp = Path(tmp_name)
        h = hashlib.sha256()
        try:
            try:
                body = self._s3_client().get_object(Bucket=self.bucket, Key=key)["Body"]
            except Exception as exc:
                reason = _aws_reason(exc)
                cls = ArtifactNotFoundError if "NoSuchKey" in reason or "404" in reason else ArtifactError
                raise cls(
                    f"cannot fetch s3://{self.bucket}/{key}: {reason}; check the object exists "
                    "and the function may read it"
                ) from exc
            with os.fdopen(fd, "wb") as f:
                for chunk in iter(lambda: body.read(_CHUNK), b""):
                    h.update(chunk)
                    f.write(chunk)
            actual = h.hexdigest()
            if actual != variant.sha256:
                raise IntegrityError(
                    f"s3://{self.bucket}/{key} has sha256 {actual[:12]}..., the manifest expects "
                    f"{variant.sha256[:12]}...; refusing to load it. Re-upload the compiled artifacts."
                )
            os.replace(tmp, final)
            return final
        finally:
            tmp.unlink(missing_ok=True)

    def _key(self, relative: str) -> str:
        return check_s3_key(f"{self.prefix}/{relative}" if self.prefix else relative)

    def _s3_client(self) -> Any:
        if self._s3 is None:
            import boto3  # lazy: local stores never need it

            self._s3 = boto3.client("s3")
        return self._s3


def _aws_reason(exc: Exception) -> str:
    err = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    if err:
        return f"{err.get('Code', 'error')} ({err.get('Message', '')})".strip()
    return f"{type(exc).__name__}: {exc}"

