"""Issue 13 figures, each measured in one run, with a real `tierserve edge` process (as on a device).

1. **Edge latency**: digits, 1 row, over HTTP (binary and JSON bodies) and gRPC to the edge process, vs a
   raw ``InferenceSession.run`` on the same file with the same threads, in this process; interleaved.
2. **Forwarding overhead**: a model the edge does not hold, client -> edge -> gateway vs client ->
   gateway, the same body, both signed (SigV4; the gateway is `tierserve serve --auth iam`, CPU tier,
   no Triton or S3); interleaved.
3. **RSS** of the edge process: an empty store (no model held), then digits + MiniLM int8 held and each
   loaded by one inference.
4. **Start-up time**: process spawn -> ready line, and -> first inference answered; cold (empty cache,
   first sync from a folder store) and warm (restart from the saved state).

    tierserve bench --suite edge [--quick]
    python -m tierserve_tools.bench.edge [--models build/models] [--quick]

Needs ``make compile-demo compile-minilm`` (digits and MiniLM int8 in ``--models``); the models' manifest
entries are copied into a scratch store with ``"edge"`` added to their targets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tierserve_tools.bench.harness import Context, Figure, Series, Skip, interleave

SIGNING = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}


def edge_store(models: Path, dest: Path) -> dict[str, Any]:
    """A store with digits and minilm placed on the edge (edge variant: the CPU tier's, int8 for MiniLM) and
    'digits-cloud' (the same file) on the cloud CPU only, for the forwarding figure."""
    from tierserve.manifest import Manifest

    src = Manifest.loads((models / "manifest.json").read_text())
    doc: dict[str, Any] = {"schema_version": 1, "models": {}}
    for name, edge_variant in (("digits", None), ("minilm", "int8_dynamic")):
        if name not in src.models:
            raise Skip(f"{name} is not in {models}: run `make compile-demo compile-minilm` first")
        mv = src.resolve(name)
        variant = mv.variants[edge_variant] if edge_variant else mv.edge_artifact
        for f in variant.files():
            (dest / f.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(models / f.path, dest / f.path)
        body = mv.to_json()
        body["targets"] = ["edge", *[t for t in mv.targets if t != "edge"]]
        if "cpu" not in body["targets"]:
            body["targets"].append("cpu")
        body["edge_variant"] = edge_variant or (mv.cpu_variant or mv.selected_variant)
        body["cpu_variant"] = body["edge_variant"]
        body["routing"] = {**mv.routing, "edge_max_rows": 64}
        doc["models"][name] = {"default_version": mv.version, "versions": {mv.version: body}}
        if name == "digits":
            cloud = {**body, "targets": ["cpu"], "routing": mv.routing}
            cloud.pop("edge_variant")
            doc["models"]["digits-cloud"] = {"default_version": mv.version, "versions": {mv.version: cloud}}
    (dest / "manifest.json").write_text(json.dumps(doc, indent=2))
    return doc


def empty_store(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "manifest.json").write_text(json.dumps({"schema_version": 1, "models": {}}))


class EdgeProcess:
    """`tierserve edge` as a process: spawn time, ready time, URL, gRPC address and RSS."""

    def __init__(self, store: Path, cache: Path, cloud_url: str = "", env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "tierserve.edge.cli", "--store", str(store), "--cache-dir", str(cache),
               "--port", "0", "--grpc-port", "0", "--sync-interval", "60"]
        if cloud_url:
            cmd += ["--cloud-url", cloud_url, "--cloud-auth", "iam", "--cloud-region", "us-east-1"]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        self.ready_s = time.perf_counter() - self.t0
        m = re.search(r"ready on (http://\S+); grpc (\S+) ", line)
        if not m:
            self.stop()
            raise RuntimeError(f"tierserve edge did not start: {line!r}")
        self.url, self.grpc = m.group(1), m.group(2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def wait_synced(self, timeout_s: float = 60) -> dict[str, Any]:
        from tierserve.client import Client

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = Client(self.url).request("GET", "/v2/health/edge").json()
            if status["sync"]["syncs"] >= 1:
                return status
            time.sleep(0.05)
        raise RuntimeError("the edge process did not sync")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def body_for(inputs: dict[str, np.ndarray], binary: bool, outputs: list[str]) -> tuple[bytes, dict[str, str]]:
    import tritonclient.http as httpclient

    from tierserve.protocol.tensors import dtype_to_datatype

    ins = []
    for name, arr in inputs.items():
        i = httpclient.InferInput(name, list(arr.shape), dtype_to_datatype(arr.dtype))
        i.set_data_from_numpy(arr, binary_data=binary)
        ins.append(i)
    outs = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    body, length = httpclient.InferenceServerClient.generate_request_body(ins, outputs=outs)
    headers = {"Content-Type": "application/octet-stream" if length else "application/json"}
    if length:
        headers["Inference-Header-Content-Length"] = str(length)
    return (body.encode() if isinstance(body, str) else body), headers


def minilm_inputs(store: Path) -> dict[str, np.ndarray]:
    from tierserve.manifest import Manifest

    mv = Manifest.loads((store / "manifest.json").read_text()).resolve("minilm")
    return {s.name: np.zeros((1, 32), np.int64) + (101 if s.name == "input_ids" else 1) for s in mv.inputs}


def run(ctx: Context) -> None:
    import onnxruntime as ort

    from tierserve.client import Client, SigV4
    from tierserve.edge.settings import EdgeSettings
    from tierserve.sessions import session_options
    from tierserve_tools.serve import LocalStack

    n = ctx.n(400, 100)
    store = ctx.workdir / "store"
    doc = edge_store(ctx.models, store)
    threads = EdgeSettings().intra_op_threads
    digits = doc["models"]["digits"]["versions"]
    dv = next(iter(digits.values()))
    x = np.zeros((1, 64), np.float32) + 3.0

    # --- 4 (cold) and 1: start on an empty cache, then measure digits against raw onnxruntime -------------
    ctx.progress("starting the edge process (cold: empty cache, first sync from the folder store)")
    edge = EdgeProcess(store, ctx.workdir / "cache")
    try:
        edge.wait_synced()
        api = Client(edge.url)
        bin_body, bin_headers = body_for({"input": x}, True, ["label"])
        first = api.request("POST", "/v2/models/digits/infer", bin_body, bin_headers)
        cold_first_s = time.perf_counter() - edge.t0
        assert first.status == 200 and first.served_by == "edge", first.body[:200]
        path = store / dv["variants"][dv["edge_variant"]]["path"]
        sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        json_body, json_headers = body_for({"input": x}, False, ["label"])
        import tritonclient.grpc as grpcclient

        gclient = grpcclient.InferenceServerClient(edge.grpc)
        ginp = grpcclient.InferInput("input", [1, 64], "FP32")
        ginp.set_data_from_numpy(x)
        gout = [grpcclient.InferRequestedOutput("label")]
        ctx.progress(f"digits: edge (HTTP binary, HTTP JSON, gRPC) vs raw session.run, n={n} each, interleaved")
        t = interleave({
            "raw": lambda: sess.run(["label"], {"input": x}),
            "http-binary": lambda: api.request("POST", "/v2/models/digits/infer", bin_body, bin_headers),
            "http-json": lambda: api.request("POST", "/v2/models/digits/infer", json_body, json_headers),
            "grpc": lambda: gclient.infer("digits", [ginp], outputs=gout),
        }, n, warmup=20)
        raw = Series("raw InferenceSession.run", t["raw"])
        cond = (f"digits ({dv['edge_variant']}), 1 row, {threads} ORT threads both sides; client and edge "
                "process on one loopback host, shared 2-core VM")
        for k, label in (("http-binary", "HTTP, binary"), ("http-json", "HTTP, JSON"), ("grpc", "gRPC")):
            ctx.add(Figure("edge", f"digits at the edge ({label}) vs raw session.run", Series(label, t[k]), raw,
                           conditions=cond))
        # --- 3: RSS with digits + MiniLM int8 loaded ------------------------------------------------------
        mb, mh = body_for(minilm_inputs(store), True, [])
        resp = api.request("POST", "/v2/models/minilm/infer", mb, mh)
        assert resp.status == 200 and resp.served_by == "edge", resp.body[:300]
        time.sleep(0.5)
        rss_two = edge.rss_mb()
        held = [(m["name"], m["variant"], m["loaded"]) for m in api.request("GET", "/v2/health/edge").json()["models"]]
        gclient.close()
    finally:
        edge.stop()

    # --- 4 (warm): restart from the saved state ---------------------------------------------------------
    ctx.progress("restarting the edge process from its saved state (warm)")
    edge = EdgeProcess(store, ctx.workdir / "cache")
    try:
        api = Client(edge.url)
        while api.request("POST", "/v2/models/digits/infer", bin_body, bin_headers).status != 200:
            time.sleep(0.01)
        warm_first_s = time.perf_counter() - edge.t0
        warm_ready_s = edge.ready_s
    finally:
        edge.stop()

    # --- 3: RSS with no model ---------------------------------------------------------------------------
    empty = ctx.workdir / "empty"
    empty_store(empty)
    edge = EdgeProcess(empty, ctx.workdir / "cache-empty")
    try:
        edge.wait_synced()
        time.sleep(0.5)
        rss_none = edge.rss_mb()
        cold_ready_s = edge.ready_s
    finally:
        edge.stop()
    ctx.add(Figure("edge", "edge process RSS: digits + MiniLM int8 loaded vs no model",
                   Series("digits + minilm int8", [rss_two], unit="MB"), Series("no model", [rss_none], unit="MB"),
                   conditions=f"VmRSS after one inference each; held: {held}"))
    ctx.add(Figure("edge", "edge start-up: spawn -> ready line (warm restart, saved state)",
                   Series("warm", [warm_ready_s * 1000]), None,
                   conditions=f"first inference answered {warm_first_s * 1000:.0f} ms after spawn (warm); "
                              f"cold (empty cache, first sync): first inference {cold_first_s * 1000:.0f} ms "
                              f"after spawn; ready line with an empty store {cold_ready_s * 1000:.0f} ms"))

    # --- 2: forwarding overhead -------------------------------------------------------------------------
    ctx.progress("starting tierserve serve --auth iam (the cloud: gateway + CPU function; no Triton, no S3)")
    os.environ.update(SIGNING)
    with LocalStack(store, port=0, triton=False, s3=False, batch=False, auth="iam",
                    workdir=ctx.workdir / "serve") as cloud:
        edge = EdgeProcess(store, ctx.workdir / "cache", cloud_url=cloud.url, env=SIGNING)
        try:
            direct = Client(cloud.url, auth=SigV4(region="us-east-1"))
            via = Client(edge.url)
            for c in (direct, via):
                r = c.request("POST", "/v2/models/digits-cloud/infer", bin_body, bin_headers)
                assert r.status == 200 and r.served_by == "cpu", r.body[:300]
            m = ctx.n(200, 50)
            ctx.progress(f"digits-cloud: via the edge vs direct to the gateway, n={m} each, interleaved")
            t = interleave({
                "direct": lambda: direct.request("POST", "/v2/models/digits-cloud/infer", bin_body, bin_headers),
                "via-edge": lambda: via.request("POST", "/v2/models/digits-cloud/infer", bin_body, bin_headers),
            }, m, warmup=10)
        finally:
            edge.stop()
    ctx.add(Figure("edge", "forwarded: client -> edge -> gateway vs client -> gateway (tierserve.client, SigV4)",
                   Series("via the edge", t["via-edge"]), Series("direct to the gateway", t["direct"]),
                   goal_on="difference", conditions="digits, 1 row, binary; both SigV4-signed; gateway = tierserve "
                   "serve --auth iam (router in-process, CPU function in a worker); loopback"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=Path, default=Path("build/models"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        ctx = Context(models=args.models, workdir=Path(tmp), quick=args.quick, suite="edge")
        run(ctx)
    print(json.dumps([f.to_json() for f in ctx.figures], indent=1))
    for f in ctx.figures:
        r = f.ratio
        d = f.difference
        b = f.baseline
        print(f"{f.name}: {f.measured.value:.3f} {f.measured.unit}"
              + (f" vs {b.value:.3f} {b.unit} (ratio {r:.2f}, +{d:.3f})" if b is not None and r is not None else "")
              + f"  [{f.conditions}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
