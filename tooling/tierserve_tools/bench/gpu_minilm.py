"""GPU vs one CPU thread for an all-MiniLM-L6-v2-shaped encoder, in ONE run on a machine with a GPU.

Why: the compiler's placement cost model assumes how much faster the GPU tier runs a model than
one Lambda vCPU (``gpu_speedup_vs_cpu_thread`` in compiler/prices.json). This measures that ratio
instead of assuming it: the same BERT encoder (6 layers, hidden 384, 12 heads, intermediate 1536:
all-MiniLM-L6-v2's shape; seeded random weights, since latency depends on the shape, not the
values), the same token batches (sequence length 64, as the compiler profiles MiniLM), on the GPU
in fp32 and fp16 and on one CPU thread in fp32, interleaved per batch size.

    python -m tierserve_tools.bench.gpu_minilm [--out results.json]     # needs torch with CUDA and transformers

It never runs in CI (there is no GPU there); its figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any


def _time(fn: Any, sync: Any, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    import torch
    from transformers import BertConfig, BertModel

    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        return 2
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)
    cpu_model = BertModel(cfg).eval()
    gpu32 = BertModel(cfg).eval().cuda()
    gpu32.load_state_dict(cpu_model.state_dict())
    gpu16 = BertModel(cfg).eval().cuda().half()
    gpu16.load_state_dict(cpu_model.state_dict())
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for b in (int(x) for x in args.batches.split(",")):
            ids = torch.randint(1000, 29000, (b, args.seq), generator=gen)
            mask = torch.ones_like(ids)
            ids_g, mask_g = ids.cuda(), mask.cuda()
            cpu = _time(lambda ids=ids, mask=mask: cpu_model(input_ids=ids, attention_mask=mask), lambda: None,
                        max(5, args.n // 10 if b >= 32 else args.n // 2), 2)
            g32 = _time(lambda i=ids_g, m=mask_g: gpu32(input_ids=i, attention_mask=m), torch.cuda.synchronize,
                        args.n, 10)
            g16 = _time(lambda i=ids_g, m=mask_g: gpu16(input_ids=i, attention_mask=m), torch.cuda.synchronize,
                        args.n, 10)
            row = {"batch": b, "seq": args.seq, "cpu_1thread_fp32_p50_ms": statistics.median(cpu),
                   "gpu_fp32_p50_ms": statistics.median(g32), "gpu_fp16_p50_ms": statistics.median(g16)}
            row["speedup_fp32"] = row["cpu_1thread_fp32_p50_ms"] / row["gpu_fp32_p50_ms"]
            row["speedup_fp16"] = row["cpu_1thread_fp32_p50_ms"] / row["gpu_fp16_p50_ms"]
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    result = {"gpu": torch.cuda.get_device_name(0), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
