"""The hardening suite's shared rig: hostile-ready models, one `tierserve serve` stack, and HTTP helpers.

Two sizes: ``make test`` runs the quick version of every part (``TIERSERVE_HARDENING`` unset), and
``make test-hardening`` the full one (``TIERSERVE_HARDENING=full``: 2,000+ fuzz cases, Triton killed for
20 s at concurrency 16, 10,000 invocations per function...). ``scale(quick, full)`` picks the figure.

The stack is the real one (API Gateway emulator -> RouterFunction -> Invoke -> CpuInferenceFunction
worker; the real tritonserver; moto_server's S3 holding the models), started once per session. The fault
tests run last (collection order below) and leave Triton running again.
"""

from __future__ import annotations

import http.client
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FULL = os.environ.get("TIERSERVE_HARDENING", "") == "full"
#: The figures each part reports, gathered for the closing note (printed at the end of the session).
FIGURES: dict[str, Any] = {}



def scale(quick: int | float, full: int | float) -> Any:
    return full if FULL else quick


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The whole suite after every other test of the session (its stack lives until the session ends, with the
    in-process router's environment in os.environ); the stores first (they need no stack), faults last (they
    kill and freeze Triton), stability just before them."""
    order = {"test_hostile_stores.py": 1, "test_stability.py": 3, "test_faults.py": 4}

    def rank(item: pytest.Item) -> int:
        path = Path(str(item.fspath))
        return order.get(path.name, 2) if path.parent.name == "hardening" else 0

    items.sort(key=rank)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("issue 8 hardening figures")
        for key, value in FIGURES.items():
            terminalreporter.write_line(f"{key}: {value}")
        out = os.environ.get("TIERSERVE_HARDENING_FIGURES")
        if out:
            Path(out).write_text(json.dumps(FIGURES, indent=2, default=str))


# --- models ------------------------------------------------------------------------------------------------

VOCAB = 1000


@dataclass
class Models:
    root: Path
    lin_weights: tuple[np.ndarray, np.ndarray]


def build_models(root: Path) -> Models:
    """The store every part serves:

    * ``digits``: the demo classifier (CPU): 64 FP32 -> label, probabilities;
    * ``emb``: ids/mask [batch, seq] -> y, vocabulary 1000, on GPU with a CPU copy, with the compiler's checks
      (dim names, the ids' value range); ``emb-bare``: the same without them (what an older manifest says);
      ``emb-gpu``: GPU only;
    * ``lin``: y = x @ W + b on GPU with a CPU copy (GPU from 8 rows); ``lin-gpu``: GPU only;
    * ``nan-ok``: ``lin`` that allows non-finite values; ``wide``: x -> 50,000 floats a row (CPU and GPU);
    * ``text``: BYTES in, INT64 out (CPU)."""
    import dataclasses

    import onnx

    from tests.support.models import embedding_onnx, label_encoder_onnx, linear_onnx, write_digits, write_model
    from tierserve.manifest import Manifest, TensorSpec
    from tierserve_compiler.data import specs_from_onnx
    from tierserve_compiler.triton import write_triton_repo

    root.mkdir(parents=True, exist_ok=True)
    write_digits(root)

    def add(name: str, data: bytes, inputs: Any, outputs: Any, targets: tuple[str, ...], max_batch: int = 16,
            **routing: Any) -> None:
        write_model(root, name, "1", data, tuple(inputs), tuple(outputs), targets=targets, max_batch_size=max_batch,
                    routing=routing or {"gpu_min_rows": 8, "gpu_min_bytes": 1 << 40})
        if "gpu" in targets:
            write_triton_repo(root, name, "1", root / name / "1" / "model.onnx", list(inputs), list(outputs), max_batch,
                              tensorrt_fp16=False, warmup=False)

    emb = embedding_onnx(vocab=VOCAB, seed=1)
    ins, outs = specs_from_onnx(onnx.load_from_string(emb))
    bare = [TensorSpec(s.name, s.datatype, s.shape) for s in ins]
    add("emb", emb, ins, outs, ("gpu", "cpu"))
    add("emb-bare", emb, bare, outs, ("gpu", "cpu"))
    add("emb-gpu", emb, ins, outs, ("gpu",))
    lin, w, b = linear_onnx(4, 3, seed=7)
    x_spec = (TensorSpec("x", "FP32", (-1, 4), ("batch", "")),)
    y_spec = (TensorSpec("y", "FP32", (-1, 3), ("batch", "")),)
    add("lin", lin, x_spec, y_spec, ("gpu", "cpu"))
    add("lin-gpu", lin, x_spec, y_spec, ("gpu",))
    add("nan-ok", lin, x_spec, y_spec, ("cpu",), max_batch=0)
    wide, _, _ = linear_onnx(4, 50_000, seed=3)
    add("wide", wide, x_spec, (TensorSpec("y", "FP32", (-1, 50_000), ("batch", "")),), ("gpu", "cpu"))
    add("text", label_encoder_onnx(), (TensorSpec("s", "BYTES", (-1,), ("batch",)),),
        (TensorSpec("y", "INT64", (-1,), value_range=(-1, 3)),), ("cpu",), max_batch=0)
    # nan-ok allows NaN and Infinity: the manifest says so
    path = root / "manifest.json"
    manifest = Manifest.loads(path.read_text())
    mv = dataclasses.replace(manifest.resolve("nan-ok"), allow_non_finite=True)
    path.write_text(manifest.with_version(mv).dumps())
    return Models(root, (w, b))


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("hardening-models"))


COOLDOWN_S = 3.0
TRITON_TIMEOUT_S = 2.0


@pytest.fixture(scope="session")
def stack(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """`tierserve serve` over the models: moto S3 (and the batch queues and table), the real Triton, the CPU
    function in 2 warm workers."""
    pytest.importorskip("pytriton", reason="the nvidia-pytriton wheel provides the local tritonserver")
    from tierserve_tools.serve import LocalStack

    overrides = {"RouterFunction": {"BREAKER_FAILURE_THRESHOLD": "3", "BREAKER_COOLDOWN_S": str(COOLDOWN_S),
                                    "BREAKER_SUCCESS_THRESHOLD": "1", "HEALTH_TTL_S": "0.2",
                                    "TRITON_TIMEOUT_S": str(TRITON_TIMEOUT_S)}}
    with LocalStack(models.root, port=0, batch=True, s3=True, workdir=tmp_path_factory.mktemp("hardening-serve"),
                    env_overrides=overrides) as s:
        s.weights = models.lin_weights
        yield s


# --- HTTP ----------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return strict_json(self.body)


def strict_json(raw: bytes) -> Any:
    """Parse as standard JSON only: a bare NaN or Infinity token fails the test."""
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-standard JSON token {token!r} in a response")

    return json.loads(raw, parse_constant=refuse)


def request(stack: Any, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None, timeout: float = 60.0) -> Answer:
    """One request on a new connection (no keep-alive)."""
    host, port = stack.url.removeprefix("http://").split(":")
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"Connection": "close", **({"content-type": "application/json"} if data is not None else {}),
            **(headers or {})}
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def infer(stack: Any, model: str, body: bytes | dict, headers: dict[str, str] | None = None,
          timeout: float = 60.0) -> Answer:
    return request(stack, "POST", f"/v2/models/{model}/infer", body, headers, timeout)


def rows(n: int, seed: int = 0, cols: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, cols)).astype(np.float32)


def lin_body(n: int, seed: int = 0, **extra: Any) -> dict:
    x = rows(n, seed)
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [n, 4], "data": x.ravel().tolist()}], **extra}


def ids_body(ids: Any, mask: Any = None) -> dict:
    """input ids and attention mask (ones of the ids' shape unless given), INT64, as JSON."""
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.ones(ids.shape, dtype=np.int64) if mask is None else np.asarray(mask, dtype=np.int64)
    return {"inputs": [{"name": n, "datatype": "INT64", "shape": list(a.shape), "data": a.ravel().tolist()}
                       for n, a in (("ids", ids), ("mask", mask))]}


def assert_served(stack: Any) -> None:
    """The next request after a hostile one is served, with the right values."""
    w, b = stack.weights
    answer = infer(stack, "lin", lin_body(2, seed=99))
    assert answer.status == 200, answer.body[:500]
    y = np.asarray(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(y, rows(2, 99) @ w + b, rtol=1e-4, atol=1e-5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))] if ordered else 0.0
