"""The model store: read the manifest, fetch artifacts, verify them, cache them.

A store is a local folder or an ``s3://bucket/prefix``; ``manifest.json`` sits at its root
and artifact paths in it are relative to that root. :meth:`ModelStore.fetch` copies every file a
model needs (the ``.onnx`` and each external-data file the manifest lists) into a cache folder of
its own, ``MODEL_CACHE_DIR/<digest of the variant>/`` (``Variant.digest``: all of its files, since two
versions can share a ``model.onnx`` and differ in their weights, tokenizer or chat template; a model with no
other file keeps its sha256), hashing every file as it copies, and only then hands out the path, so
onnxruntime finds the external data next to the model and never reads a byte that was not verified. The
folder is built under a temporary name and renamed into place (atomic: a failed or concurrent fetch never
leaves a half-written model). A warm Lambda reuses it; a new
process re-verifies it once and fetches it again if anything changed.

Some readers need a few of a variant's files and never its weights: the router renders a generative model's chat
template and tokenizes its prompt, which needs ``tokenizer.json`` and the template, not ``model.onnx.data``
(hundreds of MB to GBs in its ``/tmp``, seconds of its cold start). :meth:`ModelStore.fetch_files` materialises
only the named files, with the same checks (each file's sha256 and size, links refused, names among the
variant's listed files, built under a temporary name and renamed into place) in a folder of their own,
``MODEL_CACHE_DIR/<digest>.files-<names>/``; :meth:`ModelStore.read_file` reads one verified file into memory.

The manifest is re-read every ``MANIFEST_TTL_S`` (and at once, at most once a second, when a request
names a version this copy does not know: :meth:`ModelStore.refresh`, so the CPU function serves a version
the router has just seen published). When it changed, every cached model that no version still served
uses is evicted (its folder, and the ``on_evict`` listeners', i.e. the onnxruntime sessions): a request in
flight keeps the session it holds, and a later request for an evicted model fetches it again.

Refused before anything reads them: a sha256 or size that does not match the manifest
(:class:`IntegrityError`), external data the manifest does not list (IntegrityError), a source file
that is a hard link (``st_nlink > 1``), a symbolic link or not a regular file, and an external-data
location that is unsafe (NUL byte, absolute, ``..``, ...) anywhere in the graph, Constant nodes and
subgraphs included (:class:`UnsafeModelError`).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tierserve.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    ArtifactUnavailableError,
    ConfigurationError,
    IntegrityError,
    InvalidNameError,
    ManifestError,
    ModelNotFoundError,
    UnsafeModelError,
)
from tierserve.manifest import MANIFEST_FILE, SHA256_RE, ExternalFile, Manifest, Variant, check_artifact_path

#: S3 keys the store will read: the same safe alphabet as artifact paths (matched with fullmatch).
S3_KEY_RE = re.compile(r"[A-Za-z0-9_.\-/]{1,1024}")
#: The model's file name inside its cache folder.
MODEL_FILE = "model.onnx"
_CHUNK = 1 << 20
#: A folder of some of a variant's files (:meth:`ModelStore.fetch_files`): ``<digest>.files-<12 hex of the names>``.
PARTIAL_DIR_RE = re.compile(r"([0-9a-f]{64})\.files-[0-9a-f]{12}")
#: S3 client timeouts (seconds): per connection attempt, and per read of an object's bytes.
S3_CONNECT_TIMEOUT_S = 3.0
S3_READ_TIMEOUT_S = 10.0


def check_s3_key(key: str) -> str:
    if (
        not isinstance(key, str)
        or not S3_KEY_RE.fullmatch(key)
        or key.startswith("/")
        or any(p == ".." for p in key.split("/"))
    ):
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


def open_regular(path: Path, what: str) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file with one link (not a symlink, FIFO,
    device, directory or hard link): checked on the open descriptor, so nothing can swap it in between."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a symlink; others: not readable
        raise UnsafeModelError(
            f"{what} is not a regular file ({exc.strerror}: symbolic links are not followed); refusing to load it. "
            "Recompile the model or restore the file"
        ) from exc
    st = os.fstat(fd)
    reason = None if stat.S_ISREG(st.st_mode) else "is not a regular file"
    if reason is None and st.st_nlink > 1:
        reason = f"is a hard link ({st.st_nlink} names for the same data)"
    if reason is not None:
        os.close(fd)
        raise UnsafeModelError(f"{what} {reason}; refusing to load it. Recompile the model or restore the file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_external_data(path: Path, variant: Variant) -> None:
    """Refuse a model whose external-data locations are unsafe or not listed (with a sha256) in the manifest,
    or whose operators come from a domain outside ``onnx_scan.ALLOWED_OP_DOMAINS`` (a custom-op library)."""
    from tierserve.onnx_scan import ScanError, disallowed_domains, external_data_locations, unsafe_location

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            locations = external_data_locations(mm)
            foreign = disallowed_domains(mm)
    except (ScanError, ValueError) as exc:
        raise ArtifactError(f"{variant.path} is not a readable ONNX model ({exc}); recompile it") from exc
    if foreign:
        from tierserve.onnx_scan import ALLOWED_OP_DOMAINS

        allowed = ", ".join(repr(d) for d in sorted(ALLOWED_OP_DOMAINS))
        raise UnsafeModelError(
            f"model {variant.path} uses operators from domain(s) {', '.join(map(repr, foreign))}, which are not on "
            f"the allowlist ({allowed}); tierserve loads no custom-op library, so it refuses to load it. "
            "Export the model with standard ONNX operators and recompile it"
        )
    listed = {variant.location(e) for e in variant.external_data}
    for tensor, location in locations:
        reason = unsafe_location(location)
        if reason is not None:
            raise UnsafeModelError(
                f"model {variant.path} stores tensor {tensor!r} in external file {location!r}, which {reason}; "
                "refusing to load it. Re-export the model with its data in files next to it and recompile"
            )
        if location not in listed:
            raise IntegrityError(
                f"model {variant.path} reads tensor {tensor!r} from external file {location!r}, which the manifest "
                "does not list with a sha256, so nothing vouches for it; refusing to load it. Recompile the model "
                "with tierserve compile (it records every external-data file)"
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
        self._verified: dict[str, Path] = {}  # Variant.digest -> verified local path
        self._partial: dict[str, Path] = {}  # partial folder's name (digest.files-...) -> verified local folder
        self._manifest_bytes: bytes | None = None
        #: Called with the digests (``Variant.digest``) evicted when the manifest no longer uses them (the session
        #: cache, the generation engine's models).
        self.on_evict: list[Callable[[set[str]], None]] = []
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
                self._reload()
            assert self._manifest is not None
            return self._manifest

    def refresh(self, since: float | None = None, min_interval_s: float = 0.05) -> Manifest:
        """A manifest whose read began at or after ``since`` (``time.monotonic()``; default: now).

        For a request naming a version this copy does not know: the router that sent it may have seen it
        published already. A read that began after the request arrived sees at least what the router saw
        (S3 reads are strongly consistent), so a request in flight is never refused for a version that
        exists; requests arriving together share one read, and reads are at least ``min_interval_s`` apart."""
        since = time.monotonic() if since is None else since
        with self._lock:
            if self._manifest is None or self._manifest_at < since:
                wait = self._manifest_at + min_interval_s - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self._reload()
            assert self._manifest is not None
            return self._manifest

    def _reload(self) -> None:
        began = time.monotonic()
        data = self._read_manifest_bytes()
        self._manifest_at = began
        if data == self._manifest_bytes and self._manifest is not None:
            return
        manifest = Manifest.loads(data)
        first = self._manifest is None
        self._manifest, self._manifest_bytes = manifest, data
        if not first:
            self._evict(live_digests(manifest))

    def _evict(self, live: set[str]) -> None:
        """Forget and delete every cached model the manifest no longer serves, and the folders of its files fetched
        alone (:meth:`fetch_files`) (called under the lock)."""
        gone = {digest for digest in self._verified if digest not in live}
        if self.cache_dir.is_dir():
            gone |= {p.name for p in self.cache_dir.iterdir() if SHA256_RE.fullmatch(p.name) and p.name not in live}
        for digest in gone:
            self._verified.pop(digest, None)
            shutil.rmtree(self.cache_dir / digest, ignore_errors=True)
        partial = set(self._partial)
        if self.cache_dir.is_dir():
            partial |= {p.name for p in self.cache_dir.iterdir() if PARTIAL_DIR_RE.fullmatch(p.name)}
        for name in partial:
            match = PARTIAL_DIR_RE.fullmatch(name)
            if match is not None and match.group(1) not in live:
                self._partial.pop(name, None)
                shutil.rmtree(self.cache_dir / name, ignore_errors=True)
                gone.add(match.group(1))
        if gone:
            for listener in self.on_evict:
                listener(gone)

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
            failure = _s3_failure(exc, f"s3://{self.bucket}/{key}")
            if isinstance(failure, ArtifactUnavailableError):
                raise failure from exc
            raise ManifestError(f"cannot read s3://{self.bucket}/{key}: {_aws_reason(exc)}") from exc

    # --- artifacts --------------------------------------------------------------------------------

    def fetch(self, variant: Variant) -> Path:
        """A verified local path for ``variant``'s model, with its external data beside it."""
        digest = variant.digest
        cached = self._verified.get(digest)
        if cached is not None and cached.exists():
            return cached
        with self._lock:
            cached = self._verified.get(digest)
            if cached is not None and cached.exists():
                return cached
            path = self._materialize(variant)
            self._verified[digest] = path
            return path

    def _materialize(self, variant: Variant) -> Path:
        """``cache/<digest>/model.onnx`` plus external data: reused when it verifies, else fetched anew."""
        folder = self.cache_dir / variant.digest
        if folder.is_dir():
            try:
                self._verify_folder(variant, folder)
                return folder / MODEL_FILE
            except (ArtifactError, OSError):
                shutil.rmtree(folder, ignore_errors=True)  # corrupted or half-deleted: fetch it again
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=f".fetch-{variant.digest[:12]}-"))
        try:
            self._copy(variant.files()[0], tmp / MODEL_FILE)
            check_external_data(tmp / MODEL_FILE, variant)
            for ext in variant.external_data:
                dst = tmp / variant.location(ext)
                dst.parent.mkdir(parents=True, exist_ok=True)
                self._copy(ext, dst)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process published the same folder first: use it if it verifies
                self._verify_folder(variant, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder / MODEL_FILE

    def fetch_files(self, variant: Variant, names: Iterable[str]) -> Path:
        """A verified local folder holding ``names`` of ``variant``'s files, each at its location (its path relative
        to the model's folder, as :meth:`Variant.location` gives it: ``tokenizer.json``, ``chat_template.jinja``).

        Only those files are fetched: never the model or its weights unless named. Each is checked as
        :meth:`fetch` checks it (sha256 and size against the manifest, a link or a non-regular source refused), and
        each name must be one of the files the manifest lists for the variant. The folder,
        ``<cache>/<digest>.files-<12 hex of the sorted names>/``, is built under a temporary name and renamed into
        place; a later process re-verifies it before using it. When this store has already verified the variant's
        whole folder (:meth:`fetch`), that folder is returned: it holds the same verified files."""
        wanted = sorted(set(names))
        if not wanted:
            raise ArtifactError("fetch_files needs at least one file name")
        listed = files_by_location(variant)
        for name in wanted:
            if name not in listed:
                raise ArtifactNotFoundError(
                    f"{name!r} is not one of the files the manifest lists for {variant.path} "
                    f"({', '.join(sorted(listed))}); recompile the model with it")
        full = self._verified.get(variant.digest)
        if full is not None and full.exists():
            return full.parent
        key = f"{variant.digest}.files-{hashlib.sha256(chr(10).join(wanted).encode()).hexdigest()[:12]}"
        cached = self._partial.get(key)
        if cached is not None and cached.exists():
            return cached
        with self._lock:
            cached = self._partial.get(key)
            if cached is not None and cached.exists():
                return cached
            folder = self._materialize_files(variant, [(n, listed[n]) for n in wanted], self.cache_dir / key)
            self._partial[key] = folder
            return folder

    def read_file(self, variant: Variant, name: str) -> bytes:
        """The bytes of ``variant``'s file at location ``name`` (see :meth:`fetch_files`), sha256/size-verified, read
        into memory and nothing written: from a folder this store verified, else from the store itself."""
        listed = files_by_location(variant)
        artifact = listed.get(name)
        if artifact is None:
            raise ArtifactNotFoundError(
                f"{name!r} is not one of the files the manifest lists for {variant.path} "
                f"({', '.join(sorted(listed))}); recompile the model with it")
        local = self._verified.get(variant.digest)
        folders = [*([local.parent] if local is not None else []),
                   *(p for k, p in list(self._partial.items()) if k.startswith(variant.digest + "."))]
        for folder in folders:
            path = folder / name
            if path.exists():
                with open_regular(path, f"cached {artifact.path}") as src:
                    return _read_verified(src, artifact, f"cached copy of {artifact.path}")
        check_artifact_path(artifact.path)
        if self.root is not None:
            with self._open_local(artifact) as src:
                return _read_verified(src, artifact, artifact.path)
        key = self._key(artifact.path)
        where = f"s3://{self.bucket}/{key}"
        try:
            return _read_verified(self._s3_body(key), artifact, where)
        except ArtifactError:
            raise
        except Exception as exc:  # the connection dropped or stalled mid-object
            raise _s3_failure(exc, where) from exc

    def _materialize_files(self, variant: Variant, files: list[tuple[str, ExternalFile]], folder: Path) -> Path:
        """``folder`` with each ``(location, artifact)`` of ``files``: reused when it verifies, else fetched anew."""
        if folder.is_dir():
            try:
                for name, artifact in files:
                    with open_regular(folder / name, f"cached {artifact.path}") as src:
                        _check_digest(artifact, _digest(src, None), f"cached copy of {artifact.path}")
                return folder
            except (ArtifactError, OSError):
                shutil.rmtree(folder, ignore_errors=True)  # corrupted or half-deleted: fetch it again
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=f".fetch-{variant.digest[:12]}-"))
        try:
            for name, artifact in files:
                dst = tmp / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                self._copy(artifact, dst)
            try:
                os.replace(tmp, folder)
            except OSError:  # another process published the same folder first: use it if it verifies
                for name, artifact in files:
                    with open_regular(folder / name, f"cached {artifact.path}") as src:
                        _check_digest(artifact, _digest(src, None), f"cached copy of {artifact.path}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def _verify_folder(self, variant: Variant, folder: Path) -> None:
        targets = [folder / MODEL_FILE, *(folder / variant.location(e) for e in variant.external_data)]
        for artifact, path in zip(variant.files(), targets, strict=True):
            with open_regular(path, f"cached {artifact.path}") as src:
                _check_digest(artifact, _digest(src, None), f"cached copy of {artifact.path}")
        check_external_data(folder / MODEL_FILE, variant)

    def _copy(self, artifact: ExternalFile, dst: Path) -> None:
        """Copy one artifact from the store to ``dst`` (a new file), verifying size and sha256 on the way."""
        check_artifact_path(artifact.path)
        with open(dst, "xb") as out:
            if self.root is not None:
                with self._open_local(artifact) as src:
                    digest, size = _digest(src, out)
                where = artifact.path
            else:
                key = self._key(artifact.path)
                where = f"s3://{self.bucket}/{key}"
                try:
                    digest, size = _digest(self._s3_body(key), out)
                except ArtifactError:
                    raise
                except Exception as exc:  # the connection dropped or stalled mid-object: the temp folder goes
                    raise _s3_failure(exc, where) from exc
        _check_digest(artifact, (digest, size), where)

    def _open_local(self, artifact: ExternalFile) -> BinaryIO:
        assert self.root is not None
        root = self.root.resolve()
        path = root / artifact.path
        if not path.parent.resolve().is_relative_to(root):
            raise UnsafeModelError(f"artifact {artifact.path!r} resolves outside the model store {root}")
        try:
            return open_regular(path, f"artifact {artifact.path!r}")
        except FileNotFoundError as exc:
            raise ArtifactNotFoundError(
                f"artifact {artifact.path!r} is listed in the manifest but missing from {root}; "
                "recompile the model or restore the file"
            ) from exc

    def _s3_body(self, key: str) -> Any:
        try:
            return self._s3_client().get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as exc:
            raise _s3_failure(exc, f"s3://{self.bucket}/{key}") from exc

    def _key(self, relative: str) -> str:
        return check_s3_key(f"{self.prefix}/{relative}" if self.prefix else relative)

    def _s3_client(self) -> Any:
        if self._s3 is not None:  # injected
            return self._s3
        from tierserve import aws  # lazy: local stores never need boto3

        # Bounded: a stalled S3 must cost a fetch seconds, not botocore's 60 s per read times its retries.
        return aws.client("s3", connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S,
                          retries={"total_max_attempts": 3, "mode": "standard"})


def files_by_location(variant: Variant) -> dict[str, ExternalFile]:
    """Each of ``variant``'s files by its location in the variant's folder (the model as ``model.onnx``); a location
    that would leave the folder (absolute, ``..``) is an unsafe model."""
    out = {MODEL_FILE: variant.files()[0]}
    for ext in variant.external_data:
        location = variant.location(ext)
        parts = location.split("/")
        if location.startswith("/") or "\\" in location or any(p in ("", ".", "..") for p in parts):
            raise UnsafeModelError(f"file {ext.path!r} of {variant.path} lies outside the model's folder "
                                   f"({location!r}); refusing it. Recompile the model")
        out[location] = ext
    return out


def live_digests(manifest: Manifest) -> set[str]:
    """The digest (``Variant.digest``, a cache folder's name) of every variant a request can still get: listed
    versions, and retired ones in their grace."""
    live: set[str] = set()
    for name, entry in manifest.models.items():
        for version, mv in entry.versions.items():
            if mv.retired:
                try:
                    manifest.resolve(name, version)
                except ModelNotFoundError:
                    continue
            live |= {v.digest for v in mv.variants.values()}
    return live


def _s3_failure(exc: Exception, where: str) -> ArtifactError:
    """What an S3 error means for a fetch: a missing object (500, artifact_not_found), a refusal or bad request
    (500), or the store being unavailable just now: a 5xx, a timeout, a dropped connection (503, Retry-After)."""
    reason = _aws_reason(exc)
    resp = getattr(exc, "response", None)
    resp = resp if isinstance(resp, dict) else {}
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if "NoSuchKey" in reason or status == 404 or "404" in reason:
        return ArtifactNotFoundError(f"cannot fetch {where}: {reason}; check the object exists")
    if status >= 500 or (status == 0 and not resp):
        return ArtifactUnavailableError(
            f"the model store is unavailable: cannot fetch {where} ({reason}); retry shortly (nothing half-fetched "
            "was kept)", retry_after_s=5)
    return ArtifactError(f"cannot fetch {where}: {reason}; check the object exists and the function may read it")


def _aws_reason(exc: Exception) -> str:
    resp = getattr(exc, "response", None)  # a dict for ClientError; None (or absent) for transport errors
    err = resp.get("Error", {}) if isinstance(resp, dict) else {}
    if err:
        return f"{err.get('Code', 'error')} ({err.get('Message', '')})".strip()
    return f"{type(exc).__name__}: {exc}"


def _chunks(src: Any) -> Iterator[bytes]:
    while chunk := src.read(_CHUNK):
        yield chunk


def _digest(src: Any, out: BinaryIO | None) -> tuple[str, int]:
    """(sha256, size) of everything ``src`` yields, written to ``out`` too when given."""
    h, size = hashlib.sha256(), 0
    for chunk in _chunks(src):
        h.update(chunk)
        size += len(chunk)
        if out is not None:
            out.write(chunk)
    return h.hexdigest(), size


def _read_verified(src: Any, artifact: ExternalFile, where: str) -> bytes:
    """All of ``src`` (at most one byte more than the manifest's size), refused unless it is the manifest's file."""
    data = src.read(artifact.size_bytes + 1)
    _check_digest(artifact, (hashlib.sha256(data).hexdigest(), len(data)), where)
    return bytes(data)


def _check_digest(artifact: ExternalFile, got: tuple[str, int], where: str) -> None:
    sha, size = got
    if sha != artifact.sha256 or size != artifact.size_bytes:
        raise IntegrityError(
            f"{where} has sha256 {sha[:12]}... ({size} bytes), the manifest expects {artifact.sha256[:12]}... "
            f"({artifact.size_bytes} bytes) for {artifact.path}; refusing to load it. Recompile or re-upload the model."
        )
