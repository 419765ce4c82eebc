"""`tierserve edge package NAME...`: an AWS IoT Greengrass v2 component that installs and runs the edge runtime.

Developer tooling (it builds a wheel and reads the store from a workstation), so it lives here and
registers ``package`` under the developer CLI's ``tierserve edge``; the device's own ``tierserve-edge``
never imports it. It writes the layout the Greengrass CLI deploys locally
(``greengrass-cli deployment create --recipeDir OUT/recipes --artifactDir OUT/artifacts``) and that
``aws greengrassv2 create-component-version --inline-recipe`` takes once the artifact is in S3::

    OUT/recipes/NAME-VERSION.json
    OUT/artifacts/NAME/VERSION/tierserve-edge.zip
        wheels/tierserve-X.whl     the runtime (its dependencies come from the index, or add their wheels)
        models/manifest.json       a seed store: the chosen models' default and canary versions ...
        models/NAME/V/...          ... and their edge variants, so the device serves them before its first sync

The recipe (format 2020-01-25) has one manifest per platform (``linux`` on ``aarch64`` and ``amd64``),
each with the ZIP artifact (``Unarchive: ZIP``, unpacked to ``{artifacts:decompressedPath}/tierserve-edge``)
and the lifecycle: ``Install`` makes a virtual environment in ``{work:path}`` and installs the wheel with
its ``edge`` extra; ``Run`` starts ``tierserve-edge`` with the component's configuration. It depends on
``aws.greengrass.TokenExchangeService``, which gives the component AWS credentials (the device role) for
the S3 store and for SigV4 to the cloud gateway. Greengrass stops a component with SIGTERM, on which
``tierserve-edge`` shuts its servers down and exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from tierserve.errors import ConfigurationError
from tierserve.manifest import MANIFEST_FILE, Manifest, ModelEntry
from tierserve.store import ModelStore

RECIPE_FORMAT_VERSION = "2020-01-25"
ARTIFACT = "tierserve-edge.zip"
UNPACKED = "tierserve-edge"  # Greengrass unpacks ARTIFACT to {artifacts:decompressedPath}/<its name minus .zip>
#: Greengrass's names for the processor architectures a Raspberry-Pi-class device and a small x86 box report.
PLATFORMS = ("aarch64", "amd64")
TOKEN_EXCHANGE = "aws.greengrass.TokenExchangeService"  # noqa: S105 - a component name
_SEMVER = re.compile(r"\d+\.\d+\.\d+")
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def project_root() -> Path:
    """The source tree this tierserve runs from (pyproject.toml above the package), to build its wheel."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "functions" / "tierserve").is_dir():
            return parent
    raise ConfigurationError("cannot find tierserve's source tree to build its wheel; pass --wheel PATH")


def build_wheel(dest: Path, python: str = sys.executable) -> Path:
    """``pip wheel`` of this project, without its dependencies (they are the device's to install)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest),
                          str(project_root())], capture_output=True, text=True, timeout=600)
    wheels = sorted(dest.glob("tierserve-*.whl"))
    if out.returncode != 0 or not wheels:
        raise ConfigurationError(f"building tierserve's wheel failed: {out.stderr.strip()[-500:]}")
    return wheels[-1]


def seed_store(store_uri: str, names: list[str], dest: Path, s3_client: Any = None) -> Manifest:
    """Copy the chosen models' default and canary versions (entries and verified edge variants) into ``dest``."""
    with tempfile.TemporaryDirectory(prefix="tierserve-package-") as tmp:
        store = ModelStore(store_uri, Path(tmp) / "cache", s3_client=s3_client)
        manifest = store.manifest()
        models: dict[str, ModelEntry] = {}
        for name in names:
            entry = manifest.models.get(name)
            manifest.resolve(name)  # unknown or broken: the store's own error
            assert entry is not None
            keep = [entry.default_version] + ([str(entry.canary["version"])] if entry.canary else [])
            for v in keep:
                mv = entry.versions[v]
                if not mv.serves_edge:
                    raise ConfigurationError(
                        f"{name} v{v} is not placed on the edge (targets {', '.join(mv.targets)}); recompile it "
                        "with --target edge, or leave it out: a device forwards it to the cloud anyway")
                variant = mv.edge_artifact
                src = store.fetch(variant)  # verified against its sha256 (and its external data)
                for f, local in zip(variant.files(), [src, *(src.parent / variant.location(e)
                                                            for e in variant.external_data)], strict=True):
                    (dest / f.path).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(local, dest / f.path)
            models[name] = ModelEntry(name, entry.default_version, {v: entry.versions[v] for v in keep}, entry.canary)
        seed = Manifest(models=models)
        (dest / MANIFEST_FILE).write_text(seed.dumps())
        return seed


def lifecycle() -> dict[str, Any]:
    """Install and Run, with recipe variables Greengrass substitutes ({work:path}, {configuration:/Key}, ...)."""
    venv = "{work:path}/venv"
    unpacked = f"{{artifacts:decompressedPath}}/{UNPACKED}"
    install = (f"{{configuration:/Python}} -m venv {venv} && {venv}/bin/python -m pip install --quiet "
               f"{{configuration:/PipOptions}} --find-links {unpacked}/wheels \"tierserve[edge]=={{configuration:/"
               "TierserveVersion}\"")
    run = (f"exec {venv}/bin/tierserve-edge --store {{configuration:/StoreUri}} --seed {unpacked}/models "
           "--cache-dir {work:path}/cache --models {configuration:/Models} "
           "--sync-interval {configuration:/SyncIntervalSeconds} --host {configuration:/Host} "
           "--port {configuration:/HttpPort} --grpc-port {configuration:/GrpcPort} "
           "--cloud-url \"{configuration:/CloudUrl}\" --cloud-auth {configuration:/CloudAuth} "
           "--max-memory-mb {configuration:/MaxMemoryMb} --max-disk-mb {configuration:/MaxDiskMb}")
    return {"Install": {"Script": install, "Timeout": 900, "RequiresPrivilege": False},
            "Run": {"Script": run, "RequiresPrivilege": False}}


def recipe(name: str, version: str, artifact_uri: str, models: list[str], wheel: Path, *, store_uri: str,
           cloud_url: str = "", cloud_auth: str = "iam", host: str = "127.0.0.1", http_port: int = 8000,
           grpc_port: int = 8001, sync_interval_s: float = 60.0, max_memory_mb: int = 512, max_disk_mb: int = 2048,
           platforms: tuple[str, ...] = PLATFORMS) -> dict[str, Any]:
    tierserve_version = wheel.name.split("-")[1]
    return {
        "RecipeFormatVersion": RECIPE_FORMAT_VERSION,
        "ComponentName": name,
        "ComponentVersion": version,
        "ComponentType": "aws.greengrass.generic",
        "ComponentDescription": (f"tierserve edge runtime: serves {', '.join(models)} (Open Inference Protocol over "
                                 "HTTP and gRPC) on the device, synced from the model store, and forwards the "
                                 "rest to the cloud gateway"),
        "ComponentPublisher": "tierserve",
        "ComponentDependencies": {TOKEN_EXCHANGE: {"VersionRequirement": ">=2.0.0 <3.0.0", "DependencyType": "HARD"}},
        "ComponentConfiguration": {"DefaultConfiguration": {
            "StoreUri": store_uri, "CloudUrl": cloud_url, "CloudAuth": cloud_auth, "Models": ",".join(models),
            "SyncIntervalSeconds": sync_interval_s, "Host": host, "HttpPort": http_port, "GrpcPort": grpc_port,
            "MaxMemoryMb": max_memory_mb, "MaxDiskMb": max_disk_mb, "Python": "python3", "PipOptions": "",
            "TierserveVersion": tierserve_version,
        }},
        "Manifests": [
            {"Platform": {"os": "linux", "architecture": arch}, "Lifecycle": lifecycle(),
             "Artifacts": [{"URI": artifact_uri, "Unarchive": "ZIP",
                            "Permission": {"Read": "OWNER", "Execute": "NONE"}}]}
            for arch in platforms
        ],
    }


def package(names: list[str], store_uri: str, out: Path, *, component: str = "com.tierserve.edge",
            version: str = "1.0.0", artifact_uri: str = "", wheel: Path | None = None, s3_client: Any = None,
            device_store: str = "", **config: Any) -> Path:
    """Write the component (recipe + artifact) under ``out``; returns the recipe's path.

    ``store_uri`` is where the models are read from now; ``device_store`` where the device syncs from
    (default: the same, which only makes sense for an S3 store)."""
    if not names:
        raise ConfigurationError("name at least one model to package (e.g. tierserve edge package digits)")
    if not _SEMVER.fullmatch(version):
        raise ConfigurationError(f"--component-version {version!r} must be semantic (MAJOR.MINOR.PATCH, e.g. 1.0.0)")
    if not _COMPONENT.fullmatch(component):
        raise ConfigurationError(f"--component-name {component!r}: use letters, digits, '.', '_' and '-'")
    uri = artifact_uri.rstrip("/") or f"s3://YOUR-BUCKET/greengrass/{component}/{version}"
    artifact_dir = out / "artifacts" / component / version
    with tempfile.TemporaryDirectory(prefix="tierserve-component-") as tmp:
        staging = Path(tmp)
        seed_store(store_uri, names, staging / "models", s3_client)
        wheel_path = (staging / "wheels" / wheel.name) if wheel else build_wheel(staging / "wheels")
        if wheel:
            wheel_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(wheel, wheel_path)
        artifact_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(artifact_dir / ARTIFACT, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(staging.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(staging).as_posix())
        doc = recipe(component, version, f"{uri}/{ARTIFACT}", names, wheel_path,
                     store_uri=device_store or store_uri, **config)
    recipes = out / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    path = recipes / f"{component}-{version}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


# --- CLI -----------------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """`tierserve edge` (run flags from tierserve.edge.cli) with `package` under it."""
    from tierserve.edge.cli import register as register_edge

    register_edge(subparsers, extra=_register_package)


def _register_package(sub: Any) -> None:
    p = sub.add_parser("package", help="write an AWS IoT Greengrass v2 component (recipe + artifact) that installs "
                       "and runs the edge runtime with these models")
    p.add_argument("names", nargs="+", metavar="NAME", help="edge-placed models to ship (their default and canary)")
    p.add_argument("--store", dest="package_store", default="build/models", help="model store (folder or s3://...)")
    p.add_argument("--out", type=Path, default=Path("build/greengrass"), help="where recipes/ and artifacts/ go")
    p.add_argument("--component-name", default="com.tierserve.edge", help="the Greengrass component's name")
    p.add_argument("--component-version", default="1.0.0",
                   help="the component's version (semantic versioning; a new deployment needs a new one)")
    p.add_argument("--artifact-uri", default="", help="S3 prefix the artifact will be uploaded to (recipe URI)")
    p.add_argument("--device-store", default="", help="the store the device syncs from (default: --store)")
    p.add_argument("--device-cloud-url", default="", help="the cloud gateway the device forwards to")
    p.add_argument("--wheel", type=Path, default=None, help="a tierserve wheel to ship instead of building one")
    p.set_defaults(package_func=run_package)


def run_package(args: argparse.Namespace) -> int:
    path = package(list(args.names), args.package_store, args.out, component=args.component_name,
                   version=args.component_version, artifact_uri=args.artifact_uri, wheel=args.wheel,
                   device_store=args.device_store, cloud_url=args.device_cloud_url)
    doc = json.loads(path.read_text())
    if not doc["ComponentConfiguration"]["DefaultConfiguration"]["StoreUri"].startswith("s3://"):
        print("note: the device's store is a local folder; pass --device-store s3://... (or set StoreUri in the "
              "deployment's configuration)", file=sys.stderr)
    artifact = args.out / "artifacts" / args.component_name / args.component_version / ARTIFACT
    print(f"recipe:   {path}\nartifact: {artifact} ({artifact.stat().st_size / 1e6:.1f} MB)\n"
          f"upload the artifact to {doc['Manifests'][0]['Artifacts'][0]['URI']}, then "
          f"`aws greengrassv2 create-component-version --inline-recipe fileb://{path}`; or deploy locally with "
          f"`greengrass-cli deployment create --recipeDir {args.out / 'recipes'} "
          f"--artifactDir {args.out / 'artifacts'} --merge {args.component_name}={args.component_version}`")
    return 0
