"""External data: ONNX tensors kept in files next to the ``.onnx`` (models over 2 GB must do this).

Every file the compiler publishes must be verifiable by the runtime, so the rules are:

* a SOURCE's locations are checked before anything opens them (:func:`check_source`): no NUL byte,
  absolute path, ``..`` or symbolic link leaving the model's folder, in initializers, ``Constant``
  nodes and subgraphs alike (the same wire-format scan the runtime uses, ``tierserve.onnx_scan``);
* each variant that keeps external data is re-saved with all of it in one file named after the
  variant, ``<file>.data`` (:func:`consolidate`), so that no source-chosen name reaches the store;
* :func:`locations` lists what a variant reads, for publishing (sha256 and size in the manifest) and
  for the Triton repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tierserve_compiler.errors import SourceError, require


def locations(model: Path) -> list[str]:
    """The external-data files ``model`` reads, relative to its folder, each once, in graph order."""
    from tierserve.onnx_scan import external_data_locations

    return list(dict.fromkeys(loc for _, loc in external_data_locations(Path(model).read_bytes())))


def check_source(model: Path) -> list[str]:
    """Refuse a SOURCE ``.onnx`` whose external data could reach outside its folder; returns the locations."""
    from tierserve.onnx_scan import ScanError, external_data_locations, unsafe_location

    folder = model.resolve().parent
    try:
        found = external_data_locations(model.read_bytes())
    except ScanError as exc:
        raise SourceError(f"{model} is not a readable ONNX model ({exc}); re-export it") from exc
    for tensor, loc in found:
        reason = unsafe_location(loc)
        target = None if reason else folder / loc
        if target is not None and not target.resolve().is_relative_to(folder):
            reason = "is a symbolic link that leaves the model's folder"
        elif target is not None and not target.resolve().is_file():
            reason = "does not exist next to the model (or is not a regular file)"
        if reason:
            raise SourceError(
                f"{model}: tensor {tensor!r} points at external data {loc!r}, which {reason}; refusing to read it. "
                "Keep external data files next to the .onnx file, named by plain relative paths"
            )
    return list(dict.fromkeys(loc for _, loc in found))


def save_external(proto: Any, model: Path) -> list[str]:
    """Save ``proto`` as ``model`` with every tensor's data in ``<model file>.data`` beside it.

    Threshold 0: a model that came with external data keeps all of it external, whatever its size.
    """
    onnx = require("onnx", "compiler")
    name = f"{model.name}.data"
    (model.parent / name).unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(
        proto, str(model), save_as_external_data=True, all_tensors_to_one_file=True, location=name, size_threshold=0
    )
    return locations(model)


def consolidate(model: Path) -> list[str]:
    """Re-save ``model`` with all its external data in ``<model file>.data`` (no-op without any).

    Returns the files it now reads.
    """
    if not locations(model):
        return []
    onnx = require("onnx", "compiler")
    return save_external(onnx.load(str(model)), model)  # onnx.load reads the external data into memory
