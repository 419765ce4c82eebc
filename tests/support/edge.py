"""Edge test helpers: a store folder with models placed on the edge (and not), and manifest edits."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.fakes import write_linear
from tierserve.manifest import Manifest

EDGE = ("edge", "cpu")


def set_canary(root: Path, name: str, version: str | None, percent: float = 50.0) -> None:
    """Point ``name``'s canary at ``version`` (None: none) in root/manifest.json, as `tierserve models canary` would."""
    path = root / "manifest.json"
    doc = json.loads(path.read_text())
    if version is None:
        doc["models"][name].pop("canary", None)
    else:
        doc["models"][name]["canary"] = {"version": version, "percent": percent}
    Manifest.from_json(doc)  # still valid
    path.write_text(json.dumps(doc))


def set_default(root: Path, name: str, version: str) -> None:
    path = root / "manifest.json"
    doc = json.loads(path.read_text())
    doc["models"][name]["default_version"] = version
    path.write_text(json.dumps(doc))


def write_edge_store(root: Path) -> Path:
    """'lin' v1 on the edge (with the cloud CPU beside it), 'cpu-only' and 'gpu-only' not on the edge."""
    write_linear(root, "lin", "1", seed=1, targets=EDGE)
    write_linear(root, "cpu-only", "1", seed=2, targets=("cpu",))
    write_linear(root, "gpu-only", "1", seed=3, targets=("gpu",))
    return root


@contextlib.contextmanager
def synced_edge(max_payload_bytes: int, **settings: Any) -> Iterator[Any]:
    """A started ``tierserve edge`` runtime (no sync loop) after one sync; stopped on exit."""
    from tierserve.edge.runtime import EdgeRuntime
    from tierserve.edge.settings import EdgeSettings
    from tierserve.settings import Settings

    rt = EdgeRuntime(EdgeSettings(**settings), Settings(max_payload_bytes=max_payload_bytes)).start(sync=False)
    rt.sync()
    try:
        yield rt
    finally:
        rt.stop()
