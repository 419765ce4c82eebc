"""The CPU tier's backend: onnxruntime in this process, on a verified artifact."""

from __future__ import annotations

import time
from typing import Any

from tierserve import telemetry
from tierserve.backends.base import Readiness, is_input_error, ready_by
from tierserve.errors import InferenceError, InvalidRequestError, TierserveError
from tierserve.manifest import ModelVersion
from tierserve.protocol.calls import InferenceCall, Reply
from tierserve.protocol.messages import InferResponse
from tierserve.store import ModelStore
from tierserve.tiers import Tier

#: How long a failed readiness check is remembered before the model is tried again.
READY_RETRY_S = 5.0


class OnnxBackend:
    tier = Tier.CPU

    def __init__(self, store: ModelStore, threads: int = 1) -> None:
        self.store = store
        self.threads = threads
        self.readiness = Readiness(ok_ttl_s=None, retry_s=READY_RETRY_S)

    def session(self, model: ModelVersion) -> Any:
        from tierserve.sessions import get_session, is_cached

        variant = model.cpu_artifact
        key = variant.digest  # all of its files: versions sharing a model.onnx with other weights are apart
        if is_cached(key, self.threads):
            return get_session(self.store.fetch(variant), key, self.threads)
        t0 = time.perf_counter()  # a cold model: fetched (verified) and loaded, timed as ModelLoadTime
        sess = get_session(self.store.fetch(variant), key, self.threads)
        telemetry.model_loaded(model.name, model.version, (time.perf_counter() - t0) * 1000)
        return sess

    def run(self, model: ModelVersion, feeds: dict[str, Any], output_names: list[str] | None = None) -> dict:
        """Run numpy feeds; return {output name: array}."""
        sess = self.session(model)
        names = output_names or [o.name for o in sess.get_outputs()]
        feeds = {k: _ort_strings(k, v) if getattr(getattr(v, "dtype", None), "kind", "") == "O" else v
                 for k, v in feeds.items()}
        try:
            results = sess.run(names, feeds)
        except Exception as exc:
            msg = str(exc)
            if is_input_error(msg):
                raise InvalidRequestError(f"model {model.name!r} rejected the inputs: {msg}") from exc
            raise InferenceError(f"model {model.name!r} v{model.version} failed to run: {msg}") from exc
        return dict(zip(names, results, strict=True))

    def infer(self, model: ModelVersion, call: InferenceCall, timeout_s: float | None = None) -> Reply:
        from tierserve.protocol.tensors import check_values, tensor_from_numpy

        request = call.request()
        check_values(request, model)
        arrays = self.run(model, {t.name: t.data for t in request.inputs}, [o.name for o in request.outputs] or None)
        return Reply(InferResponse(
            model_name=model.name,
            model_version=model.version,
            id=request.id,
            outputs=[tensor_from_numpy(name, arr) for name, arr in arrays.items()],
        ))

    def check_ready(self, model: ModelVersion) -> None:
        """Raise what keeps ``model`` from serving: it must be fetched and verified, load, and run the
        smallest request it takes. Success is remembered for the artifact (content-addressed: it cannot
        change); a failure is retried after ``READY_RETRY_S``. An input error from the probe still
        means the model loaded and ran its checks."""
        from tierserve.protocol.tensors import probe_request

        if model.generative:  # a causal LM with its KV cache: ready means onnxruntime-genai loads it
            self.readiness.check(model.cpu_artifact.digest, lambda: self._genai_probe(model))
            return

        def probe() -> TierserveError | None:
            try:
                request = probe_request(model)
                self.run(model, {t.name: t.data for t in request.inputs})
            except InvalidRequestError:
                pass
            except TierserveError as exc:
                return exc
            except Exception as exc:  # a bug must not make readiness raise
                return InferenceError(f"model {model.name!r} v{model.version} failed its readiness run: {exc}")
            return None

        self.readiness.check(model.cpu_artifact.digest, probe)

    def _genai_probe(self, model: ModelVersion) -> TierserveError | None:
        """A text-generation model's readiness: its folder fetched and verified, loaded by onnxruntime-genai
        (its graph takes input ids and a KV cache, which the tensor probe cannot feed)."""
        try:
            from tierserve.generation import engine

            engine.load(self.store.fetch(model.cpu_artifact).parent, self.threads)
        except TierserveError as exc:
            return exc
        except Exception as exc:  # a bug must not make readiness raise
            return InferenceError(f"model {model.name!r} v{model.version} failed to load in onnxruntime-genai: {exc}")
        return None

    def ready(self, model: ModelVersion | None = None) -> bool:
        return ready_by(self.check_ready, model)


def _ort_strings(name: str, arr: Any) -> Any:
    """BYTES elements as ``str`` for onnxruntime: its Python binding reads a tensor(string) element from a
    ``str`` (encoded as UTF-8) and silently mistakes a ``bytes`` object for something else (a LabelEncoder
    then maps every key to its default). Text that is not UTF-8 cannot reach a string input unchanged:
    the client's error, said as such."""
    import numpy as np

    flat = arr.ravel()
    out = np.empty(flat.shape, dtype=object)
    for i, x in enumerate(flat):
        if isinstance(x, bytes | bytearray):
            try:
                out[i] = bytes(x).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRequestError(
                    f"input {name!r}: BYTES element {i} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                    "onnxruntime's string tensors hold UTF-8: send text, or a model that takes uint8") from None
        else:
            out[i] = x
    return out.reshape(arr.shape)
