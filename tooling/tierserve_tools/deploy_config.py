"""`tierserve deploy-config`: template.yaml's parameters, from what the model store serves.

    tierserve deploy-config [--store URI] [--out build/deploy/parameters.json]
        [--cold-start on-demand|provisioned|snapstart] [--gpu-tier none|url|sagemaker] [--gpu-model NAME]
        [--format table|overrides|json]

Why: the compiler measures each model and recommends a memory size (``cpu.memory_mb``); the CPU tier is
deployed as one function per memory class (``tierserve.memory_classes``); this command reads the
manifest (every served version: defaults and canaries) and says which classes to deploy and how much
``/tmp`` they need, and, for ``--gpu-tier sagemaker``, which model archive the endpoint serves. It
writes ``{"Parameters": {...}}`` and prints the ``sam deploy --parameter-overrides`` line that uses it;
nothing is deployed by it. A model whose recommendation exceeds the largest class, or whose files
exceed the largest ``/tmp``, is reported as not deployable on the CPU tier (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierserve.manifest import Manifest, ModelVersion
from tierserve.memory_classes import CLASSES_MB, class_for

#: The template's ``CpuEphemeralStorageMb`` default, and Lambda's bounds for it.
DEFAULT_TMP_MB, MAX_TMP_MB = 2048, 10240
#: Room kept on /tmp besides the model's files (the store verifies into a temporary name, then renames).
TMP_HEADROOM = 1.25


@dataclass
class Placement:
    name: str
    version: str
    role: str  # "default" or "canary"
    targets: tuple[str, ...]
    memory_mb: int | None
    cpu_class: int | None
    files_mb: float
    problem: str = ""


def served_versions(manifest: Manifest) -> list[tuple[ModelVersion, str]]:
    """Every version requests can reach: each model's default, and its canary when it has one."""
    out = []
    for name in sorted(manifest.models):
        entry = manifest.models[name]
        out.append((entry.versions[entry.default_version], "default"))
        if entry.canary and str(entry.canary["version"]) != entry.default_version:
            out.append((entry.versions[str(entry.canary["version"])], "canary"))
    return out


def _files_mb(mv: ModelVersion) -> float:
    if not mv.serves_cpu:
        return 0.0
    v = mv.cpu_artifact
    return (v.size_bytes + sum(e.size_bytes for e in v.external_data)) / 2**20


def place(manifest: Manifest) -> list[Placement]:
    rows = []
    for mv, role in served_versions(manifest):
        memory = (mv.cpu or {}).get("memory_mb")
        row = Placement(mv.name, mv.version, role, tuple(mv.targets), int(memory) if memory else None, None,
                        _files_mb(mv))
        if mv.serves_cpu:
            try:
                row.cpu_class = class_for(memory)
            except ValueError as exc:
                row.problem = f"{exc}; recompile it for the GPU tier (--target gpu)"
            if row.files_mb * TMP_HEADROOM > MAX_TMP_MB:
                row.problem = (f"its files ({row.files_mb:,.0f} MB) do not fit Lambda's largest /tmp "
                               f"({MAX_TMP_MB:,} MB); recompile it for the GPU tier")
        rows.append(row)
    return rows


def parameters(rows: list[Placement], cold_start: str = "on-demand", gpu_tier: str | None = None,
               store_uri: str = "", gpu_model: str | None = None) -> dict[str, str]:
    """The template parameters for ``rows`` (see the module docstring)."""
    classes = {r.cpu_class for r in rows if r.cpu_class and not r.problem}
    params = {f"CpuClass{mb}": "true" if mb in classes else "false" for mb in CLASSES_MB[1:]}
    need = max((r.files_mb * TMP_HEADROOM for r in rows if r.cpu_class and not r.problem), default=0.0)
    params["CpuEphemeralStorageMb"] = str(max(DEFAULT_TMP_MB, min(MAX_TMP_MB, 512 * math.ceil(need / 512))))
    params["CpuColdStart"] = cold_start
    if cold_start == "snapstart" and need > 512:
        raise SystemExit(f"--cold-start snapstart needs every CPU model's files within 512 MB of /tmp; the largest "
                         f"needs {need:,.0f} MB: use --cold-start provisioned")
    if gpu_tier:
        params["GpuTier"] = gpu_tier
    if gpu_tier == "sagemaker":
        gpu = [r for r in rows if "gpu" in r.targets and r.role == "default"]
        pick = next((r for r in gpu if r.name == gpu_model), None) if gpu_model else (gpu[0] if gpu else None)
        if pick is None:
            raise SystemExit("--gpu-tier sagemaker: no GPU-placed model" + (f" named {gpu_model!r}" if gpu_model
                                                                            else "") + " in the store")
        base = store_uri.rstrip("/")
        params.update({"GpuModelName": pick.name, "GpuModelVersion": pick.version})
        if base.startswith("s3://"):  # where `tierserve models publish` put its archive
            params["GpuModelDataUrl"] = f"{base}/sagemaker/{pick.name}-{pick.version}.tar.gz"
        else:
            print(f"note: {store_uri} is not an S3 store: publish {pick.name} v{pick.version} to S3 (tierserve models "
                  "publish) and pass --store s3://... to get GpuModelDataUrl", file=sys.stderr)
    return params


def overrides(params: dict[str, str]) -> str:
    """``sam deploy --parameter-overrides`` syntax."""
    return " ".join(f"{k}={v}" for k, v in params.items())


def table(rows: list[Placement]) -> str:
    lines = [f"{'model':<24}{'version':>8} {'role':<8}{'targets':<10}{'recommended':>12}{'CPU class':>11}"
             f"{'files MB':>10}  note"]
    for r in rows:
        rec = f"{r.memory_mb:,} MB" if r.memory_mb else "-"
        cls = f"{r.cpu_class:,} MB" if r.cpu_class else "-"
        lines.append(f"{r.name:<24}{r.version:>8} {r.role:<8}{','.join(r.targets):<10}{rec:>12}{cls:>11}"
                     f"{r.files_mb:>10.1f}  {r.problem}")
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------------


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("deploy-config", help="template.yaml parameters from the store: CPU memory classes, "
                                                    "/tmp, cold start, the SageMaker model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="folder or s3://bucket/prefix (default: MODEL_STORE_URI, else build/models)")
    p.add_argument("--out", type=Path, default=Path("build/deploy/parameters.json"),
                   help="where the parameters file (sam deploy --parameter-overrides, as JSON) is written")
    p.add_argument("--cold-start", choices=("on-demand", "provisioned", "snapstart"), default="on-demand",
                   help="the CPU functions' cold-start mode: on demand, provisioned concurrency, or SnapStart")
    p.add_argument("--gpu-tier", choices=("none", "url", "sagemaker"), default=None,
                   help="how the router reaches the GPU tier: none, a Triton URL, or a SageMaker endpoint "
                        "(default: the template's GpuTier, unchanged)")
    p.add_argument("--gpu-model", default=None, help="--gpu-tier sagemaker: the model the endpoint serves")
    p.add_argument("--format", choices=("table", "overrides", "json"), default="table",
                   help="what is printed: a table, `sam deploy --parameter-overrides` text, or JSON")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from tierserve.lifecycle.objects import open_objects
    from tierserve.lifecycle.registry import Registry

    uri = args.store or os.environ.get("MODEL_STORE_URI") or "build/models"
    manifest = Registry(open_objects(uri), actor="deploy-config").manifest()
    rows = place(manifest)
    params = parameters(rows, args.cold_start, args.gpu_tier, uri, args.gpu_model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"Parameters": params}, indent=2) + "\n")
    if args.format == "json":
        print(json.dumps({"Parameters": params}, indent=2))
    elif args.format == "overrides":
        print(overrides(params))
    else:
        print(table(rows))
        print(f"\nwrote {args.out}; deploy with:\n  sam deploy --parameter-overrides {overrides(params)}")
    problems = [r for r in rows if r.problem]
    for r in problems:
        print(f"error: {r.name} v{r.version} cannot be deployed on the CPU tier: {r.problem}", file=sys.stderr)
    return 1 if problems else 0


def load(path: Path) -> dict[str, Any]:
    """A parameters file written by this command."""
    return dict(json.loads(Path(path).read_text())["Parameters"])
