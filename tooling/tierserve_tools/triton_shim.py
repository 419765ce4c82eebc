"""Generic Triton Python-backend ``model.py`` that serves a ``model.onnx`` with onnxruntime (CPU).

LOCAL DEVELOPMENT ONLY. A production GPU repository uses ``platform: "onnxruntime_onnx"`` (the
onnxruntime backend with the CUDA/TensorRT execution providers). The ``tritonserver`` binary
bundled in the ``nvidia-pytriton`` wheel has no onnxruntime backend and there is no GPU here, so
``tierserve_tools.triton.build_local_repository`` copies this file next to each ``model.onnx``
as ``model.py``. It serves the same ONNX file, with the same tensor names, datatypes, shapes,
``max_batch_size`` and dynamic batching, through the Python backend on the CPU execution provider.

Dynamic batching is real: when Triton hands ``execute`` several requests of one dynamic batch,
their inputs are concatenated along dim 0, the session runs once, and the outputs are split back
per request. Requests whose non-batch dimensions differ fall back to one run per request.

This file runs inside Triton's Python-backend stub, not in the tierserve package: it must import
nothing from tierserve. The stub's interpreter does not see the virtualenv, so ``initialize``
appends the paths in the ``tierserve_site_packages`` config parameter to ``sys.path``
(``os.pathsep``-separated) before importing numpy and onnxruntime.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

SITE_PACKAGES_PARAM = "tierserve_site_packages"
THREADS_PARAM = "tierserve_ort_threads"

pb_utils: Any = None  # triton_python_backend_utils, imported in initialize()
np: Any = None  # numpy, imported in initialize() once sys.path is set


def _param(cfg: dict, key: str) -> str | None:
    value = (cfg.get("parameters") or {}).get(key)
    if isinstance(value, dict):
        return value.get("string_value")
    return None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        global pb_utils, np
        cfg = json.loads(args["model_config"])
        for path in (_param(cfg, SITE_PACKAGES_PARAM) or "").split(os.pathsep):
            if path and path not in sys.path:
                sys.path.append(path)
        import numpy
        import onnxruntime as ort
        import triton_python_backend_utils

        pb_utils = triton_python_backend_utils
        np = numpy

        model_dir = os.path.join(args["model_repository"], args["model_version"])
        opts = ort.SessionOptions()
        threads = int(_param(cfg, THREADS_PARAM) or 0)
        if threads > 0:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.path.join(model_dir, "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.batching = int(cfg.get("max_batch_size", 0)) > 0
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in cfg["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in cfg["output"]]
        self.ort_string_inputs = {i.name for i in self.session.get_inputs() if i.type == "tensor(string)"}

    # --- helpers -------------------------------------------------------------------------------

    def _feeds(self, request) -> dict:
        feeds = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input {name!r} is missing")
            arr = tensor.as_numpy()
            if name in self.ort_string_inputs:
                arr = np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v), otypes=[object])(
                    arr
                )
            elif arr.dtype != dtype and dtype != np.object_:
                arr = arr.astype(dtype)
            feeds[name] = arr
        return feeds

    def _run(self, feeds: dict) -> list:
        names = [name for name, _ in self.outputs]
        return self.session.run(names, feeds)

    def _response(self, request, results: list):
        wanted = None
        with contextlib.suppress(Exception):
            wanted = set(request.requested_output_names()) or None
        tensors = []
        for (name, dtype), value in zip(self.outputs, results, strict=True):
            if wanted is not None and name not in wanted:
                continue
            if dtype == np.object_:
                value = np.array(
                    [v.encode("utf-8") if isinstance(v, str) else v for v in np.asarray(value).ravel()],
                    dtype=np.object_,
                ).reshape(np.shape(value))
            else:
                value = np.ascontiguousarray(value, dtype=dtype)
            tensors.append(pb_utils.Tensor(name, value))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _error(self, exc: Exception):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(f"onnxruntime failed: {type(exc).__name__}: {exc}")
        )

    def _run_one(self, request):
        try:
            return self._response(request, self._run(self._feeds(request)))
        except Exception as exc:
            return self._error(exc)

    def _run_batched(self, requests: list):
        """One session run for the whole dynamic batch, or None when the requests can't be stacked."""
        try:
            feeds_list = [self._feeds(r) for r in requests]
        except Exception:
            return None
        rows = []
        for feeds in feeds_list:
            first = next(iter(feeds.values()), None)
            if first is None or first.ndim == 0:
                return None
            n = first.shape[0]
            if any(a.ndim == 0 or a.shape[0] != n for a in feeds.values()):
                return None
            rows.append(n)
        for name in feeds_list[0]:
            tail = feeds_list[0][name].shape[1:]
            if any(f[name].shape[1:] != tail for f in feeds_list):
                return None
        stacked = {name: np.concatenate([f[name] for f in feeds_list], axis=0) for name in feeds_list[0]}
        try:
            results = self._run(stacked)
        except Exception:
            return None  # let each request report its own error
        total = sum(rows)
        if any(np.ndim(r) == 0 or np.shape(r)[0] != total for r in results):
            return None
        bounds = np.cumsum(rows)[:-1]
        per_request = [np.split(np.asarray(r), bounds, axis=0) for r in results]
        responses = []
        for i, request in enumerate(requests):
            try:
                responses.append(self._response(request, [parts[i] for parts in per_request]))
            except Exception as exc:
                responses.append(self._error(exc))
        return responses

    # --- Triton entry points ---------------------------------------------------------------------

    def execute(self, requests: list) -> list:
        if self.batching and len(requests) > 1:
            responses = self._run_batched(requests)
            if responses is not None:
                return responses
        return [self._run_one(r) for r in requests]

    def finalize(self) -> None:
        self.session = None
