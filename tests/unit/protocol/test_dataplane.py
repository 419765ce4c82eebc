"""The data plane's operations, and the parity of every transport over them.

One table of requests goes through each transport that exposes the operation: the router's HTTP API
(``api.handle_http`` with API Gateway events), the CPU function's Invoke (``direct.handle_direct``:
inference only), the edge's HTTP server and the edge's gRPC server (``tritonclient.grpc``). Each must give
the same answer: the same status (gRPC code mapped back to it) and the same document, normalised only where
the wire format itself differs (gRPC's int64 dims as strings, its message instead of a JSON error body).
Retired versions, unknown models and bad input are in the table.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.support.edge import EDGE, synced_edge
from tests.support.fakes import rows_of, write_linear
from tests.support.make_events import http_event
from tierserve.api import handle_http
from tierserve.app import build_runtime
from tierserve.direct import handle_direct
from tierserve.protocol.dataplane import EXTENSIONS, DataPlane
from tierserve.protocol.http_api import decode_body
from tierserve.settings import Settings

X = rows_of(2, seed=3)
INFER_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}]}
BAD_SHAPE = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 5], "data": [0.0] * 10}]}
GRPC_TO_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNIMPLEMENTED": 405, "RESOURCE_EXHAUSTED": 413,
                  "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "INTERNAL": 500}


def retire(root: Path, name: str, version: str) -> None:
    path = root / "manifest.json"
    doc = json.loads(path.read_text())
    doc["models"][name]["versions"][version]["retired_at"] = "2020-01-01T00:00:00Z"  # long past the grace
    doc["models"][name]["default_version"] = "1"
    doc["models"][name].pop("previous_default", None)
    path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parity-store")
    write_linear(root, "lin", "1", seed=1, targets=EDGE)
    write_linear(root, "lin", "2", seed=2, targets=EDGE)
    retire(root, "lin", "2")
    return root


# --- the transports ------------------------------------------------------------------------------------------

Answer = tuple[int, Any]  # (HTTP status, normalised document)


def _json(raw: bytes) -> Any:
    return json.loads(raw) if raw else None


class Router:
    name = "router"

    def __init__(self, store: Path, tmp: Path) -> None:
        self.rt = build_runtime(Settings(model_store_uri=str(store), model_cache_dir=str(tmp / "router")))

    def __call__(self, method: str, path: str, body: Any) -> Answer:
        event = http_event(method, path, f"{method} {path}", headers={"content-type": "application/json"})
        event["body"] = json.dumps(body) if body is not None else None
        event["isBase64Encoded"] = False
        resp = handle_http(event, None, runtime=self.rt)
        return resp["statusCode"], _json(decode_body(resp))


class CpuInvoke:
    """The CPU function: inference only (the router sends nothing else)."""

    name = "cpu-invoke"

    def __init__(self, store: Path, tmp: Path) -> None:
        self.rt = build_runtime(Settings(model_store_uri=str(store), model_cache_dir=str(tmp / "cpu")))

    def __call__(self, method: str, path: str, body: Any) -> Answer:
        parts = path.strip("/").split("/")  # v2 models NAME [versions V] infer
        name, version = parts[2], (parts[4] if parts[3] == "versions" else None)
        event = {"model_name": name, "model_version": version, "headers": {"content-type": "application/json"},
                 "body": json.dumps(body), "isBase64Encoded": False}
        resp = handle_direct(event, None, runtime=self.rt)
        return resp["statusCode"], _json(decode_body(resp))


class EdgeHttp:
    name = "edge-http"

    def __init__(self, edge: Any) -> None:
        self.url = urlsplit(edge.url)

    def __call__(self, method: str, path: str, body: Any) -> Answer:
        conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=30)
        try:
            payload = json.dumps(body).encode() if body is not None else b""
            conn.request(method, path, body=payload, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            return resp.status, _json(resp.read())
        finally:
            conn.close()


class EdgeGrpc:
    """Triton's gRPC service at the edge, through tritonclient.grpc; answers mapped back to HTTP's shapes."""

    name = "edge-grpc"

    def __init__(self, edge: Any) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(edge.grpc_url)

    def __call__(self, method: str, path: str, body: Any) -> Answer:
        from tritonclient.utils import InferenceServerException

        try:
            return 200, self._call(path, body)
        except InferenceServerException as exc:
            code = (exc.status() or "").replace("StatusCode.", "")
            return GRPC_TO_STATUS.get(code, 500), {"error": exc.message()}

    def _call(self, path: str, body: Any) -> Any:
        c = self.client
        parts = path.strip("/").split("/")
        if path == "/v2/health/live":
            return {"live": c.is_server_live()}
        if path == "/v2/health/ready":
            return {"ready": c.is_server_ready()}
        if path == "/v2":
            return c.get_server_metadata(as_json=True)
        if path == "/v2/repository/index":
            return c.get_model_repository_index(as_json=True).get("models", [])
        name = parts[2]
        version = parts[4] if len(parts) > 4 and parts[3] == "versions" else ""
        tail = parts[-1] if (len(parts) > 3 and parts[3] != "versions") or len(parts) > 5 else ""
        if tail == "ready":
            if not c.is_model_ready(name, version):
                raise self.grpc.InferenceServerException("not ready", status="StatusCode.UNAVAILABLE")
            return {"ready": True}
        if tail == "config":
            return c.get_model_config(name, version, as_json=True)["config"]
        if tail == "stats":
            return c.get_inference_statistics(name, version, as_json=True)
        if tail == "infer":
            spec = body["inputs"][0]
            inp = self.grpc.InferInput(spec["name"], spec["shape"], spec["datatype"])
            inp.set_data_from_numpy(np.asarray(spec["data"], dtype=np.float32).reshape(spec["shape"]))
            result = c.infer(name, [inp], model_version=version)
            out = result.get_response(as_json=True)["outputs"][0]
            return {"outputs": [{"name": out["name"], "datatype": out["datatype"], "shape": out["shape"],
                                 "data": result.as_numpy(out["name"]).ravel().tolist()}]}
        return c.get_model_metadata(name, version, as_json=True)


# --- normalisation: only what the wire format changes ----------------------------------------------------------


def _ints(shape: list[Any]) -> list[int]:
    return [int(d) for d in shape]


def norm(op: str, status: int, doc: Any) -> Any:
    if status != 200:
        return doc.get("error") if isinstance(doc, dict) else doc  # the message: same words everywhere
    if op in ("model-metadata", "model-metadata-v1"):
        return {"name": doc["name"], "versions": doc.get("versions", []), "platform": doc["platform"],
                "tensors": [(t["name"], t["datatype"], _ints(t["shape"]))
                            for t in doc.get("inputs", []) + doc.get("outputs", [])]}
    if op == "server-metadata":
        return {"name": doc["name"], "version": doc["version"], "extensions": doc.get("extensions", [])}
    if op == "config":
        return {"name": doc["name"], "max_batch_size": int(doc.get("max_batch_size", 0)),
                "inputs": [(t["name"], t["data_type"], _ints(t["dims"])) for t in doc.get("input", [])],
                "outputs": [(t["name"], t["data_type"], _ints(t["dims"])) for t in doc.get("output", [])]}
    if op == "stats":
        return sorted((s["name"], s["version"]) for s in doc["model_stats"])
    if op.startswith("index"):
        return sorted((m["name"], m.get("version", ""), m.get("state", "")) for m in doc)
    if op.startswith("infer"):
        out = doc["outputs"][0]
        return {"name": out["name"], "shape": _ints(out["shape"]), "data": np.round(out["data"], 4).tolist()}
    if op == "model-ready":
        return True  # HTTP's {"name","version","ready"} and gRPC's ready=true say the same
    return doc


ALL = ("router", "edge-http", "edge-grpc")
WITH_CPU = (*ALL, "cpu-invoke")
#: (id, method, path, body, status, transports that expose it)
TABLE: list[tuple[str, str, str, Any, int, tuple[str, ...]]] = [
    ("live", "GET", "/v2/health/live", None, 200, ALL),
    ("ready", "GET", "/v2/health/ready", None, 200, ALL),
    ("server-metadata", "GET", "/v2", None, 200, ALL),
    ("model-metadata", "GET", "/v2/models/lin", None, 200, ALL),
    ("model-metadata-v1", "GET", "/v2/models/lin/versions/1", None, 200, ALL),
    ("retired-version-metadata", "GET", "/v2/models/lin/versions/2", None, 404, ALL),
    ("unknown-model-metadata", "GET", "/v2/models/nope", None, 404, ALL),
    ("bad-version", "GET", "/v2/models/lin/versions/x1", None, 400, ALL),
    ("model-ready", "GET", "/v2/models/lin/ready", None, 200, ALL),
    ("unknown-model-ready", "GET", "/v2/models/nope/ready", None, 404, ALL),
    ("config", "GET", "/v2/models/lin/config", None, 200, ALL),
    ("retired-version-config", "GET", "/v2/models/lin/versions/2/config", None, 404, ALL),
    ("stats", "GET", "/v2/models/lin/stats", None, 200, ALL),
    ("unknown-model-stats", "GET", "/v2/models/nope/stats", None, 404, ALL),
    ("index", "POST", "/v2/repository/index", {}, 200, ALL),
    ("index-ready", "POST", "/v2/repository/index", {"ready": True}, 200, ("router", "edge-http")),
    ("infer", "POST", "/v2/models/lin/infer", INFER_BODY, 200, WITH_CPU),
    ("infer-v1", "POST", "/v2/models/lin/versions/1/infer", INFER_BODY, 200, WITH_CPU),
    ("infer-retired-version", "POST", "/v2/models/lin/versions/2/infer", INFER_BODY, 404, WITH_CPU),
    ("infer-unknown-model", "POST", "/v2/models/nope/infer", INFER_BODY, 404, WITH_CPU),
    ("infer-bad-shape", "POST", "/v2/models/lin/infer", BAD_SHAPE, 400, WITH_CPU),
    ("infer-not-json", "POST", "/v2/models/lin/infer", "not a request", 400, ("router", "edge-http", "cpu-invoke")),
]


@pytest.fixture(scope="module")
def transports(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Callable]]:
    tmp = tmp_path_factory.mktemp("parity")
    with synced_edge(6 * 1024 * 1024, store_uri=str(store), cache_dir=str(tmp / "edge"), port=0,
                     grpc_port=0) as edge:
        grpc = EdgeGrpc(edge)
        try:
            yield {t.name: t for t in (Router(store, tmp), CpuInvoke(store, tmp), EdgeHttp(edge), grpc)}
        finally:
            grpc.client.close()


@pytest.mark.parametrize(("op", "method", "path", "body", "status", "exposed"), TABLE, ids=[r[0] for r in TABLE])
def test_every_transport_gives_the_same_answer(transports, op, method, path, body, status, exposed) -> None:
    # Given the same request on every transport that exposes the operation
    answers = {name: transports[name](method, path, body) for name in exposed}
    # Then each answers with the table's status
    assert {name: a[0] for name, a in answers.items()} == dict.fromkeys(exposed, status)
    # And the same document
    docs = {name: norm(op, *a) for name, a in answers.items()}
    first = docs[exposed[0]]
    assert all(d == first for d in docs.values()), docs


def test_retired_versions_are_listed_by_no_transport(transports) -> None:
    for name in ALL:
        status, doc = transports[name]("GET", "/v2/models/lin", None)
        assert (status, doc["versions"]) == (200, ["1"]), name
        assert sorted(s[1] for s in norm("stats", *transports[name]("GET", "/v2/models/lin/stats", None))) == ["1"]


def test_the_data_plane_knows_no_transport(store: Path, tmp_path: Path) -> None:
    plane = DataPlane(build_runtime(Settings(model_store_uri=str(store), model_cache_dir=str(tmp_path))))
    assert plane.server_metadata().document["extensions"] == EXTENSIONS
    assert plane.model_metadata("lin", None).headers == {"x-served-by": "cpu"}
    assert plane.listed_versions("lin") == ["1"]
    ready = plane.model_ready("lin", "1")
    assert (ready.document, ready.headers["x-served-by"]) == ({"name": "lin", "version": "1", "ready": True}, "cpu")


def test_server_metadata_does_not_list_statistics_that_one_execution_environment_answers(
        store: Path, tmp_path: Path) -> None:
    # Given two execution environments of the same API (Lambda runs as many as there are concurrent requests;
    # `tierserve serve --router-workers`), the first of which has answered two inferences
    first, second = Router(store, tmp_path / "a"), Router(store, tmp_path / "b")
    for _ in range(2):
        assert first("POST", "/v2/models/lin/infer", INFER_BODY)[0] == 200

    def queued(env: Router) -> int:
        return env("GET", "/v2/models/lin/stats", None)[1]["model_stats"][0]["inference_stats"]["queue"]["count"]

    # When a client reads the statistics twice and the API routes the reads to different environments
    before, after = queued(first), queued(second)
    # Then the counts went backwards: each environment answers its own counters, never the server's aggregate
    # since it started, which is what Triton's statistics extension promises (extension_statistics.md)
    assert (before, after) == (2, 0)
    # So the server metadata does not list the extension: perf_analyzer reads server statistics around every
    # window when it is listed and stops with "failed to find the requested model version" when a model's
    # queue count did not grow (the gateway bench, issue 16). The statistics stay served for those who ask.
    status, doc = second("GET", "/v2", None)
    assert status == 200 and "statistics" not in doc["extensions"], doc
