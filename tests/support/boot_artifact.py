"""A one-file Lambda artifact for the isolated boot programs (``tierserve_tools.artifact.BOOT`` and the
generation cold-start bench's ``GENERATE_BOOT``, both starting with ``artifact.BOOT_PRELUDE``).

Why here: the artifact tests and the cold-start bench's tests run their handlers the same way, from an
artifact folder (``task``) and an empty stand-in for Lambda's runtime folder beside it."""

from __future__ import annotations

from pathlib import Path


def one_file_artifact(root: Path, source: str, module: str = "app") -> tuple[Path, Path]:
    """``root/task/<module>.py`` holding ``source``, and an empty ``root/runtime``: (task, runtime)."""
    task, runtime = root / "task", root / "runtime"
    task.mkdir()
    runtime.mkdir()
    (task / f"{module}.py").write_text(source)
    return task, runtime
