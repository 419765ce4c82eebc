"""The edge tier's backend: onnxruntime on the device, over the versions the EdgeStore holds.

It is the CPU tier's :class:`~tierserve.backends.onnx.OnnxBackend` (same run, same error mapping: an
input onnxruntime refuses is a 400, a failed run an InferenceError) with two differences a device needs:
it loads the version's *edge* variant, and only one the device holds (verified by the last sync); and
its sessions live in a pool bounded by an estimated memory budget, least recently used evicted first
(an evicted session is rebuilt from the verified cache when it is needed again).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from tierserve.backends.onnx import OnnxBackend
from tierserve.edge.store import EdgeStore, Held, session_estimate, touch
from tierserve.errors import ArtifactError, BackendUnavailableError
from tierserve.manifest import ModelVersion
from tierserve.tiers import Tier


class SessionPool:
    """onnxruntime sessions keyed by the variant's digest (all of its files), bounded by ``max_bytes`` of estimated
    memory (LRU)."""

    def __init__(self, max_bytes: int, threads: int) -> None:
        self.max_bytes = max_bytes
        self.threads = threads
        self._sessions: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._sessions.values())

    def loaded(self) -> list[str]:
        return list(self._sessions)

    def get(self, held: Held) -> Any:
        with self._lock:
            entry = self._sessions.get(held.digest)
            if entry is not None:
                self._sessions.move_to_end(held.digest)
                return entry[0]
        with self._build_lock:  # one build at a time: a device has few cores and little memory
            with self._lock:
                entry = self._sessions.get(held.digest)
                if entry is not None:
                    return entry[0]
            session = self._build(held)
            size = session_estimate(held.size_bytes)
            with self._lock:
                while self._sessions and self.used_bytes + size > self.max_bytes:
                    self._sessions.popitem(last=False)
                    self.evictions += 1
                self._sessions[held.digest] = (session, size)
            touch(held.path)
            return session

    def _build(self, held: Held) -> Any:
        import onnxruntime as ort

        from tierserve.sessions import session_options

        try:
            return ort.InferenceSession(str(held.path), sess_options=session_options(self.threads),
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"onnxruntime cannot load {held.model.name} v{held.model.version} "
                                f"({held.model.edge_artifact.path}): {exc}; recompile the model") from exc

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()


class EdgeBackend(OnnxBackend):
    tier = Tier.EDGE

    def __init__(self, store: EdgeStore, threads: int, max_memory_bytes: int) -> None:
        super().__init__(store, threads)
        self.edge_store = store
        self.pool = SessionPool(max_memory_bytes, threads)

    def session(self, model: ModelVersion) -> Any:
        held = self.edge_store.held(model)
        if held is None:
            raise BackendUnavailableError(f"model {model.name!r} v{model.version} is not held by this edge device",
                                          retry_after_s=5)
        return self.pool.get(held)

    def ready(self, model: ModelVersion | None = None) -> bool:
        if model is None:
            return True
        if self.edge_store.held(model) is None:
            return False
        return super().ready(model)
