"""Rewrites skl2onnx's ``ai.onnx.ml`` linear ops into standard ONNX ops (MatMul, Add, Softmax...).

onnxruntime's quantizers and fp16 converter only touch standard ops, so a ``LinearClassifier`` /
``LinearRegressor`` graph could never get an int8 or fp16 variant. The rewrite is exact in fp32 and
the export gate still compares the result with scikit-learn; when a node has attributes this
module does not handle, it is left alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def rewrite_linear_ml_ops(model: Any) -> tuple[Any, int]:
    """Return ``(model, rewritten_node_count)``; the model is modified in place."""
    from onnx import helper, numpy_helper

    g = model.graph
    new_nodes: list[Any] = []
    inits: list[Any] = []
    count = 0
    for node in g.node:
        a = _attrs(node) if node.domain == "ai.onnx.ml" else {}
        p = f"{node.name or node.op_type}_{count}"
        if node.op_type == "LinearClassifier" and node.domain == "ai.onnx.ml" and "classlabels_ints" in a:
            labels = np.asarray(a["classlabels_ints"], dtype=np.int64)
            coef = np.asarray(a["coefficients"], dtype=np.float32)
            inter = np.asarray(a.get("intercepts", []), dtype=np.float32)
            post = (a.get("post_transform") or b"NONE").decode()
            n_cls = len(inter)
            if n_cls != len(labels) or n_cls < 2 or post not in ("NONE", "SOFTMAX", "LOGISTIC"):
                new_nodes.append(node)
                continue
            w = coef.reshape(n_cls, -1).T
            inits += [
                numpy_helper.from_array(w, f"{p}_W"),
                numpy_helper.from_array(inter, f"{p}_B"),
                numpy_helper.from_array(labels, f"{p}_labels"),
            ]
            raw = f"{p}_raw"
            new_nodes += [
                helper.make_node("MatMul", [node.input[0], f"{p}_W"], [f"{p}_mm"]),
                helper.make_node("Add", [f"{p}_mm", f"{p}_B"], [raw]),
            ]
            scores = node.output[1]
            if post == "NONE":
                new_nodes.append(helper.make_node("Identity", [raw], [scores]))
            elif post == "SOFTMAX":
                new_nodes.append(helper.make_node("Softmax", [raw], [scores], axis=1))
            else:
                new_nodes.append(helper.make_node("Sigmoid", [raw], [scores]))
            new_nodes += [
                helper.make_node("ArgMax", [raw], [f"{p}_idx"], axis=1, keepdims=0),
                helper.make_node("Gather", [f"{p}_labels", f"{p}_idx"], [node.output[0]], axis=0),
            ]
            count += 1
        elif node.op_type == "Normalizer" and node.domain == "ai.onnx.ml" and a.get("norm") == b"L1":
            axes = numpy_helper.from_array(np.asarray([1], dtype=np.int64), f"{p}_axes")
            inits.append(axes)
            new_nodes += [
                helper.make_node("Abs", [node.input[0]], [f"{p}_abs"]),
                helper.make_node("ReduceSum", [f"{p}_abs", f"{p}_axes"], [f"{p}_sum"], keepdims=1),
                helper.make_node("Div", [node.input[0], f"{p}_sum"], [node.output[0]]),
            ]
            count += 1
        else:
            new_nodes.append(node)
    if count:
        del g.node[:]
        g.node.extend(new_nodes)
        g.initializer.extend(inits)
        if all(n.domain != "ai.onnx.ml" for n in g.node):
            keep = [o for o in model.opset_import if o.domain != "ai.onnx.ml"]
            del model.opset_import[:]
            model.opset_import.extend(keep)
        if not any(o.domain in ("", "ai.onnx") and o.version >= 13 for o in model.opset_import):
            raise ValueError("rewrite needs opset >= 13")
    return model, count
