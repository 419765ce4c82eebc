"""The CPU tier's backend: onnxruntime in this process, on a verified artifact."""

from __future__ import annotations

from typing import Any

from tierserve.errors import InferenceError, InvalidRequestError
from tierserve.manifest import ModelVersion
from tierserve.settings import Settings
from tierserve.store import ModelStore
from tierserve.types import InferRequest, InferResponse


class OnnxBackend:
    tier = "cpu"

    def __init__(self, store: ModelStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def session(self, model: ModelVersion) -> Any:
        from tierserve.sessions import get_session

        variant = model.cpu_artifact
        path = self.store.fetch(variant)
        return get_session(path, variant.sha256, self.settings.intra_op_threads)

    def run_arrays(self, model: ModelVersion, feeds: dict[str, Any], output_names: list[str] | None = None) -> dict:
        """Run raw numpy feeds; return {output name: array}. The batch path uses this directly."""
        sess = self.session(model)
        names = output_names or [o.name for o in sess.get_outputs()]
        try:
            results = sess.run(names, feeds)
        except Exception as exc:
            msg = str(exc)
            if "INVALID_ARGUMENT" in msg or "Invalid rank" in msg or "Got invalid dimensions" in msg:
                raise InvalidRequestError(f"model {model.name!r} rejected the inputs: {msg}") from exc
            raise InferenceError(f"model {model.name!r} v{model.version} failed to run: {msg}") from exc
        return dict(zip(names, results, strict=True))

    def infer(self, model: ModelVersion, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        from tierserve.codec import tensor_from_numpy

        feeds = {t.name: t.data for t in request.inputs}
        wanted = [o.name for o in request.outputs] or None
        arrays = self.run_arrays(model, feeds, wanted)
        return InferResponse(
            model_name=model.name,
            model_version=model.version,
            id=request.id,
            outputs=[tensor_from_numpy(name, arr) for name, arr in arrays.items()],
        )

    def ready(self, model: ModelVersion | None = None) -> bool:
        if model is None:
            return True
        try:
            self.session(model)
            return True
        except Exception:
            return False
