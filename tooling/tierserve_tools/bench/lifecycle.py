"""The lifecycle's figures, through `tierserve serve` (moto_server S3, CloudWatch and DynamoDB; CPU tier):

* **propagation**: steady traffic to a model, then ``promote``; the time from the promote's commit to the
  first response served by the new version (``model_version`` in the body), with the default
  ``MANIFEST_TTL_S`` (10 s) unless ``--ttl``. Repeated, alternating v1 and v2.
* **rollback**: steady traffic, then ``tierserve models rollout`` of a version that fails one request in
  twenty (onnxruntime fails on it, for real); the time from the first failed response a client saw to the
  rollback's commit (the history's ``at``), with the rollout's own figures. Repeated.

    python -m tierserve_tools.bench.lifecycle [--rounds 3] [--ttl 10] [--quick]

This machine is shared: the figures vary with its load; the command prints the conditions with them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]  # the checkout


def infer(url: str, model: str, x: np.ndarray, rid: str) -> tuple[int, str | None]:
    body = json.dumps({"id": rid, "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                              "data": x.tolist()}]}).encode()
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body, method="POST",  # noqa: S310
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read())["model_version"]
    except urllib.error.HTTPError as err:
        return err.code, None


class Traffic(threading.Thread):
    def __init__(self, url: str, model: str, lane: int = 0) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.lane = url, model, lane
        self.results: list[tuple[float, int, str | None]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        rng, n = np.random.default_rng(self.lane), 0
        while not self.stop.is_set():
            status, version = infer(self.url, self.model, rng.standard_normal(4).astype(np.float32),
                                    f"{self.model}-{self.lane}-{n}")
            self.results.append((time.time(), status, version))
            n += 1


def propagation(stack, registry, candidates: Path, rounds: int) -> list[float]:
    from tierserve_tools.publishing import publish_version

    publish_version(candidates / "prop" / "prop" / "2", registry.objects, registry)
    out = []
    traffic = Traffic(stack.url, "prop")
    traffic.start()
    try:
        time.sleep(2)
        for i in range(rounds):
            target = "2" if i % 2 == 0 else "1"
            record = registry.promote("prop", target, why="tierserve_tools.bench.lifecycle")
            from tierserve.manifest import parse_time

            at = parse_time(record["at"]) or time.time()
            deadline = time.time() + 60
            while time.time() < deadline:
                seen = [t for t, s, v in list(traffic.results) if t > at and v == target]
                if seen:
                    out.append(seen[0] - at)
                    break
                time.sleep(0.02)
            failed = [s for t, s, _ in traffic.results if s != 200]
            print(f"  promote v{target}: first response from it after {out[-1]:.2f} s "
                  f"({len(traffic.results)} requests so far, {len(failed)} failed)", flush=True)
            time.sleep(1)
    finally:
        traffic.stop.set()
        traffic.join(timeout=60)
    return out


def rollback(stack, registry, candidates: Path, rounds: int, interval: str) -> list[float]:
    from tierserve.manifest import parse_time
    from tierserve_tools.publishing import publish_version

    publish_version(candidates / "bad" / "bad" / "2", registry.objects, registry)
    out = []
    for _ in range(rounds):
        lanes = [Traffic(stack.url, "bad", lane) for lane in range(2)]
        for t in lanes:
            t.start()
        time.sleep(1)
        cmd = [sys.executable, "-m", "tierserve_tools.cli", "models", "--stack", str(stack.workdir), "rollout",
               "bad", "2", "--steps", "10,50,100", "--interval", interval, "--tick", "0.5s",
               "--max-error-rate", "0.01", "--min-requests", "20"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        for t in lanes:
            t.stop.set()
        for t in lanes:
            t.join(timeout=60)
        last = registry.history("bad")[-1]
        errors = sorted(t for lane in lanes for t, s, _ in lane.results if s >= 400)
        if last["action"] != "rollback" or not errors:
            print(proc.stdout[-2000:], proc.stderr[-2000:])
            raise SystemExit("tierserve_tools.bench.lifecycle: the bad version was not rolled back")
        took = (parse_time(last["at"]) or 0) - errors[0]
        out.append(took)
        f = last["details"]["figures"]
        print(f"  first failed response -> rollback committed: {took:.2f} s (canary {f['canary']['requests']} "
              f"requests, {f['canary']['error_rate']:.1%} failed; window "
              f"{f['window_s']} s of a {interval} interval)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ttl", default="10", help="MANIFEST_TTL_S for the functions (default 10, the default)")
    ap.add_argument("--interval", default="60s", help="the rollout's interval (default 60s)")
    ap.add_argument("--quick", action="store_true", help="one round each")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    sys.path.insert(0, str(ROOT))
    from tests.support.lifecycle import compiled_bytes, linear_variant_onnx
    from tierserve.lifecycle.objects import open_objects
    from tierserve.lifecycle.registry import Registry
    from tierserve_tools.serve import LocalStack

    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp:
        build, candidates = Path(tmp) / "build", Path(tmp) / "candidates"
        for name, fail_above in (("prop", None), ("bad", 1.645)):
            compiled_bytes(build, name, "1", linear_variant_onnx(seed=1))
            compiled_bytes(candidates / name, name, "2", linear_variant_onnx(seed=2, fail_above=fail_above))
        with LocalStack(build, port=0, batch=False, triton=False, workdir=Path(tmp) / "serve",
                        env={"MANIFEST_TTL_S": args.ttl}) as stack:
            registry = Registry(open_objects(stack.model_store_uri, stack.client("s3")), actor="benchmark")
            print(f"tierserve serve (S3 store in moto_server, CPU tier), MANIFEST_TTL_S={args.ttl}, "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
            print("propagation: promote -> first response served by the new version", flush=True)
            prop = propagation(stack, registry, candidates, max(2, rounds))
            print("rollback: a version failing 5% of requests, rolled out at 10%", flush=True)
            rb = rollback(stack, registry, candidates, rounds, args.interval)
    print(f"propagation s: min {min(prop):.2f} median {statistics.median(prop):.2f} max {max(prop):.2f} "
          f"(bound: MANIFEST_TTL_S={args.ttl} plus a request)")
    print(f"first error -> rollback s: min {min(rb):.2f} median {statistics.median(rb):.2f} max {max(rb):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
