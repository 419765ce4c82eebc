"""Every change to what a model serves, as one atomic manifest write plus an append-only history.

A change (publish, canary, promote, rollback, retire) is a function from a model's entry to its new entry.
:meth:`Registry.apply` reads the manifest and its ETag, applies the function, and writes the new document
with ``If-Match`` on that ETag; when another writer got there first (412), it re-reads and applies the
function again to the fresh entry (the merge: the change is re-validated against what is there now, so a
promote of a version someone just retired is refused rather than lost or resurrected). No update is ever
lost, and every successful write bumps the manifest's ``revision`` by exactly one.

The history is one immutable object per change, ``_history/NAME/<revision>.json`` (``_`` cannot start a
model name, so it never collides with one), holding who, when, the model's state before and after, and
why. The manifest itself carries the record of the change that produced it (``change``), so the history
needs no second atomic write: the writer creates the record right after its commit (``If-None-Match``),
and if it dies in between, the next writer, or anyone reading the history, finds the record in the
manifest. Hence the history always agrees with the manifest, with no gaps, in revision order.

This module ships with the functions (the unattended rollout in AWS promotes and rolls back through it);
uploading artifacts and Triton configs is operator tooling (``tierserve_tools.publishing``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import getpass
import json
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from tierserve.errors import ConflictError, LifecycleError, ManifestError, ModelNotFoundError
from tierserve.lifecycle.objects import ObjectStore, S3Objects
from tierserve.manifest import MANIFEST_FILE, Manifest, ModelEntry, ModelVersion, check_model_name, check_version

HISTORY_PREFIX = "_history"
#: Conditional writes that lose a race are retried this many times (with jitter) before giving up.
MAX_ATTEMPTS = 60

Mutation = Callable[[ModelEntry | None], ModelEntry]


def now_utc(clock: Callable[[], float] = time.time) -> str:
    return dt.datetime.fromtimestamp(clock(), dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def identity(objects: ObjectStore) -> str:
    """Who is making a change: the caller's AWS identity (STS) for an S3 store, else user@host."""
    if isinstance(objects, S3Objects):
        from tierserve import aws

        with contextlib.suppress(Exception):  # no credentials or no STS: fall back to user@host
            sts = aws.client("sts", connect_timeout=3, read_timeout=3, retries={"max_attempts": 1})
            return str(sts.get_caller_identity()["Arn"])
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def state_of(entry: ModelEntry | None) -> dict[str, Any] | None:
    """A model's routing state as the history records it: default, canary and the versions listed."""
    if entry is None:
        return None
    return {"default": entry.default_version, "canary": dict(entry.canary) if entry.canary else None,
            "listed": sorted(entry.listed(), key=int)}


def history_key(name: str, revision: int) -> str:
    return f"{HISTORY_PREFIX}/{name}/{revision:010d}.json"


class Registry:
    """Lifecycle changes against one store. ``actor`` defaults to :func:`identity` (asked once)."""

    def __init__(self, objects: ObjectStore, actor: str | None = None, clock: Callable[[], float] = time.time,
                 max_attempts: int = MAX_ATTEMPTS) -> None:
        self.objects = objects
        self._actor = actor
        self.clock = clock
        self.max_attempts = max_attempts
        self.attempts = 0  # conditional writes tried, for the figures (412s = attempts - changes)

    @property
    def actor(self) -> str:
        if self._actor is None:
            self._actor = identity(self.objects)
        return self._actor

    # --- reading ----------------------------------------------------------------------------------------

    def read(self) -> tuple[Manifest, str | None]:
        """The manifest and its ETag (None: the store has no manifest yet)."""
        got = self.objects.get(MANIFEST_FILE)
        if got is None:
            return Manifest.empty(), None
        return Manifest.loads(got[0]), got[1]

    def manifest(self) -> Manifest:
        return self.read()[0]

    def entry(self, name: str, manifest: Manifest | None = None) -> ModelEntry:
        manifest = manifest or self.manifest()
        check_model_name(name)
        if name in manifest.broken:
            raise ManifestError(f"model {name!r} has an invalid manifest entry: {manifest.broken[name].reason}")
        entry = manifest.models.get(name)
        if entry is None:
            raise ModelNotFoundError(f"no model {name!r} in {self.objects.uri}; models: "
                                     f"{', '.join(sorted(manifest.models)) or 'none'}")
        return entry

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every change to ``name``, oldest first (the manifest's own record included if its object is missing)."""
        check_model_name(name)
        records: dict[int, dict[str, Any]] = {}
        for key in self.objects.list(f"{HISTORY_PREFIX}/{name}"):
            got = self.objects.get(key)
            if got is not None:
                rec = json.loads(got[0])
                records[int(rec["revision"])] = rec
        change = self.manifest().change
        if change and change.get("model") == name:
            records.setdefault(int(change["revision"]), change)
        return [records[r] for r in sorted(records)]

    # --- the one write path -----------------------------------------------------------------------------

    def apply(self, name: str, action: str, mutate: Mutation, why: str = "",
              details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Apply ``mutate`` to ``name``'s entry atomically; returns the history record of the change.

        ``mutate`` raises :class:`LifecycleError` to refuse (it is re-run on every retry, against the
        entry as it is then)."""
        check_model_name(name)
        for attempt in range(self.max_attempts):
            manifest, etag = self.read()
            self._record(manifest.change)  # a writer that died after its commit left its record here
            if name in manifest.broken:
                raise LifecycleError(f"model {name!r} has an invalid manifest entry "
                                     f"({manifest.broken[name].reason}); fix it before changing the model")
            before = manifest.models.get(name)
            after = mutate(before)
            if after == before:  # nothing to change (a publish of what is already there): no revision
                return {"revision": manifest.revision, "model": name, "action": action, "noop": True,
                        "to": state_of(after)}
            record = {"revision": manifest.revision + 1, "model": name, "action": action, "at": now_utc(self.clock),
                      "by": self.actor, "from": state_of(before), "to": state_of(after), "why": why}
            if details:
                record["details"] = details
            new = manifest.with_entry(after, revision=manifest.revision + 1, change=record)
            self.attempts += 1
            try:
                if etag is None:
                    self.objects.put(MANIFEST_FILE, new.dumps().encode(), if_none_match=True)
                else:
                    self.objects.put(MANIFEST_FILE, new.dumps().encode(), if_match=etag)
            except ConflictError:
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** min(attempt, 6))))
                continue
            self._record(record)
            return record
        raise ConflictError(f"gave up on {action} {name} after {self.max_attempts} conflicting writes; "
                            "too many writers at once: try again")

    def _record(self, record: dict[str, Any] | None) -> None:
        if not record:
            return
        key = history_key(str(record["model"]), int(record["revision"]))
        with contextlib.suppress(ConflictError):  # already recorded (by its writer, or by a repair)
            self.objects.put(key, (json.dumps(record, indent=2) + "\n").encode(), if_none_match=True)

    # --- the changes -------------------------------------------------------------------------------------

    def publish(self, mv: ModelVersion, *, promote: bool = False, canary: float | None = None,
                why: str = "") -> dict[str, Any]:
        """Add a version (its artifacts are already in the store). The same content again is accepted
        (and then promoted or canaried if asked); other content under an existing version is refused."""
        published = dataclasses.replace(mv, published_at=now_utc(self.clock), published_by=self.actor,
                                         retired_at="")

        def mutate(entry: ModelEntry | None) -> ModelEntry:
            if entry is None:
                new = ModelEntry(mv.name, mv.version, {mv.version: published})
            else:
                old = entry.versions.get(mv.version)
                if old is not None and _content(old) != _content(mv):
                    raise LifecycleError(
                        f"{mv.name} version {mv.version} is already published with different content; versions "
                        "are immutable: compile a new version")
                if old is not None and old.retired:
                    raise LifecycleError(f"{mv.name} version {mv.version} was retired at {old.retired_at}; "
                                         "compile and publish a new version")
                _check_gpu_signature(entry, mv)
                versions = {**entry.versions, mv.version: old if old is not None and old.published_at else published}
                new = dataclasses.replace(entry, versions=versions)
            if promote:
                new = _promote(new, mv.version, allow_noop=True)
            elif canary is not None:
                new = _canary(new, mv.version, canary)
            return new

        return self.apply(mv.name, "publish", mutate, why, {"version": mv.version, "promote": promote,
                                                            "canary": canary})

    def canary(self, name: str, version: str, percent: float, why: str = "",
               details: dict[str, Any] | None = None) -> dict[str, Any]:
        check_version(version)
        return self.apply(name, "canary", lambda e: _canary(_existing(name, e), version, percent), why,
                          {"version": version, "percent": percent, **(details or {})})

    def promote(self, name: str, version: str, why: str = "", details: dict[str, Any] | None = None) -> dict[str, Any]:
        check_version(version)
        return self.apply(name, "promote", lambda e: _promote(_existing(name, e), version), why,
                          {"version": version, **(details or {})})

    def rollback(self, name: str, to: str | None = None, why: str = "",
                 details: dict[str, Any] | None = None) -> dict[str, Any]:
        """Drop the canary; without one, return the default to ``to`` or to the previous default."""
        if to is not None:
            check_version(to)
        return self.apply(name, "rollback", lambda e: _rollback(_existing(name, e), to), why,
                          {"to": to, **(details or {})})

    def retire(self, name: str, version: str, why: str = "") -> dict[str, Any]:
        check_version(version)
        at = now_utc(self.clock)
        return self.apply(name, "retire", lambda e: _retire(_existing(name, e), version, at), why,
                          {"version": version})


# --- the mutations (pure: entry in, entry out, LifecycleError to refuse) ---------------------------------


def _existing(name: str, entry: ModelEntry | None) -> ModelEntry:
    if entry is None:
        raise ModelNotFoundError(f"no model {name!r} in the store; publish it first (tierserve models publish)")
    return entry


def _listed(entry: ModelEntry, version: str) -> ModelVersion:
    mv = entry.versions.get(version)
    if mv is None or mv.retired:
        listed = ", ".join(sorted(entry.listed(), key=int))
        raise LifecycleError(f"{entry.name} has no published version {version} (listed: {listed}); "
                             "publish it first (tierserve models publish DIR/NAME/VERSION)")
    return mv


def _canary(entry: ModelEntry, version: str, percent: float) -> ModelEntry:
    _listed(entry, version)
    if not 0 < float(percent) <= 100:
        raise LifecycleError(f"canary percent must be in (0, 100], got {percent}; to stop a canary use rollback")
    if version == entry.default_version:
        raise LifecycleError(f"{entry.name} v{version} is already the default; a canary must be another version")
    return dataclasses.replace(entry, canary={"version": version, "percent": _number(percent)})


def _promote(entry: ModelEntry, version: str, allow_noop: bool = False) -> ModelEntry:
    _listed(entry, version)
    canary = entry.canary if entry.canary and str(entry.canary["version"]) != version else None
    if version == entry.default_version:
        if allow_noop or entry.canary != canary:
            return dataclasses.replace(entry, canary=canary)
        raise LifecycleError(f"{entry.name} v{version} is already the default")
    return dataclasses.replace(entry, default_version=version, canary=canary, previous_default=entry.default_version)


def _rollback(entry: ModelEntry, to: str | None) -> ModelEntry:
    if to is None and entry.canary:
        return dataclasses.replace(entry, canary=None)
    target = to or entry.previous_default
    if not target:
        raise LifecycleError(f"{entry.name} has no canary and no previous default to roll back to; "
                             "name one with --to VERSION")
    _listed(entry, target)
    if target == entry.default_version and not entry.canary:
        raise LifecycleError(f"{entry.name} v{target} is already the default and no canary is running")
    return dataclasses.replace(entry, default_version=target, canary=None,
                               previous_default=entry.default_version if target != entry.default_version
                               else entry.previous_default)


def _retire(entry: ModelEntry, version: str, at: str) -> ModelEntry:
    mv = _listed(entry, version)
    if version == entry.default_version:
        raise LifecycleError(f"{entry.name} v{version} is the default; promote another version before retiring it")
    if entry.canary and str(entry.canary["version"]) == version:
        raise LifecycleError(f"{entry.name} v{version} is the canary; roll it back before retiring it")
    previous = None if entry.previous_default == version else entry.previous_default
    return dataclasses.replace(entry, versions={**entry.versions, version: dataclasses.replace(mv, retired_at=at)},
                               previous_default=previous)


def _content(mv: ModelVersion) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {k: (v.sha256, tuple(e.sha256 for e in v.external_data)) for k, v in mv.variants.items()}


def _check_gpu_signature(entry: ModelEntry, mv: ModelVersion) -> None:
    """Triton serves every version of a model under ONE config.pbtxt: a GPU version whose inputs, outputs or
    max_batch_size differ from a listed GPU version's cannot be served beside it."""
    if not mv.serves_gpu:
        return
    for other in entry.listed().values():
        if other.version != mv.version and other.serves_gpu and other.signature() != mv.signature():
            raise LifecycleError(
                f"{mv.name} v{mv.version} has other inputs, outputs or max_batch_size than v{other.version}, and "
                "the GPU tier serves all listed versions of a model under one Triton config; retire "
                f"v{other.version} first, or publish the new signature under another model name")


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)
