"""`make demo`: the whole story on one machine, with the commands a user would type.

1. compile the bundled digits classifier (scikit-learn, load_digits) with `tierserve compile`;
2. invoke it through RouterFunction with `tierserve invoke` on an HTTP API event holding the
   held-out rows, and print the predictions, their accuracy and the x-served-by header.
Later steps (the local stack over HTTP, the GPU tier, batch jobs) run when their parts exist.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path.cwd()


def run(cmd: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    out = subprocess.run(cmd, capture_output=capture, text=True, check=False)
    if out.returncode != 0:
        if capture:
            sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"demo: command failed with exit code {out.returncode}: {shlex.join(cmd)}")
    return out


def tierserve() -> str:
    return str(Path(sys.executable).with_name("tierserve"))


def compile_digits(models: Path) -> None:
    from tierserve_compiler.demo import write_digits_validation

    val = write_digits_validation(models / ".data" / "digits_val.npz")
    manifest = models / "manifest.json"
    if manifest.is_file() and "1" in (json.loads(manifest.read_text())["models"].get("digits", {})
                                      .get("versions", {})):
        print(f"\n[1/2] digits v1 is already compiled in {models} (versions are immutable); skipping compile")
        return
    print("\n[1/2] compile the bundled digits classifier")
    run([tierserve(), "compile", "tierserve_compiler.demo:digits_classifier", "--name", "digits", "--version", "1",
         "--validation", str(val), "--quantize", "auto", "--out", str(models)])


def print_variants(models: Path) -> None:
    report = json.loads((models / "digits" / "1" / "report.json").read_text())
    print("\nvariants (from report.json):")
    print(f"  {'variant':<14}{'bytes':>9}{'p50 b1 ms':>11}{'p50 b32 ms':>12}  decision")
    for name, v in (report.get("variants") or {}).items():
        batches = (((v.get("profile") or {}).get("threads") or {}).get("1") or {}).get("batches") or {}
        b1 = (batches.get("1") or {}).get("p50_ms")
        b32 = (batches.get("32") or {}).get("p50_ms")
        fmt = lambda x: f"{x:.4f}" if isinstance(x, float) else "-"  # noqa: E731
        print(f"  {name:<14}{v.get('size_bytes') or 0:>9}{fmt(b1):>11}{fmt(b32):>12}  "
              f"{v.get('decision', '')}: {str(v.get('reason', ''))[:90]}")
    print(f"  the CPU tier serves: {report.get('cpu_variant') or report.get('selected_variant')}")


def invoke_holdout(models: Path, rows: int) -> None:
    print("\n[2/2] invoke it through RouterFunction, locally, as API Gateway would")
    data = np.load(models / ".data" / "digits_val.npz")
    x, labels = data["input"][:rows], data["_labels"][:rows]
    event = json.loads((ROOT / "events" / "http_infer.json").read_text())
    event["body"] = json.dumps({"id": "demo-holdout", "inputs": [
        {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        "outputs": [{"name": "label"}]})
    path = models.parent / "demo" / "http_infer_holdout.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(event))
    env_file = models.parent / "demo" / "env.json"
    env_file.write_text(json.dumps({"Parameters": {"MODEL_STORE_URI": str(models),
                                                   "MODEL_CACHE_DIR": str(models.parent / "cache")},
                                    "RouterFunction": {"CPU_BACKEND": "inprocess", "TRITON_URL": ""}}))
    out = run([tierserve(), "invoke", "RouterFunction", "-e", str(path), "--env-vars", str(env_file)], capture=True)
    resp = json.loads(out.stdout.strip().splitlines()[-1])
    body = json.loads(resp["body"])
    pred = np.asarray(next(o for o in body["outputs"] if o["name"] == "label")["data"])
    print(f"status: {resp['statusCode']}")
    print(f"x-served-by: {resp['headers'].get('x-served-by')}")
    print(f"predictions (first 20): {pred[:20].tolist()}")
    print(f"labels      (first 20): {labels[:20].tolist()}")
    print(f"accuracy on {len(labels)} held-out digits: {float((pred == labels).mean()):.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=Path, default=Path("build/models"))
    ap.add_argument("--rows", type=int, default=450)
    args = ap.parse_args()
    models = args.models.resolve()
    compile_digits(models)
    print_variants(models)
    invoke_holdout(models, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
