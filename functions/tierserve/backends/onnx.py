"""The CPU tier's backend: onnxruntime in this process, on a verified artifact."""

from __future__ import annotations

import time
from typing import Any

from tierserve import telemetry
from tierserve.backends.base import is_input_error
from tierserve.calls import InferenceCall, Reply
from tierserve.errors import InferenceError, InvalidRequestError
from tierserve.manifest import ModelVersion
from tierserve.store import ModelStore
from tierserve.types import InferResponse


class OnnxBackend:
    tier = "cpu"

    def __init__(self, store: ModelStore, threads: int = 1) -> None:
        self.store = store
        self.threads = threads

    def session(self, model: ModelVersion) -> Any:
        from tierserve.sessions import get_session, is_cached

        variant = model.cpu_artifact
        if is_cached(variant.sha256, self.threads):
            return get_session(self.store.fetch(variant), variant.sha256, self.threads)
        t0 = time.perf_counter()  # a cold model: fetched (verified) and loaded, timed as ModelLoadTime
        sess = get_session(self.store.fetch(variant), variant.sha256, self.threads)
        telemetry.model_loaded(model.name, model.version, (time.perf_counter() - t0) * 1000)
        return sess

    def run(self, model: ModelVersion, feeds: dict[str, Any], output_names: list[str] | None = None) -> dict:
        """Run numpy feeds; return {output name: array}."""
        sess = self.session(model)
        names = output_names or [o.name for o in sess.get_outputs()]
        try:
            results = sess.run(names, feeds)
        except Exception as exc:
            msg = str(exc)
            if is_input_error(msg):
                raise InvalidRequestError(f"model {model.name!r} rejected the inputs: {msg}") from exc
            raise InferenceError(f"model {model.name!r} v{model.version} failed to run: {msg}") from exc
        return dict(zip(names, results, strict=True))

    def infer(self, model: ModelVersion, call: InferenceCall, timeout_s: float | None = None) -> Reply:
        from tierserve.codec import check_values, tensor_from_numpy

        request = call.request()
        check_values(request, model)
        arrays = self.run(model, {t.name: t.data for t in request.inputs}, [o.name for o in request.outputs] or None)
        return Reply(InferResponse(
            model_name=model.name,
            model_version=model.version,
            id=request.id,
            outputs=[tensor_from_numpy(name, arr) for name, arr in arrays.items()],
        ))

    def ready(self, model: ModelVersion | None = None) -> bool:
        if model is None:
            return True
        try:
            self.session(model)
            return True
        except Exception:
            return False
