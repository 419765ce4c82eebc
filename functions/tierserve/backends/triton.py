"""The GPU tier: NVIDIA Triton Inference Server over KServe v2 HTTP or gRPC.

Cold start: this module imports neither numpy nor tritonclient at import time; they are imported
on the first call.

Connections are reused across warm invocations:

* ``protocol="grpc"``: one ``tritonclient.grpc.InferenceServerClient`` shared by all threads
  (the gRPC client is thread-safe).
* ``protocol="http"``: ``tritonclient.http.InferenceServerClient`` is built on gevent and is NOT
  thread-safe, so each thread gets its own clients (``threading.local``). Its timeouts are fixed at
  construction, so each thread keeps one client per *timeout bucket* (see below).

Every call to Triton (inference, each part of a split batch, readiness probes) runs on one fixed
pool of long-lived threads (``CALL_THREADS``), never on the caller's thread. Why: the HTTP client
is per thread, and each one holds a gevent hub (an epoll and an eventfd descriptor) that outlives its
thread; a thread-per-connection server (API Gateway's emulator) would leak two descriptors per
connection and run out of them. The pool bounds the clients to its threads.

Timeouts, honestly:

* A call has one deadline: ``min(timeout_s argument, configured timeout_s)`` from when it starts.
  The caller waits on the pool for at most that long, whatever the transport does, so a frozen
  server (SIGSTOP: connections accepted, nothing answered) costs a request its budget and no more;
  the parts of a split batch share it, and a part that could not start in time is a timeout too.
  A budget of zero or less fails at once with ``BackendTimeoutError`` without touching the network.
* gRPC: the remaining time is also the call's end-to-end ``client_timeout``.
* HTTP: geventhttpclient's ``connection_timeout`` and ``network_timeout`` bound each socket
  operation with the largest bucket in ``HTTP_TIMEOUT_BUCKETS`` not above the remaining time, so a
  pool thread whose caller gave up is free again soon after.
* Both: the remaining budget is also sent to Triton as the request's server-side ``timeout``
  (microseconds). Triton honours it only for models with dynamic batching (a request still queued
  after the deadline is rejected); it does not interrupt a running execution.

Generation (issue 18): :meth:`TritonBackend.generate` streams a generative model's tokens from the decoupled
model (the vLLM backend in production, its local stand-in here) over Triton's ``generate_stream`` (server-sent
events on the HTTP port; ``tierserve.backends.generate_stream`` builds the body and reads the events), or over
gRPC's bidirectional ``ModelStreamInfer`` when ``TRITON_PROTOCOL=grpc``. It runs on the caller's thread, one
connection per generation (a stream holds it for its whole length): each wait for bytes is bounded by the
configured timeout (the time to first token, then between tokens) and the whole stream by the request's
deadline; closing the stream (the client went away) closes the connection, which Triton passes on to the
model as a cancellation.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from tierserve.backends.base import is_input_error, shared_pool
from tierserve.backends.split import max_batch_bounds, run_parts
from tierserve.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigurationError,
    InferenceError,
    InvalidRequestError,
    TierserveError,
)
from tierserve.manifest import ModelVersion
from tierserve.protocol.calls import InferenceCall, Reply
from tierserve.protocol.messages import InferRequest, InferResponse, Tensor
from tierserve.tiers import Tier

if TYPE_CHECKING:
    from tierserve.generation.events import GenerationEvent
    from tierserve.generation.requests import GenerationRequest

#: Timeout values (seconds) the HTTP clients are built with; budgets are rounded down to one of them.
HTTP_TIMEOUT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

_UNAVAILABLE_HINTS = ("unknown model", "is not found", "not ready", "unavailable", "is not loaded", "no model")
_TIMEOUT_HINTS = ("timeout", "timed out", "deadline")


def _bucket(timeout_s: float, configured_s: float) -> float:
    if timeout_s >= configured_s:
        return configured_s
    below = [b for b in HTTP_TIMEOUT_BUCKETS if b <= timeout_s]
    return below[-1] if below else HTTP_TIMEOUT_BUCKETS[0]


def _grpc_channel_args() -> list[tuple[str, Any]]:
    """tritonclient's default channel options, plus fast reconnects.

    By default a gRPC channel that lost its server backs off reconnecting for up to 2 minutes,
    and channels to the same target share subchannels (and their backoff) process-wide, so a
    restarted Triton stays "unavailable" long after it is back. A private subchannel pool and a
    short reconnect backoff make the next call after a restart reach the new server.
    """
    int32_max = 2**31 - 1
    return [
        ("grpc.max_send_message_length", int32_max),
        ("grpc.max_receive_message_length", int32_max),
        ("grpc.keepalive_time_ms", int32_max),
        ("grpc.keepalive_timeout_ms", 20000),
        ("grpc.keepalive_permit_without_calls", False),
        ("grpc.http2.max_pings_without_data", 2),
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def _split_url(url: str, protocol: str) -> tuple[str, bool]:
    """``host:port`` for tritonclient, and whether to use TLS (``https://`` / ``grpcs://``)."""
    url = url.strip().rstrip("/")
    ssl = False
    for scheme in ("https://", "grpcs://"):
        if url.startswith(scheme):
            url, ssl = url[len(scheme) :], True
    for scheme in ("http://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme) :]
    if not url:
        raise ConfigurationError("TRITON_URL is empty: set it to host:port of the Triton server")
    if "/" in url:
        raise ConfigurationError(f"TRITON_URL {url!r} must be host:port (no path)")
    return url, ssl


def map_exception(exc: BaseException, what: str) -> TierserveError:
    """Translate a tritonclient / transport exception into a tierserve error (never leaks it)."""
    if isinstance(exc, TierserveError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    status = None
    message = str(exc)
    if hasattr(exc, "status") and hasattr(exc, "message") and callable(exc.status):
        try:
            status = exc.status()
            message = exc.message() or message
        except Exception:  # noqa: S110 - best effort introspection
            pass
    status_s = str(status or "")
    low = message.lower()

    if status_s:
        if status_s in ("StatusCode.DEADLINE_EXCEEDED", "504", "408") or (
            status_s in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED") and "timeout" in low
        ):
            return BackendTimeoutError(f"Triton did not answer {what} in time: {message}")
        if status_s in ("StatusCode.UNAVAILABLE", "503", "502"):
            return BackendUnavailableError(f"Triton is unreachable for {what}: {message}")
        if status_s in ("StatusCode.NOT_FOUND", "404") or any(h in low for h in _UNAVAILABLE_HINTS):
            return BackendUnavailableError(f"Triton cannot serve {what}: {message}")
        if status_s in ("StatusCode.INVALID_ARGUMENT", "400", "StatusCode.OUT_OF_RANGE") or is_input_error(message):
            # Triton's onnxruntime backend answers 500 "onnx runtime error 2: ..." for a bad input: the
            # message, not the status, says it was the request's fault (never a tier failure)
            return InvalidRequestError(f"Triton rejected {what}: {message}")
        return InferenceError(f"Triton failed to run {what}: {message}")

    # Transport-level errors (geventhttpclient / sockets) and client-side errors without a status.
    if (
        isinstance(exc, TimeoutError)
        or "timeout" in type(exc).__name__.lower()
        or any(h in low for h in _TIMEOUT_HINTS)
    ):
        return BackendTimeoutError(f"Triton did not answer {what} in time ({text})")
    if isinstance(exc, (ConnectionError, OSError, EOFError)) or any(
        h in low for h in ("connection refused", "failed to connect", "connection reset", "unreachable")
    ):
        return BackendUnavailableError(f"Triton is unreachable for {what} ({text})")
    return InferenceError(f"Triton call for {what} failed ({text})")


class TritonBackend:
    """A Backend that forwards requests to Triton (see the module docstring for the guarantees)."""

    tier = Tier.GPU

    def __init__(self, url: str, protocol: str = "http", timeout_s: float = 10.0, ready_timeout_s: float = 1.0) -> None:
        if protocol not in ("http", "grpc"):
            raise ConfigurationError(f"TRITON_PROTOCOL must be 'http' or 'grpc', not {protocol!r}")
        if timeout_s <= 0:
            raise ConfigurationError(f"Triton timeout must be positive, not {timeout_s!r}")
        self.url, self._ssl = _split_url(url, protocol)
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self.ready_timeout_s = min(float(ready_timeout_s), self.timeout_s)
        self._local = threading.local()
        self._grpc: Any = None
        self._grpc_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> TritonBackend:
        return cls(settings.triton_url, settings.triton_protocol, settings.triton_timeout_s)

    def __repr__(self) -> str:
        return f"TritonBackend({self.url!r}, protocol={self.protocol!r}, timeout_s={self.timeout_s})"

    # --- clients ---------------------------------------------------------------------------------

    def _http_client(self, timeout_s: float) -> Any:
        bucket = _bucket(timeout_s, self.timeout_s)
        clients: dict[float, Any] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(bucket)
        if client is None:
            import tritonclient.http as httpclient

            client = httpclient.InferenceServerClient(
                self.url,
                concurrency=1,
                connection_timeout=bucket,
                network_timeout=bucket,
                ssl=self._ssl,
            )
            clients[bucket] = client
        return client

    def _drop_http_client(self, timeout_s: float) -> None:
        """Forget this thread's client after a transport error (its connection may be broken)."""
        clients = getattr(self._local, "clients", None) or {}
        client = clients.pop(_bucket(timeout_s, self.timeout_s), None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _grpc_client(self) -> Any:
        client = self._grpc
        if client is None:
            with self._grpc_lock:
                client = self._grpc
                if client is None:
                    import tritonclient.grpc as grpcclient

                    client = self._grpc = grpcclient.InferenceServerClient(
                        self.url, ssl=self._ssl, channel_args=_grpc_channel_args()
                    )
        return client

    def _discard_grpc(self, client: Any) -> None:
        """Forget a shared gRPC client whose channel failed (it would sit in reconnect backoff for
        up to minutes after a Triton restart); the next call opens a fresh channel. It is not
        closed here: other threads may still be using it, and it closes when they let go."""
        with self._grpc_lock:
            if self._grpc is client:
                self._grpc = None

    def close(self) -> None:
        """Close the shared gRPC client and this thread's HTTP clients."""
        for client in (getattr(self._local, "clients", None) or {}).values():
            with contextlib.suppress(Exception):
                client.close()
        self._local.clients = {}
        with self._grpc_lock:
            if self._grpc is not None:
                with contextlib.suppress(Exception):
                    self._grpc.close()
                self._grpc = None

    def _effective_timeout(self, timeout_s: float | None) -> float:
        t = self.timeout_s if timeout_s is None else min(float(timeout_s), self.timeout_s)
        if t <= 0:
            raise BackendTimeoutError("no time left in the request's budget to call Triton")
        return t

    # --- Backend ---------------------------------------------------------------------------------

    def infer(self, model: ModelVersion, call: InferenceCall, timeout_s: float | None = None) -> Reply:
        """Run ``call`` on Triton within one deadline, on the call pool. A batch over the model's
        ``max_batch_size`` (which Triton would refuse) is split along dim 0 into sub-batches that run
        concurrently, so Triton's dynamic batcher can pack them, and the outputs are concatenated back in
        order (``tierserve.backends.split``)."""
        request = call.request()
        deadline = time.monotonic() + self._effective_timeout(timeout_s)
        bounds = max_batch_bounds(request.rows, model.max_batch_size, all(t.shape for t in request.inputs))
        what = f"model {model.name!r} version {model.version!r}"
        return Reply(run_parts(request, bounds, lambda part: self._infer_one(model, part, deadline),
                               pool=_call_pool(), deadline=deadline,
                               timeout_message=f"Triton did not answer {what} within the request's deadline"))

    def _infer_one(self, model: ModelVersion, request: InferRequest, deadline: float) -> InferResponse:
        what = f"model {model.name!r} version {model.version!r}"
        timeout = deadline - time.monotonic()
        if timeout < MIN_CALL_S:
            raise BackendTimeoutError(f"Triton did not answer {what} in time: the request's budget was spent "
                                      "before this part could be sent")
        try:
            inputs, outputs = self._build(model, request)
        except TierserveError:
            raise
        except Exception as exc:
            raise InvalidRequestError(f"cannot encode the request for Triton ({what}): {exc}") from None

        kwargs = {
            "model_name": model.name,
            "inputs": inputs,
            "model_version": str(model.version),
            "outputs": outputs,
            "request_id": request.id or "",
            "timeout": max(1, int(timeout * 1_000_000)),  # server-side, microseconds
        }
        client = None
        try:
            if self.protocol == "grpc":
                client = self._grpc_client()
                result = client.infer(**kwargs, client_timeout=timeout)
            else:
                result = self._http_client(timeout).infer(**kwargs)
        except Exception as exc:
            if self.protocol == "http" and not hasattr(exc, "status"):
                self._drop_http_client(timeout)
            err = map_exception(exc, what)
            if self.protocol == "grpc" and client is not None and isinstance(err, BackendUnavailableError):
                self._discard_grpc(client)
            raise err from None

        try:
            return self._response(model, request, result, [o.name() for o in outputs])
        except TierserveError:
            raise
        except Exception as exc:
            raise InferenceError(f"cannot decode Triton's response for {what}: {exc}") from None

    def _build(self, model: ModelVersion, request: InferRequest) -> tuple[list[Any], list[Any]]:
        import numpy as np

        from tierserve.protocol.datatypes import numpy_dtypes

        if self.protocol == "grpc":
            import tritonclient.grpc as client_mod
        else:
            import tritonclient.http as client_mod  # type: ignore[no-redef]

        inputs = []
        for t in request.inputs:
            np_dtype = numpy_dtypes().get(t.datatype)
            if np_dtype is None:
                raise InvalidRequestError(f"input {t.name!r}: unsupported datatype {t.datatype!r}")
            arr = np.asarray(t.data, dtype=np_dtype)
            if t.shape and tuple(arr.shape) != tuple(t.shape):
                arr = arr.reshape(t.shape)
            arr = np.ascontiguousarray(arr)
            inp = client_mod.InferInput(t.name, list(arr.shape), t.datatype)
            if self.protocol == "grpc":
                inp.set_data_from_numpy(arr)  # gRPC always sends raw (binary) contents
            else:
                inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)

        names = [o.name for o in request.outputs] or [s.name for s in model.outputs]
        if self.protocol == "grpc":
            outputs = [client_mod.InferRequestedOutput(n) for n in names]
        else:
            outputs = [client_mod.InferRequestedOutput(n, binary_data=True) for n in names]
        return inputs, outputs

    def _response(self, model: ModelVersion, request: InferRequest, result: Any, names: list[str]) -> InferResponse:
        tensors = []
        for name in names:
            arr = result.as_numpy(name)
            meta = result.get_output(name)
            if arr is None or meta is None:
                raise InferenceError(f"Triton's response for model {model.name!r} lacks output {name!r}")
            datatype = meta["datatype"] if isinstance(meta, dict) else meta.datatype
            arr = _as_manifest_shape(model, name, arr)
            tensors.append(Tensor(name=name, datatype=str(datatype), shape=tuple(int(d) for d in arr.shape), data=arr))
        raw = result.get_response()
        if isinstance(raw, dict):
            model_name, model_version, rid = raw.get("model_name"), raw.get("model_version"), raw.get("id")
        else:
            model_name, model_version, rid = raw.model_name, raw.model_version, raw.id
        return InferResponse(
            model_name=model_name or model.name,
            model_version=str(model_version or model.version),
            outputs=tensors,
            id=rid or request.id,
        )

    # --- generation ------------------------------------------------------------------------------------

    def generate(self, model: ModelVersion, request: GenerationRequest, deadline: Any = None,
                 cancelled: Callable[[], bool] = lambda: False, *, text_input: str | None = None
                 ) -> Iterator[GenerationEvent]:
        """One generation of ``request`` (prepared: ``prompt_ids`` and ``max_tokens`` set) on ``model``'s
        decoupled Triton model, as events (see the module docstring). ``text_input`` is the prompt's text as the
        vLLM backend takes it (``generate_stream.prompt_text``); by default the request's own ``prompt``.
        ``deadline``: a ``tiering.Deadline`` (its ``budget(cap)``) or None. A generator: whatever fails before
        the first event is raised by the first ``next()``."""
        from tierserve.backends import generate_stream as gs

        what = f"model {model.name!r} version {model.version!r}"
        text = text_input if text_input is not None else request.prompt
        if text is None:
            raise InvalidRequestError(f"the GPU tier needs the prompt's text for {what} (the vLLM backend takes "
                                      "text): pass text_input=generate_stream.prompt_text(tokenizer, prompt_ids)")
        budget = self._stream_budget(deadline)
        deadline_at = time.monotonic() + budget
        body = gs.request_body(request, text)
        started = time.perf_counter()
        if self.protocol == "grpc":
            objects = self._grpc_stream(model, body, budget, what)
        else:
            objects = self._http_stream(model, body, budget, what)
        try:
            yield from gs.events(objects, request, what, started, deadline_at, cancelled)
        finally:
            close = getattr(objects, "close", None)
            if close is not None:
                close()

    def _stream_budget(self, deadline: Any) -> float:
        budget = float(deadline.budget(MAX_STREAM_S)) if deadline is not None else MAX_STREAM_S
        if budget <= 0:
            raise BackendTimeoutError("no time left in the request's budget to call Triton")
        return budget

    def _http_stream(self, model: ModelVersion, body: dict[str, Any], budget: float, what: str
                     ) -> Iterator[dict[str, Any]]:
        """POST .../generate_stream; the decoded SSE events as they arrive."""
        import http.client
        import json

        from tierserve.backends import generate_stream as gs

        host, _, port = self.url.rpartition(":")
        conn_cls = http.client.HTTPSConnection if self._ssl else http.client.HTTPConnection
        conn = conn_cls(host, int(port), timeout=min(self.timeout_s, budget))
        path = f"/v2/models/{model.name}/versions/{model.version}/generate_stream"
        try:
            try:
                conn.request("POST", path, body=json.dumps(body).encode(),
                             headers={"content-type": "application/json", "accept": "text/event-stream"})
                resp = conn.getresponse()
                if resp.status >= 300:
                    raise gs.error_for_status(resp.status, gs.error_message(resp.read()), what)
            except TierserveError:
                raise
            except TimeoutError as exc:
                raise BackendTimeoutError(f"Triton did not answer {what} in time ({type(exc).__name__})") from None
            except (OSError, http.client.HTTPException) as exc:
                raise BackendUnavailableError(f"Triton is unreachable for {what} ({type(exc).__name__}: {exc})"
                                              ) from None
            yield from gs.sse_data(_read_chunks(resp, what))
        finally:
            conn.close()

    def _grpc_stream(self, model: ModelVersion, body: dict[str, Any], budget: float, what: str
                     ) -> Iterator[dict[str, Any]]:
        """gRPC ``ModelStreamInfer`` (a decoupled model's responses as they come), each response's outputs as
        the same dict a ``generate_stream`` event holds."""
        import queue

        import numpy as np
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url, ssl=self._ssl, channel_args=_grpc_channel_args())
        answers: queue.Queue[Any] = queue.Queue()
        inputs = []
        for name, value in body.items():
            if isinstance(value, bool):
                inp = grpcclient.InferInput(name, [1], "BOOL")
                inp.set_data_from_numpy(np.array([value], dtype=bool))
            else:
                inp = grpcclient.InferInput(name, [1], "BYTES")
                inp.set_data_from_numpy(np.array([str(value).encode()], dtype=np.object_))
            inputs.append(inp)
        outputs = ["text_output", "finish_reason", "logprobs"]
        try:
            try:
                client.start_stream(callback=lambda result, error: answers.put((result, error)),
                                    stream_timeout=budget)
                client.async_stream_infer(model.name, inputs, model_version=str(model.version),
                                          outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                                          enable_empty_final_response=True)
            except Exception as exc:
                raise map_exception(exc, what) from None
            while True:
                try:
                    result, error = answers.get(timeout=min(self.timeout_s, budget))
                except queue.Empty:
                    raise BackendTimeoutError(f"Triton did not stream {what} in time") from None
                if error is not None:
                    err = map_exception(error, what)
                    if isinstance(err, InvalidRequestError):
                        raise err
                    yield {"error": str(getattr(err, "message", err))}
                    return
                response = result.get_response()
                final = bool(response.parameters.get("triton_final_response").bool_param) if \
                    "triton_final_response" in response.parameters else False
                if response.outputs:
                    obj = {}
                    for name in outputs:
                        arr = result.as_numpy(name)
                        if arr is not None:
                            v = arr.reshape(-1)[0]
                            obj[name] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                    yield obj
                if final:
                    return
        finally:
            with contextlib.suppress(Exception):
                client.stop_stream(cancel_requests=True)
            with contextlib.suppress(Exception):
                client.close()

    def ready(self, model: ModelVersion | None = None) -> bool:
        """Server readiness (or the model's, when given), within ``ready_timeout_s``; never raises."""
        try:
            future = _call_pool().submit(self._ready, model)
            return bool(future.result(timeout=self.ready_timeout_s + 0.1))
        except Exception:
            return False

    def _ready(self, model: ModelVersion | None) -> bool:
        try:
            t = self.ready_timeout_s
            if self.protocol == "grpc":
                client = self._grpc_client()
                try:
                    if model is None:
                        return bool(client.is_server_ready(client_timeout=t))
                    return bool(client.is_model_ready(model.name, str(model.version), client_timeout=t))
                except Exception:
                    self._discard_grpc(client)
                    return False
            client = self._http_client(t)
            try:
                if model is None:
                    return bool(client.is_server_ready())
                return bool(client.is_model_ready(model.name, str(model.version)))
            except Exception:
                self._drop_http_client(t)
                return False
        except Exception:
            return False


def _as_manifest_shape(model: ModelVersion, name: str, arr: Any) -> Any:
    """Triton's view of an output in the shape the model (and the CPU tier) gives it.

    A model output with no dims past the batch axis (a label: [batch]) needs ``dims: [1]`` and an
    empty ``reshape`` in Triton's config, so Triton answers [batch, 1]; both tiers must answer [batch]."""
    spec = next((s for s in model.outputs if s.name == name), None)
    if spec is None or arr.ndim == len(spec.shape) or not arr.shape:
        return arr
    target = (arr.shape[0], *spec.shape[1:]) if model.max_batch_size > 0 else spec.shape
    if any(d < 0 for d in target) or math.prod(target) != arr.size:
        return arr
    return arr.reshape(target)


def _read_chunks(resp: Any, what: str) -> Iterator[bytes]:
    """A streamed HTTP body's bytes as they arrive; a cut connection or a stalled read as the project's error."""
    import http.client

    while True:
        try:
            data = resp.read1(65536)
        except TimeoutError:
            raise BackendTimeoutError(f"Triton stopped streaming {what}: no bytes within the timeout") from None
        except (OSError, http.client.HTTPException) as exc:
            raise BackendUnavailableError(f"Triton's stream for {what} was cut ({type(exc).__name__}: {exc})"
                                          ) from None
        if not data:
            return
        yield data


# --- the call pool -------------------------------------------------------------------------------------

#: Threads (each with its own HTTP clients) that make every call to Triton; created as needed.
CALL_THREADS = 32
#: The least time a call is sent with; below it the deadline has passed.
MIN_CALL_S = 0.01
#: The longest a generation streams (the REST API's 15-minute streamed response).
MAX_STREAM_S = 900.0


def _call_pool() -> Any:
    return shared_pool("triton-call", CALL_THREADS)
