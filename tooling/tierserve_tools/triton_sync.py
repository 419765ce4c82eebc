"""Keep the local tritonserver serving exactly the store's GPU versions, through its repository API.

`tierserve serve` runs Triton with ``--model-control-mode=explicit``. :class:`TritonSync` reads the store's
manifest every ``interval_s`` and, for each model whose set of GPU versions changed (a publish, a retire):

1. copies each new version's folder from the store (``triton/NAME/VERSION/``) into the local repository,
   with the Python-backend shim (``tierserve_tools.triton``); a generative model's version folder is its CPU
   tier's onnxruntime-genai variant instead, with the decoupled stand-in for the vLLM backend
   (``tierserve_tools.triton_genai_shim``), and its config is written from the manifest;
2. rewrites the local ``config.pbtxt`` from the versions' own configs (``tierserve.lifecycle.triton_repo``)
   with ``version_policy: specific`` naming them, converted for the local CPU server;
3. ``POST /v2/repository/models/NAME/load``: Triton re-reads the config, loads the new versions and
   unloads the ones no longer named, while the others keep serving.

A retired version stays loaded for the manifest's grace period, like every other tier, so that a router
whose manifest is older does not lose it mid-flight. In AWS the production GPU tier does the same by
polling the repository in S3 (``--model-control-mode=poll``), whose model configs ``tierserve models``
rewrites (see docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tierserve.errors import ModelNotFoundError
from tierserve.lifecycle.objects import ObjectStore
from tierserve.lifecycle.triton_repo import TRITON_DIR, model_config_key, model_config_text, version_config_key
from tierserve.manifest import MANIFEST_FILE, Manifest
from tierserve_tools.triton import (
    LOCAL_HEADER,
    SHIM_SOURCE,
    default_site_packages,
    genai_local_config,
    localize_config,
    write_genai_version,
)

log = logging.getLogger("tierserve_tools.triton_sync")


def served_gpu_versions(manifest: Manifest) -> dict[str, list[str]]:
    """Per model, the GPU versions that still answer requests: listed, or retired within the grace."""
    out: dict[str, list[str]] = {}
    for name, entry in manifest.models.items():
        versions = []
        for v, mv in entry.versions.items():
            if not mv.serves_gpu:
                continue
            with contextlib.suppress(ModelNotFoundError):  # retired beyond the grace: not served
                manifest.resolve(name, v)
                versions.append(v)
        if versions:
            out[name] = sorted(versions, key=int)
    return out


class TritonSync:
    def __init__(self, http_url: str, repo_dir: Path, objects: ObjectStore, interval_s: float = 1.0,
                 site_packages: str | None = None, genai_threads: int = 0) -> None:
        self.http_url = http_url
        self.genai_threads = genai_threads  # the stand-in's onnxruntime threads (0: the machine's cores)
        self.repo_dir = Path(repo_dir)
        self.objects = objects
        self.interval_s = interval_s
        self.site_packages = site_packages if site_packages is not None else default_site_packages()
        self.loaded: dict[str, list[str]] = {}
        self.changes: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TritonSync:
        self._thread = threading.Thread(target=self._run, name="triton-sync", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self.sync()
            except Exception:  # the next poll tries again; serving goes on with what is loaded
                log.exception("triton sync failed")
            if self._stop.wait(self.interval_s):
                return

    def sync(self) -> dict[str, list[str]]:
        """Align Triton with the store's manifest; returns what changed (model -> versions now served)."""
        got = self.objects.get(MANIFEST_FILE)
        if got is None:
            return {}
        manifest = Manifest.loads(got[0])  # parsed every time: a retired version's grace ends without a write
        desired = served_gpu_versions(manifest)
        changed: dict[str, list[str]] = {}
        for name, versions in desired.items():
            if self.loaded.get(name) != versions:
                if manifest.resolve(name, versions[-1]).generative:
                    self._load_generative(name, versions, manifest)
                else:
                    self._load(name, versions, manifest.revision)
                changed[name] = versions
        for name in sorted(set(self.loaded) - set(desired)):
            self._post(f"/v2/repository/models/{name}/unload")
            del self.loaded[name]
            changed[name] = []
        if changed:
            self.changes.append({"revision": manifest.revision, "changed": changed})
        return changed

    def _load(self, name: str, versions: list[str], revision: int) -> None:
        from google.protobuf import text_format

        dst = self.repo_dir / name
        dst.mkdir(parents=True, exist_ok=True)
        configs: dict[str, str] = {}
        fallback = self.objects.get(model_config_key(name))
        for v in versions:
            vdir = dst / v
            if not (vdir / "model.onnx").is_file():
                self._copy_version(name, v, vdir)
            own = self.objects.get(version_config_key(name, v)) or fallback
            if own is None:
                raise FileNotFoundError(f"no Triton config for {name} v{v} in {self.objects.uri}")
            configs[v] = own[0].decode()
        text, left_out = model_config_text(name, configs, revision)
        served = [v for v in versions if v not in left_out]
        from tritonclient.grpc import model_config_pb2

        cfg = localize_config(text_format.Parse(text, model_config_pb2.ModelConfig()), self.site_packages)
        (dst / "config.pbtxt").write_text(LOCAL_HEADER.format(source=f"{self.objects.uri}/{TRITON_DIR}/{name}")
                                          + text_format.MessageToString(cfg))
        self._post(f"/v2/repository/models/{name}/load")
        self.loaded[name] = served
        log.info("triton: %s serves versions %s", name, served)

    def _load_generative(self, name: str, versions: list[str], manifest: Manifest) -> None:
        """A generative model: each version folder holds its CPU tier's onnxruntime-genai variant and the stand-in
        for the vLLM backend (``tierserve_tools.triton_genai_shim``); the config is written here, not read from
        the store, whose entry is the production vLLM one (``backend: "vllm"``, ``model.json``)."""
        dst = self.repo_dir / name
        dst.mkdir(parents=True, exist_ok=True)
        concurrency = 1
        for v in versions:
            mv = manifest.resolve(name, v)
            if mv.generation is not None:
                concurrency = max(concurrency, mv.generation.max_concurrency)
            vdir = dst / v
            if not (vdir / "genai_config.json").is_file():
                write_genai_version(vdir, self.objects.download, mv.cpu_artifact)
        (dst / "config.pbtxt").write_text(genai_local_config(
            name, versions, self.site_packages, self.genai_threads, concurrency,
            source=f"{self.objects.uri} (manifest revision {manifest.revision})"))
        self._post(f"/v2/repository/models/{name}/load")
        self.loaded[name] = list(versions)
        log.info("triton: %s (generative, local stand-in for vLLM) serves versions %s", name, versions)

    def _copy_version(self, name: str, version: str, vdir: Path) -> None:
        tmp = vdir.with_name(f".{version}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        prefix = f"{TRITON_DIR}/{name}/{version}/"
        for key in self.objects.list(prefix.rstrip("/")):
            target = tmp / key[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.objects.download(key, target)
        (tmp / "model.py").write_text(SHIM_SOURCE.read_text())
        shutil.rmtree(vdir, ignore_errors=True)
        tmp.rename(vdir)

    def _post(self, path: str) -> None:
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=b"{}", method="POST",
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - loopback
                resp.read()
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            reason = json.loads(body or "{}").get("error", body)
            raise RuntimeError(f"tritonserver refused {path}: {err.code} {reason}") from err
