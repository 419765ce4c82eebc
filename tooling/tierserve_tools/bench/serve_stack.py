"""One `tierserve serve` stack for the gateway and load suites: MiniLM twice, with and without dynamic batching.

From the compiled store (``make demo``): a scratch store whose manifest lists ``minilm`` and
``minilm_nodb`` (the same artifacts), and a Triton repository holding both (``minilm_nodb``'s config
without ``dynamic_batching``). The stack (API Gateway emulation, RouterFunction, CpuInferenceFunction
workers, the real local tritonserver; no moto) is started once per bench run and stopped at its end.
"""

from __future__ import annotations

import copy
import json
import shutil
from typing import Any

from tierserve_tools.bench.harness import Context, Skip

MODELS = {"minilm": True, "minilm_nodb": False}  # name -> dynamic batching
TOKENS = 16
#: RouterFunction's worker processes (Lambda's concurrency): the concurrency of the issue's goal (c=8)
ROUTER_WORKERS = 8


def stack(ctx: Context) -> Any:
    """The shared stack (started on first use); Skip when this machine cannot run it."""
    if "stack" in ctx.notes:
        return ctx.notes["stack"]
    from tierserve_tools.triton import pytriton_available

    if not pytriton_available():
        raise Skip("no local tritonserver: the nvidia-pytriton wheel is not installed (x86_64 only)")
    src = ctx.models
    if not (src / "triton" / "minilm" / "config.pbtxt").is_file():
        raise Skip(f"no Triton repository for minilm in {src}: run `make demo` (or make compile-minilm)")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from tierserve_tools.serve import LocalStack

    root = ctx.workdir / "serve-models"
    manifest = json.loads((src / "manifest.json").read_text())
    entry = manifest["models"]["minilm"]
    manifest["models"] = {"minilm": entry, "minilm_nodb": copy.deepcopy(entry)}
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    for body in entry["versions"].values():  # the CPU copies (the fallback), which the store verifies
        cpu = body["variants"][body.get("cpu_variant") or body["selected_variant"]]
        for f in [cpu, *(cpu.get("external_data") or [])]:
            (root / f["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f["path"], root / f["path"])
    for name, batching in MODELS.items():
        dst = root / "triton" / name
        shutil.copytree(src / "triton" / "minilm", dst)
        # the model's config and each version's own (which the local Triton's sync derives the served config from)
        for path in [dst / "config.pbtxt", *sorted(dst.glob("*/config.pbtxt"))]:
            cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
            cfg.name = name
            if not batching:
                cfg.ClearField("dynamic_batching")
            path.write_text(text_format.MessageToString(cfg))
    ctx.progress("starting tierserve serve (API, CPU function workers, local tritonserver)")
    s = LocalStack(root, port=0, s3=False, batch=False, workdir=ctx.workdir / "serve", router_inprocess=False,
                   router_workers=ROUTER_WORKERS, env={"POWERTOOLS_LOG_LEVEL": "ERROR"}).start()
    if s.triton is None:
        s.stop()
        raise Skip(f"the local tritonserver did not start ({'; '.join(s.notes)})")
    ctx.notes["stack"] = s
    ctx.notes["close"] = s.stop
    _warm(s, ctx)
    return s


def _warm(s: Any, ctx: Context) -> None:
    """Start every router worker (each is a cold start, which no measurement should include): as many
    concurrent requests as workers, twice, for each model."""
    import threading
    import urllib.request

    ctx.progress(f"warming {ROUTER_WORKERS} router workers")

    def post(model: str) -> None:
        req = urllib.request.Request(f"{s.url}/v2/models/{model}/infer", data=request_body(1), method="POST",  # noqa: S310
                                     headers={"content-type": "application/json", "x-target": "gpu"})
        with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - the local stack
            resp.read()

    for model in list(MODELS) * 2:
        threads = [threading.Thread(target=post, args=(model,)) for _ in range(ROUTER_WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def request_body(rows: int = 1) -> bytes:
    """A JSON MiniLM request of ``rows`` sentences of TOKENS token ids (what locust sends)."""
    ids = [[101] + [2000 + i for i in range(TOKENS - 2)] + [102]] * rows
    return json.dumps({"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [rows, TOKENS], "data": ids},
        {"name": "attention_mask", "datatype": "INT64", "shape": [rows, TOKENS], "data": [[1] * TOKENS] * rows}],
        "outputs": [{"name": "sentence_embedding"}]}).encode()
