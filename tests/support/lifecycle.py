"""Lifecycle test helpers: manifest versions without artifacts, and the concurrent-writers scenario shared by
the folder (unit) and moto_server (integration) tests."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable
from typing import Any

from tierserve.errors import LifecycleError
from tierserve.lifecycle.registry import Registry, state_of
from tierserve.manifest import ModelVersion, TensorSpec, Variant

X = (TensorSpec("x", "FP32", (-1, 4)),)
Y = (TensorSpec("y", "FP32", (-1, 3)),)


def version(name: str, v: str, content: str = "", targets: tuple[str, ...] = ("cpu",),
            inputs: tuple[TensorSpec, ...] = X, max_batch_size: int = 0) -> ModelVersion:
    """A manifest version whose artifact sha256 follows ``content`` (default: the version)."""
    sha = hashlib.sha256((content or f"{name}/{v}").encode()).hexdigest()
    return ModelVersion(name=name, version=v, inputs=inputs, outputs=Y,
                        variants={"fp32": Variant(f"{name}/{v}/model.onnx", sha, 10)}, selected_variant="fp32",
                        targets=targets, max_batch_size=max_batch_size)


def concurrent_writers(make_registry: Callable[[int], Registry], n: int = 20) -> dict[str, Any]:
    """Given model 'm' with versions 1-4 (default 1), ``n`` writers at once, each its own Registry: even
    ones canary v3 or v4 at i+1 percent (always valid), odd ones promote v1 or v2 (refused when that version
    is already the default by then). Returns what happened and the history."""
    setup = make_registry(-1)
    for v in ("1", "2", "3", "4"):
        setup.publish(version("m", v))
    start = threading.Barrier(n)
    done: dict[int, dict[str, Any]] = {}
    refused: dict[int, str] = {}
    registries = [make_registry(i) for i in range(n)]

    def write(i: int) -> None:
        reg = registries[i]
        start.wait()
        try:
            if i % 2 == 0:
                done[i] = reg.canary("m", str(3 + i // 2 % 2), i + 1, why=f"writer {i}")
            else:
                done[i] = reg.promote("m", str(1 + i // 2 % 2), why=f"writer {i}")
        except LifecycleError as exc:
            refused[i] = exc.message

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    manifest = setup.manifest()
    return {"done": done, "refused": refused, "manifest": manifest, "history": setup.history("m"),
            "attempts": sum(r.attempts for r in registries), "state": state_of(manifest.models["m"])}


def check_history_agrees(outcome: dict[str, Any], n: int = 20) -> None:
    """The history is gap-free, each change starts from the state the previous one left, every successful
    writer's change is in it exactly once, and the last one is the final manifest's state."""
    history, done, manifest = outcome["history"], outcome["done"], outcome["manifest"]
    assert len(done) + len(outcome["refused"]) == n
    assert all(i % 2 == 1 and "already the default" in why for i, why in outcome["refused"].items())
    revisions = [r["revision"] for r in history]
    assert revisions == list(range(1, manifest.revision + 1))
    for prev, nxt in itertools.pairwise(history):
        assert nxt["from"] == prev["to"], f"revision {nxt['revision']} did not start from revision {prev['revision']}"
    by_revision = {r["revision"]: r for r in history}
    assert sorted(r["revision"] for r in done.values()) == sorted(set(r["revision"] for r in done.values()))
    for rec in done.values():
        assert by_revision[rec["revision"]] == rec
    assert len(history) == 4 + len(done)  # the four publishes, then one change per successful writer
    assert history[-1]["to"] == outcome["state"]
    assert manifest.change == history[-1]


def compiled(root, name: str, v: str, seed: int = 0, gpu: bool = False, in_dim: int = 4) -> ModelVersion:
    """A version as `tierserve compile` leaves it in ``root``: NAME/VERSION/model.onnx and its manifest entry,
    plus, for a GPU version, triton/NAME/VERSION/{model.onnx,config.pbtxt} (the version's own config) and the
    model's triton/NAME/config.pbtxt."""
    from tests.support.models import linear_onnx, write_model

    data, _, _ = linear_onnx(in_dim=in_dim, seed=seed)
    inputs = (TensorSpec("x", "FP32", (-1, in_dim)),)
    mv = write_model(root, name, v, data, inputs, Y, targets=("gpu", "cpu") if gpu else ("cpu",),
                     max_batch_size=8 if gpu else 0)
    if gpu:
        from tierserve_compiler.triton import config_pbtxt

        vdir = root / "triton" / name / v
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "model.onnx").write_bytes(data)
        (vdir / "config.pbtxt").write_text(config_pbtxt(name, list(inputs), list(Y), 8, tensorrt_fp16=False))
        from tierserve_compiler.publish import write_triton_model_config

        write_triton_model_config(root, name)  # triton/NAME/config.pbtxt, as the compiler leaves it
    return mv


def linear_variant_onnx(seed: int = 0, fail_above: float | None = None, matmuls: int = 0) -> bytes:
    """y = x @ W + b, and optionally what makes a version bad for real (never a mock):

    * ``fail_above``: onnxruntime fails (FAIL status; answered 400) on a request whose first column exceeds it
      (a Reshape to an impossible shape): with x ~ N(0, 1) and 1.645, one request in twenty;
    * ``matmuls``: that many extra 512 x 512 MatMul + Tanh steps on the input, added to y times zero
      (they depend on the input, so onnxruntime cannot fold them away): a slower version, same answers."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["y0"])]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B"),
             numpy_helper.from_array(np.array(0, np.float32), "zero_f"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    last = "y0"
    if fail_above is not None:
        nodes += [helper.make_node("Gather", ["x", "col0"], ["c0"], axis=1),
                  helper.make_node("ReduceMax", ["c0"], ["mx"], keepdims=0),
                  helper.make_node("Greater", ["mx", "limit"], ["bad"]),
                  helper.make_node("Cast", ["bad"], ["bad_i"], to=TensorProto.INT64),
                  helper.make_node("Mul", ["bad_i", "four"], ["extra"]),
                  helper.make_node("Add", ["extra", "three"], ["n"]),
                  helper.make_node("Reshape", ["B", "n"], ["rb"]),  # 3 elements into 7 when bad: fails
                  helper.make_node("ReduceSum", ["rb"], ["s_f"], keepdims=0),
                  helper.make_node("Mul", ["s_f", "zero_f"], ["z_f"]),
                  helper.make_node("Add", [last, "z_f"], ["y_f"])]
        inits += [numpy_helper.from_array(np.array(0, np.int64), "col0"),
                  numpy_helper.from_array(np.array(fail_above, np.float32), "limit"),
                  numpy_helper.from_array(np.array([4], np.int64), "four"),
                  numpy_helper.from_array(np.array([3], np.int64), "three")]
        last = "y_f"
    if matmuls:
        k = 512
        inits += [numpy_helper.from_array((rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32), "H"),
                  numpy_helper.from_array(np.array([1, k // 4], np.int64), "reps")]
        nodes.append(helper.make_node("Tile", ["x", "reps"], ["h0"]))
        for i in range(matmuls):
            nodes += [helper.make_node("MatMul", [f"h{i}", "H"], [f"m{i}"]),
                      helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"])]
        nodes += [helper.make_node("ReduceSum", [f"h{matmuls}", "axis1"], ["s_m"], keepdims=1),
                  helper.make_node("Mul", ["s_m", "zero_f"], ["z_m"]),
                  helper.make_node("Add", [last, "z_m"], ["y_m"])]
        last = "y_m"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "linear_variant",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def compiled_bytes(root, name: str, v: str, onnx_bytes: bytes) -> ModelVersion:
    """A CPU version as `tierserve compile` leaves it, from ONNX bytes (x FP32 [-1, 4] -> y FP32 [-1, 3])."""
    from tests.support.models import write_model

    return write_model(root, name, v, onnx_bytes, X, Y)
