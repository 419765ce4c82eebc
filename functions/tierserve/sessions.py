"""The onnxruntime session factory: one cached InferenceSession per verified artifact.

onnxruntime is imported here and only here on the serving path, the first time a session is
built, so the router (which never runs a model itself in AWS) does not pay for it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from tierserve.errors import ArtifactError

_lock = threading.Lock()
_sessions: dict[tuple[str, int], Any] = {}


def session_options(threads: int) -> Any:
    """Options tuned for Lambda: intra-op threads per vCPU, one inter-op thread, no spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning burns the vCPU that Lambda bills for between requests; turn it off.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def get_session(path: Path, digest: str, threads: int) -> Any:
    """The cached session for this artifact, keyed by its content digest (``Variant.digest``), built on first use."""
    key = (digest, threads)
    sess = _sessions.get(key)
    if sess is not None:
        return sess
    with _lock:
        sess = _sessions.get(key)
        if sess is None:
            import onnxruntime as ort

            try:
                sess = ort.InferenceSession(
                    str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ArtifactError(f"onnxruntime cannot load {path.name}: {exc}; recompile the model") from exc
            _sessions[key] = sess
        return sess


def is_cached(digest: str, threads: int) -> bool:
    return (digest, threads) in _sessions


def evict_sessions(digests: set[str]) -> None:
    """Drop the sessions of models no longer served (a request holding one keeps it until it is done)."""
    with _lock:
        for key in [k for k in _sessions if k[0] in digests]:
            del _sessions[key]


def clear_sessions() -> None:
    with _lock:
        _sessions.clear()
