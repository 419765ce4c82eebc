"""The model store as an edge device sees it: synced every interval, verified, swapped atomically, kept offline.

``EdgeStore`` is a :class:`~tierserve.store.ModelStore` (same folder or S3 store, same sha256-verified,
link-refusing fetch into ``cache_dir/<digest>/``, one folder per variant, named by ``Variant.digest``) whose
``manifest()`` never touches the network: it answers the last good sync. ``sync()`` reads the store's manifest
and, for every model whose default or canary version is placed on the edge (``"edge"`` in its targets), fetches
that version's edge variant (``edge_variant``) and verifies every file against its sha256 and size. Only then is
the new view swapped in, in one assignment: a request sees the old view or the new one, never a mix.

What a device does when something goes wrong:

* the store is unreachable (offline): nothing changes; the device serves what it holds;
* a version fails verification (a tampered artifact), does not fit the disk or memory budget, or
  cannot be fetched: it is refused, with the reason in ``status.refused``; the version held before
  keeps serving as the default (a canary that fails is dropped: its share goes to the default);
* a model is no longer placed on the edge: it is no longer held, and its requests are forwarded.

The view and the versions held are written to ``cache_dir/edge-state.json`` (temporary file +
``os.replace``) after each sync, so that a device that restarts offline serves at once what it held,
after re-verifying the cached files. ``--seed`` (a store folder shipped with the device, e.g. in a
Greengrass component) is synced first when nothing was held yet.

Disk is bounded by ``max_disk_bytes``: versions no longer held are evicted least recently used first
(a folder's mtime is touched when a session is built from it), and a version that cannot fit beside
the ones held is refused. Memory is bounded by the session pool (``tierserve.edge.backend``); a version
whose estimated session would not fit the whole budget is refused here, so it is forwarded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tierserve.errors import ArtifactError, BackendUnavailableError, ManifestError, TierserveError
from tierserve.manifest import Manifest, ModelVersion
from tierserve.observability import logger
from tierserve.store import ModelStore

STATE_FILE = "edge-state.json"
STATE_SCHEMA = 1
_DIGEST_DIR = re.compile(r"[0-9a-f]{64}")
MB = 1024 * 1024


def session_estimate(file_bytes: int) -> int:
    """Estimated memory of an onnxruntime session over ``file_bytes`` of model: weights twice (file and
    prepacked/optimised copies) plus arenas and threads. Measured here: MiniLM int8 (22.8 MB) added 35.5 MB."""
    return 8 * MB + 2 * file_bytes


@dataclass(frozen=True)
class Held:
    """A version held by the device: its manifest entry, the verified model file, its bytes on disk."""

    model: ModelVersion
    path: Path
    size_bytes: int

    @property
    def sha256(self) -> str:
        """The model file's sha256 (what status shows)."""
        return self.model.edge_artifact.sha256

    @property
    def digest(self) -> str:
        """The variant's identity, all of its files (``Variant.digest``): its cache folder and session key."""
        return self.model.edge_artifact.digest


@dataclass(frozen=True)
class Snapshot:
    """What requests see: the manifest (None before any sync) and the versions held, swapped as one."""

    manifest: Manifest | None
    held: Mapping[tuple[str, str], Held] = field(default_factory=dict)


@dataclass
class SyncStatus:
    """The sync's state for health and metrics (times are wall-clock seconds)."""

    syncs: int = 0
    failures: int = 0
    last_attempt: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    last_duration_s: float = 0.0
    refused: dict[str, str] = field(default_factory=dict)
    evicted: list[str] = field(default_factory=list)
    source: str = ""  # where the view came from: the store, the seed, or the saved state

    def state(self, has_view: bool) -> str:
        """never (nothing yet), pending (serving a saved or seeded view, no sync finished yet), ok, offline
        (the last sync failed; serving what is held), failing (no sync ever succeeded, nothing to serve)."""
        if self.last_attempt is None:
            return "pending" if has_view else "never"
        if self.last_error is None:
            return "ok"
        return "offline" if has_view else "failing"


class EdgeStore(ModelStore):
    """Fetch-verify-cache from ``uri`` for one device, with a synced, persisted view (see the module docstring)."""

    def __init__(self, uri: str, cache_dir: str | Path, *, models: tuple[str, ...] = (),
                 max_disk_bytes: int = 2048 * MB, max_memory_bytes: int = 512 * MB, s3_client: Any = None,
                 estimate: Callable[[int], int] = session_estimate) -> None:
        super().__init__(uri, cache_dir, manifest_ttl_s=0.0, s3_client=s3_client)
        self.only = frozenset(models)
        self.max_disk_bytes = max_disk_bytes
        self.max_memory_bytes = max_memory_bytes
        self.estimate = estimate
        self.status = SyncStatus()
        self._snapshot = Snapshot(None)
        self._sync_lock = threading.Lock()

    # --- what requests read (never the network) --------------------------------------------------------

    def manifest(self) -> Manifest:
        manifest = self._snapshot.manifest
        if manifest is None:
            why = f" (last error: {self.status.last_error})" if self.status.last_error else ""
            raise BackendUnavailableError(
                f"this edge device has not synced the model store {self.uri} yet{why}; it serves once a sync "
                "succeeds", retry_after_s=5)
        return manifest

    def refresh(self, since: float | None = None, min_interval_s: float = 0.05) -> Manifest:
        """The synced view, as ``manifest()``: a device never reads the store on a request's path.

        The cloud's store re-reads its manifest when a request names a model it lacks (the router may have
        seen it published); a device takes new models at its next sync instead. Reading the store here
        would turn an unknown name into a store error (a 500, "no manifest at ...") while the store is
        unreachable, and would bypass the verified view (the base class evicts what the store's manifest
        no longer lists, held versions included)."""
        return self.manifest()

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a model this device holds or its last synced manifest lists (metrics label only
        these: a name taken from a request is unbounded)."""
        snapshot = self._snapshot
        if any(n == name for n, _ in snapshot.held):
            return True
        m = snapshot.manifest
        return m is not None and (name in m.models or name in m.broken)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def held(self, model: ModelVersion) -> Held | None:
        """The version, if the device holds its edge variant (verified); None: it is forwarded."""
        h = self._snapshot.held.get((model.name, model.version))
        return h if h is not None and h.digest == model.edge_artifact.digest else None

    # --- sync ------------------------------------------------------------------------------------------

    def sync(self) -> SyncStatus:
        """Read the store's manifest, fetch and verify what the edge should hold, swap the view; never raises."""
        with self._sync_lock:
            started, attempted = time.monotonic(), time.time()
            try:
                remote = Manifest.loads(self._read_manifest_bytes())
            except TierserveError as exc:
                self.status.last_attempt = attempted  # set when the attempt is over: a sync in flight is not "ok"
                self.status.failures += 1
                if self.status.last_error != exc.message:
                    logger.warning("edge sync failed; serving what is held",
                                   extra={"store": self.uri, "error": exc.message})
                self.status.last_error = exc.message
                self.status.last_duration_s = time.monotonic() - started
                return self.status
            snapshot, refused = self._view(remote, self._snapshot)
            changed = _versions(snapshot) != _versions(self._snapshot)
            self._snapshot = snapshot  # the swap: one assignment
            self._persist(snapshot)
            evicted = self.evict()
            self.status.syncs += 1
            self.status.last_attempt = self.status.last_success = attempted
            self.status.last_error = None
            self.status.refused = refused
            self.status.evicted = evicted
            self.status.source = "store"
            self.status.last_duration_s = time.monotonic() - started
            if changed or refused:
                logger.info("edge sync", extra={"store": self.uri, "held": sorted(_versions(snapshot)),
                                                "refused": refused, "evicted": evicted})
            return self.status

    def _view(self, remote: Manifest, prev: Snapshot) -> tuple[Snapshot, dict[str, str]]:
        """The new view: the store's manifest, with each edge model's default and canary replaced by what
        could be held (a refused default keeps the version held before)."""
        models = dict(remote.models)
        held: dict[tuple[str, str], Held] = {}
        refused: dict[str, str] = {}
        for name, entry in sorted(remote.models.items()):
            if self.only and name not in self.only:
                continue
            wanted = [entry.default_version]
            if entry.canary:
                wanted.append(str(entry.canary["version"]))
            edge_wanted = [v for v in dict.fromkeys(wanted) if entry.versions[v].serves_edge]
            if not edge_wanted:
                continue  # not placed on the edge: forwarded
            got: dict[str, Held] = {}
            for v in edge_wanted:
                try:
                    got[v] = self._hold(entry.versions[v], held)
                except (TierserveError, OSError) as exc:
                    refused[f"{name}/{v}"] = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            versions = dict(entry.versions)
            default = entry.default_version
            if default not in got:
                old = _held_default(prev, name)
                if old is not None and old.model.serves_edge:
                    versions[old.model.version] = old.model
                    default = old.model.version
                    got[default] = old
            canary = entry.canary if entry.canary and str(entry.canary["version"]) in got else None
            models[name] = replace(entry, default_version=default, versions=versions, canary=canary)
            held.update({(name, v): h for v, h in got.items()})
        return Snapshot(replace(remote, models=models), held), refused

    def _hold(self, mv: ModelVersion, held: Mapping[tuple[str, str], Held]) -> Held:
        """Fetch and verify ``mv``'s edge variant within the budgets (ArtifactError saying why not)."""
        variant = mv.edge_artifact
        need = sum(f.size_bytes for f in variant.files())
        if self.estimate(need) > self.max_memory_bytes:
            raise ArtifactError(
                f"{mv.name} v{mv.version} ({variant.path}) needs about {self.estimate(need) / MB:.0f} MB of memory "
                f"once loaded, over this device's budget of {self.max_memory_bytes / MB:.0f} MB (--max-memory-mb); "
                "it is forwarded to the cloud")
        digest = variant.digest
        kept = {h.digest: h.size_bytes for h in held.values()}
        if digest not in kept and sum(kept.values()) + need > self.max_disk_bytes:
            raise ArtifactError(
                f"{mv.name} v{mv.version} needs {need / MB:.1f} MB of disk beside {sum(kept.values()) / MB:.1f} MB "
                f"held, over this device's budget of {self.max_disk_bytes / MB:.0f} MB (--max-disk-mb); "
                "it is forwarded to the cloud")
        if not (self.cache_dir / digest).is_dir():
            self.evict(keep={*kept, digest}, room=need)
        return Held(mv, self.fetch(variant), need)

    # --- disk ------------------------------------------------------------------------------------------

    def disk_usage(self) -> dict[str, int]:
        """Bytes of each cached variant folder (cache_dir/<digest>/)."""
        out: dict[str, int] = {}
        if not self.cache_dir.is_dir():
            return out
        for d in self.cache_dir.iterdir():
            if d.is_dir() and _DIGEST_DIR.fullmatch(d.name):
                out[d.name] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        return out

    def evict(self, keep: set[str] | frozenset[str] | None = None, room: int = 0) -> list[str]:
        """Remove cached versions no longer held, least recently used first, until the cache plus ``room``
        fits ``max_disk_bytes``; ``keep`` and the folders are digests (``Variant.digest``); returns the prefixes
        of the digests evicted."""
        keep = set(keep or ()) | {h.digest for h in self._snapshot.held.values()}
        usage = self.disk_usage()
        total = sum(usage.values()) + room
        evicted = []
        candidates = sorted((d for d in usage if d not in keep), key=lambda d: (self.cache_dir / d).stat().st_mtime)
        for digest in candidates:
            if total <= self.max_disk_bytes:
                break
            shutil.rmtree(self.cache_dir / digest, ignore_errors=True)
            self._verified.pop(digest, None)
            total -= usage[digest]
            evicted.append(digest[:12])
        return evicted

    # --- persistence and seeding -----------------------------------------------------------------------

    def _persist(self, snapshot: Snapshot) -> None:
        if snapshot.manifest is None:
            return
        state = {"schema": STATE_SCHEMA, "store": self.uri, "saved_at": time.time(),
                 "manifest": snapshot.manifest.to_json(), "held": sorted([list(k) for k in snapshot.held])}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.cache_dir / STATE_FILE)

    def load_state(self) -> bool:
        """Serve what the device held before it stopped: the saved view, each held version re-verified
        from the cache (one that fails is dropped). False when there is no usable saved state."""
        path = self.cache_dir / STATE_FILE
        for stale in self.cache_dir.glob(".fetch-*") if self.cache_dir.is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)  # a fetch interrupted by a power cut
        try:
            state = json.loads(path.read_text())
            manifest = Manifest.from_json(state["manifest"])
            pairs = [(str(n), str(v)) for n, v in state["held"]]
        except FileNotFoundError:
            return False
        except (ValueError, KeyError, TypeError, ManifestError) as exc:
            logger.warning("edge state unreadable; ignoring it", extra={"path": str(path), "error": str(exc)})
            return False
        held: dict[tuple[str, str], Held] = {}
        for name, version in pairs:
            try:
                mv = manifest.resolve(name, version)
                held[(name, version)] = Held(mv, self._cached(mv), sum(f.size_bytes for f in mv.edge_artifact.files()))
            except (TierserveError, OSError) as exc:
                self.status.refused[f"{name}/{version}"] = getattr(exc, "message", None) or str(exc)
        self._snapshot = Snapshot(manifest, held)
        self.status.source = "saved state"
        return True

    def _cached(self, mv: ModelVersion) -> Path:
        """The verified cached folder of ``mv``'s edge variant, without asking the store (offline start)."""
        variant = mv.edge_artifact
        folder = self.cache_dir / variant.digest
        self._verify_folder(variant, folder)
        path = folder / "model.onnx"
        self._verified[variant.digest] = path
        return path

    def seed_from(self, seed_dir: str | Path) -> SyncStatus:
        """Sync once from a store folder shipped with the device (same cache, same checks) into this store's view."""
        seed = EdgeStore(str(seed_dir), self.cache_dir, models=tuple(self.only), max_disk_bytes=self.max_disk_bytes,
                         max_memory_bytes=self.max_memory_bytes, estimate=self.estimate)
        status = seed.sync()
        if status.last_error is None:
            self._snapshot = seed.snapshot
            self._verified.update(seed._verified)
            self.status.refused = dict(status.refused)
            self.status.source = f"seed {seed_dir}"
        return status

    def _s3_client(self) -> Any:
        if self._s3 is None:
            import boto3
            from botocore.config import Config

            # A device on a flaky link: fail a sync fast and try again at the next interval.
            self._s3 = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=30,
                                                        retries={"total_max_attempts": 2, "mode": "standard"}))
        return self._s3


def _held_default(snapshot: Snapshot, name: str) -> Held | None:
    if snapshot.manifest is None or name not in snapshot.manifest.models:
        return None
    return snapshot.held.get((name, snapshot.manifest.models[name].default_version))


def _versions(snapshot: Snapshot) -> set[str]:
    return {f"{n}/{v}" for n, v in snapshot.held}


def touch(path: Path) -> None:
    """Mark a cached version as used now (the disk LRU's clock); never fails a request."""
    with contextlib.suppress(OSError):
        os.utime(path.parent)


__all__ = ["EdgeStore", "Held", "Snapshot", "SyncStatus", "session_estimate", "touch"]
