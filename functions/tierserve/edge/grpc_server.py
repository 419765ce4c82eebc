"""Triton's gRPC inference service on the device, so that ``tritonclient.grpc`` works against it unchanged.

Why gRPC only here: on a device nothing stands between the client and the runtime, while the cloud
gateway cannot offer it (API Gateway does not carry gRPC to Lambda). The service and its messages are
Triton's own (``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``, the protobufs tritonclient
ships); grpcio serves them.

One inference path for both protocols: a ``ModelInfer`` request is written as the HTTP binary tensor
extension's body (a JSON header naming each input, ``binary_data_size`` and ``binary_data_output``,
then the raw bytes tritonclient already sent, untouched) and served by ``DataPlane.infer``,
the function the HTTP API calls: the same checks, limits, errors, routing and forwarding (that body is
what goes to the cloud). Its binary answer is cut back into ``raw_output_contents``.

Health, metadata, config, statistics and the repository index are the data plane's operations
(``tierserve.protocol.dataplane.DataPlane``, the ones the HTTP API calls), rendered as Triton's messages, so the two
protocols cannot drift. Errors go through the one error wrapper (``tierserve.protocol.rendering``), its HTTP status
mapped to gRPC's (400 INVALID_ARGUMENT, 404 NOT_FOUND, 413 RESOURCE_EXHAUSTED, 503 UNAVAILABLE with
``retry-after`` in the trailing metadata, 504 DEADLINE_EXCEEDED, others INTERNAL); ``x-served-by``
travels as metadata.

``ModelStreamInfer`` is Triton's bidirectional stream (``tritonclient.grpc``'s ``start_stream`` /
``async_stream_infer``, ``perf_analyzer --streaming``): each request is served by the same path as
``ModelInfer`` and answered in order, an error as the response's ``error_message`` (the stream stays
open, as in Triton). A request's answers come from an iterator (``_answers``): one response today, several
for a decoupled model (streamed generation), the last one marked final (``triton_final_response`` when the
client asked for it with ``triton_enable_empty_final_response``). An open stream holds a server thread,
so streams have their own threads and a cap (``streams``): one more is refused with RESOURCE_EXHAUSTED,
and unary calls keep theirs.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tierserve import errors
from tierserve.app import Runtime
from tierserve.edge.dispatch import FORWARDED
from tierserve.edge.metrics import EdgeCounters
from tierserve.protocol.calls import Body
from tierserve.protocol.dataplane import DataPlane
from tierserve.protocol.header import json_dumps, json_loads
from tierserve.protocol.http_api import payload_too_large
from tierserve.protocol.rendering import GRPC_CODE_BY_STATUS, render_error, status_for
from tierserve.tiers import Tier

#: Protobuf framing beyond the tensors themselves that a request at MAX_PAYLOAD_BYTES may carry.
ENVELOPE_BYTES = 1 << 20
#: Typed ``contents`` field of each datatype (a client that does not send raw bytes uses these).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}
#: Triton's stream parameter asking for the final flag on each response (an empty final response when the
#: last one cannot carry it); it is the stream's, not the model's: answered here, never forwarded.
FINAL_FLAG_ASKED = "triton_enable_empty_final_response"
FINAL_FLAG = "triton_final_response"


def grpc_code(status: int) -> Any:
    """The gRPC status code for an HTTP status (``tierserve.protocol.rendering.GRPC_CODE_BY_STATUS``, the one table)."""
    import grpc

    return grpc.StatusCode[GRPC_CODE_BY_STATUS.get(status, "INTERNAL")]


def _param(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _set_param(dst: Any, value: Any) -> None:
    if isinstance(value, bool):
        dst.bool_param = value
    elif isinstance(value, int):
        dst.int64_param = value
    elif isinstance(value, float):
        dst.double_param = value
    else:
        dst.string_param = str(value)


def request_body(req: Any) -> Body:
    """A ModelInferRequest as the HTTP binary extension's body: its raw bytes untouched behind a JSON header."""
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise errors.InvalidRequestError(
            f"the request has {len(req.inputs)} inputs but {len(raw)} raw_input_contents; send one per input")
    blobs: list[bytes] = []
    inputs = []
    for i, t in enumerate(req.inputs):
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        params = {k: _param(v) for k, v in t.parameters.items()}
        if raw:
            blobs.append(raw[i])
            params["binary_data_size"] = len(raw[i])
        elif t.datatype == "BYTES":  # JSON cannot carry arbitrary bytes: they go as binary data
            blob = b"".join(len(v).to_bytes(4, "little") + v for v in t.contents.bytes_contents)
            blobs.append(blob)
            params["binary_data_size"] = len(blob)
        elif t.datatype in _CONTENTS:
            entry["data"] = list(getattr(t.contents, _CONTENTS[t.datatype]))
        else:
            raise errors.InvalidRequestError(
                f"input {t.name!r}: datatype {t.datatype} must be sent as raw_input_contents")
        if params:
            entry["parameters"] = params
        inputs.append(entry)
    header: dict[str, Any] = {"inputs": inputs}
    if req.id:
        header["id"] = req.id
    header["parameters"] = {**{k: _param(v) for k, v in req.parameters.items()}, "binary_data_output": True}
    if req.outputs:
        header["outputs"] = [{"name": o.name, "parameters": {**{k: _param(v) for k, v in o.parameters.items()},
                                                              "binary_data": True}} for o in req.outputs]
    head = json_dumps(header)
    return Body(b"".join([head, *blobs]), len(head))


def response_message(resp: dict[str, Any], pb: Any) -> Any:
    """The HTTP API's binary answer (``render``'s) as a ModelInferResponse: each output's bytes, untouched."""
    raw = resp.get("body") or ""
    body = base64.b64decode(raw) if resp.get("isBase64Encoded") else str(raw).encode()
    headers = {str(k).lower(): v for k, v in (resp.get("headers") or {}).items()}
    length = int(headers.get("inference-header-content-length") or len(body))
    header = json_loads(body[:length])
    out = pb.ModelInferResponse(model_name=header.get("model_name", ""),
                                model_version=str(header.get("model_version", "")), id=header.get("id") or "")
    for k, v in (header.get("parameters") or {}).items():
        _set_param(out.parameters[k], v)
    offset = length
    for o in header.get("outputs", []):
        out.outputs.add(name=o["name"], datatype=o["datatype"], shape=[int(d) for d in o["shape"]])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:  # a JSON tensor (the cloud answered JSON): encode it as the binary extension does
            blob = _json_tensor_bytes(o)
        else:
            blob = body[offset:offset + int(size)]
            offset += int(size)
        out.raw_output_contents.append(blob)
    return out


def _json_tensor_bytes(o: dict[str, Any]) -> bytes:
    """Raw little-endian bytes of a JSON output tensor (what the binary extension would have carried)."""
    import numpy as np

    from tierserve.protocol.tensors import DATATYPE_TO_DTYPE, json_array

    arr = json_array(o.get("data"), o["datatype"], None, f"output {o['name']!r}", errors.InferenceError)
    if o["datatype"] == "BYTES":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in arr.ravel()]
        return b"".join(len(v).to_bytes(4, "little") + v for v in items)
    return np.ascontiguousarray(arr, dtype=DATATYPE_TO_DTYPE[o["datatype"]].newbyteorder("<")).tobytes()


class EdgeGrpcServer:
    """grpcio serving Triton's GRPCInferenceService for an edge Runtime on ``host:port`` (port 0: a free one)."""

    def __init__(self, runtime: Runtime, counters: EdgeCounters, host: str = "127.0.0.1", port: int = 8001,
                 threads: int = 8, after_request: Callable[[], None] | None = None, streams: int = 4) -> None:
        """``threads`` serve unary calls; ``streams`` more serve at most that many open ModelStreamInfer streams."""
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self.runtime = runtime
        limit = runtime.settings.max_payload_bytes + ENVELOPE_BYTES
        self._server = grpc.server(ThreadPoolExecutor(max_workers=threads + streams, thread_name_prefix="edge-grpc"),
                                   options=[("grpc.max_receive_message_length", limit),
                                            ("grpc.max_send_message_length", -1)])
        servicer = _Servicer(runtime, counters, after_request, streams)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen for gRPC on {host}:{port}")

    def start(self) -> EdgeGrpcServer:
        self._server.start()
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        self._server.stop(grace_s).wait(grace_s + 1)


def _servicer_base() -> type:
    from tritonclient.grpc import service_pb2_grpc

    return service_pb2_grpc.GRPCInferenceServiceServicer  # type: ignore[no-any-return]


class CloudAnswer(Exception):
    """An error answer the cloud gave a forwarded request (its HTTP status, message and headers)."""

    def __init__(self, resp: dict[str, Any]) -> None:
        self.status = int(resp["statusCode"])
        self.headers = {str(k).lower(): str(v) for k, v in (resp.get("headers") or {}).items()}
        raw = resp.get("body") or ""
        try:
            obj = json_loads(base64.b64decode(raw) if resp.get("isBase64Encoded") else raw)
        except ValueError:
            obj = {}
        self.message = (str(obj.get("error") or obj.get("message") or f"HTTP {self.status}")
                        if isinstance(obj, dict) else str(obj))
        self.served_by = self.headers.get("x-served-by", Tier.CPU.value)
        super().__init__(self.message)


class _Servicer(_servicer_base()):  # type: ignore[misc]
    def __init__(self, runtime: Runtime, counters: EdgeCounters, after_request: Callable[[], None] | None,
                 streams: int = 4) -> None:
        from tritonclient.grpc import model_config_pb2, service_pb2

        self.rt = runtime
        self.plane = DataPlane(runtime, answered_by=Tier.EDGE)
        self.counters = counters
        self.after_request = after_request
        self.pb = service_pb2
        self.config_pb = model_config_pb2
        self.max_streams = streams
        self._streams = threading.BoundedSemaphore(streams)

    # --- errors: the HTTP API's mapping, carried as gRPC statuses --------------------------------------

    def _abort(self, context: Any, exc: BaseException, model: str) -> None:
        answer = render_error(exc, "oip")  # the one error wrapper: status, code, retry-after
        served = Tier.EDGE.value  # raised here: this device answered (the cloud's answers: _abort_answer)
        metadata = [("x-served-by", served)]
        if "retry-after" in answer.headers:
            metadata.append(("retry-after", answer.headers["retry-after"]))
        context.set_trailing_metadata(tuple(metadata))
        self.counters.request(model, served, "grpc", answer.status)
        if not isinstance(exc, errors.TierserveError):
            logging.getLogger("tierserve.edge").exception("gRPC request failed")
        message = answer.message if isinstance(exc, errors.TierserveError) else "internal error; see the edge's log"
        context.abort(grpc_code(answer.status), message)

    def _abort_answer(self, context: Any, answer: CloudAnswer, model: str) -> None:
        """An error answer the cloud gave a forwarded request, as the gRPC status its HTTP status maps to."""
        headers = answer.headers
        metadata = [("x-served-by", answer.served_by)] + ([("retry-after", headers["retry-after"])]
                                                          if "retry-after" in headers else [])
        context.set_trailing_metadata(tuple(metadata))
        self.counters.request(model, answer.served_by, "grpc", answer.status)
        context.abort(grpc_code(answer.status), answer.message)

    def _model(self, name: str, version: str) -> Any:
        return self.plane.model(name, version or None)

    # --- health and metadata: the data plane's operations, rendered as Triton's messages ---------------

    def ServerLive(self, request: Any, context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=self.plane.live().document["live"])

    def ServerReady(self, request: Any, context: Any) -> Any:
        try:
            return self.pb.ServerReadyResponse(ready=self.plane.ready().document["ready"])
        except errors.TierserveError:
            return self.pb.ServerReadyResponse(ready=False)

    def ModelReady(self, request: Any, context: Any) -> Any:
        try:  # /ready's predicate (DataPlane.model_problem): not ready is ready=false, as Triton answers it
            return self.pb.ModelReadyResponse(ready=self.plane.model_problem(self._model(request.name,
                                                                                         request.version)) is None)
        except errors.TierserveError as exc:
            self._abort(context, exc, request.name)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        meta = self.plane.server_metadata().document
        return self.pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            meta = self.plane.model_metadata(request.name, request.version or None).document
            out = self.pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
            for kind in ("inputs", "outputs"):
                for t in meta[kind]:
                    getattr(out, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            return out
        except errors.TierserveError as exc:
            self._abort(context, exc, request.name)

    def ModelConfig(self, request: Any, context: Any) -> Any:
        from google.protobuf import json_format

        try:
            config = self.plane.model_config(request.name, request.version or None).document
            cfg = json_format.ParseDict(config, self.config_pb.ModelConfig(), ignore_unknown_fields=True)
            return self.pb.ModelConfigResponse(config=cfg)
        except errors.TierserveError as exc:
            self._abort(context, exc, request.name)

    def ModelStatistics(self, request: Any, context: Any) -> Any:
        from google.protobuf import json_format

        try:
            stats = self.plane.statistics(request.name or None, request.version or None).document
            return json_format.ParseDict(stats, self.pb.ModelStatisticsResponse(), ignore_unknown_fields=True)
        except errors.TierserveError as exc:
            self._abort(context, exc, request.name)

    def RepositoryIndex(self, request: Any, context: Any) -> Any:
        try:
            index = self.plane.repository_index(request.ready).document
        except errors.TierserveError as exc:
            self._abort(context, exc, "-")
        out = self.pb.RepositoryIndexResponse()
        for m in index:
            out.models.add(name=m["name"], version=m["version"], state=m["state"], reason=m.get("reason", ""))
        return out

    # --- inference -------------------------------------------------------------------------------------

    def ModelInfer(self, request: Any, context: Any) -> Any:
        name = request.model_name
        try:
            out, served = self._infer(request)
            context.send_initial_metadata((("x-served-by", served),))
            self.counters.request(name, served, "grpc", 200)
            return out
        except CloudAnswer as answer:  # the cloud's error answer, passed back with its status and Retry-After
            self._abort_answer(context, answer, name)
        except Exception as exc:  # never a stack trace to a client
            self._abort(context, exc, name)
        finally:
            if self.after_request is not None:
                self.after_request()

    def _infer(self, request: Any) -> tuple[Any, str]:
        """One ModelInferRequest through the HTTP API's inference path: (ModelInferResponse, x-served-by);
        raises the project's errors, or CloudAnswer for a forwarded request the cloud refused."""
        FORWARDED.set(False)
        body = request_body(request)
        size = len(body.data)  # type: ignore[arg-type]
        if size > self.rt.settings.max_payload_bytes:
            raise payload_too_large(size, self.rt.settings.max_payload_bytes)
        resp = self.plane.infer(request.model_name, request.model_version or None, body, None, None)
        if int(resp["statusCode"]) != 200:
            raise CloudAnswer(resp)
        served = Tier.EDGE.value if not FORWARDED.get() else str((resp.get("headers") or {}).get("x-served-by",
                                                                                                 Tier.CPU.value))
        return response_message(resp, self.pb), served

    # --- streaming: Triton's ModelStreamInfer ----------------------------------------------------------

    def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        """Each request of the stream answered in order; an error is that request's ``error_message`` and
        the stream goes on (the client ends it, or the server stops)."""
        if not self._streams.acquire(blocking=False):
            import grpc

            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"this edge device already serves {self.max_streams} open streams; close one, or send "
                          "ModelInfer calls")
        try:
            for request in request_iterator:
                try:
                    yield from self._stream_answers(request)
                finally:
                    if self.after_request is not None:
                        self.after_request()
        finally:
            self._streams.release()

    def _stream_answers(self, request: Any) -> Iterator[Any]:
        """The stream responses for one request: its answers from ``_answers``, with the final flag when the
        client asked for it, or one response carrying the error message."""
        name = request.model_name
        asked = FINAL_FLAG_ASKED in request.parameters
        flag = asked and _param(request.parameters[FINAL_FLAG_ASKED]) is True
        if asked:
            del request.parameters[FINAL_FLAG_ASKED]
        served, status = Tier.EDGE.value, 200
        try:
            for answer, by, final in self._answers(request):
                served = by  # counted once the request is answered
                if answer is None:  # a decoupled model's end with no data: an empty final response, if asked
                    if flag:
                        empty = self.pb.ModelInferResponse(model_name=name, model_version=request.model_version,
                                                           id=request.id)
                        empty.parameters[FINAL_FLAG].bool_param = True
                        yield self.pb.ModelStreamInferResponse(infer_response=empty)
                    continue
                if flag:
                    answer.parameters[FINAL_FLAG].bool_param = final
                yield self.pb.ModelStreamInferResponse(infer_response=answer)
        except CloudAnswer as exc:
            served, status = exc.served_by, exc.status
            yield self._stream_error(request, exc.message)
        except Exception as exc:
            served, status = Tier.EDGE.value, status_for(exc)
            if not isinstance(exc, errors.TierserveError):
                logging.getLogger("tierserve.edge").exception("gRPC stream request failed")
            yield self._stream_error(request, exc.message if isinstance(exc, errors.TierserveError)
                                     else "internal error; see the edge's log")
        self.counters.request(name, served, "grpc", status)

    def _answers(self, request: Any) -> Iterator[tuple[Any, str, bool]]:
        """(ModelInferResponse or None, x-served-by, final) for each answer to ``request``, the last one final.
        One today (the inference path answers once); a decoupled model yields several."""
        out, served = self._infer(request)
        yield out, served, True

    def _stream_error(self, request: Any, message: str) -> Any:
        """Triton's error on a stream: the message, with the request's id and model to tell which one failed."""
        return self.pb.ModelStreamInferResponse(
            error_message=message, infer_response=self.pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id))
