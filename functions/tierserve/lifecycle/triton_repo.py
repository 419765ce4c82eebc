"""A Triton model repository that serves exactly the listed versions, each with the config it was built with.

Triton reads one ``config.pbtxt`` per model for all of its versions. The compiler therefore keeps each
version's own config beside its files, ``triton/NAME/VERSION/config.pbtxt`` (Triton ignores it there), and
the model's config, ``triton/NAME/config.pbtxt``, is derived from them: the newest listed version's config
with ``version_policy { specific { versions: [...] } }`` naming the listed (published, not retired) GPU
versions. Triton then loads and unloads versions as the list changes: locally through its repository API
(explicit model control, ``tierserve_tools.triton_sync``), in AWS by polling the repository in S3.

Versions whose inputs, outputs or ``max_batch_size`` differ cannot share one config: the newest listed
version's signature wins and the others are left out (returned, so the caller can say so); the lifecycle
refuses to publish such a version beside another one (``Registry.publish``), so in a store this never
happens. The first line of the model config names the manifest revision it was derived from.
"""

from __future__ import annotations

from typing import Any

from tierserve.errors import ManifestError
from tierserve.manifest import Manifest

TRITON_DIR = "triton"
CONFIG = "config.pbtxt"


def version_config_key(name: str, version: str) -> str:
    return f"{TRITON_DIR}/{name}/{version}/{CONFIG}"


def model_config_key(name: str) -> str:
    return f"{TRITON_DIR}/{name}/{CONFIG}"


def gpu_versions(manifest: Manifest, name: str) -> list[str]:
    """The versions of ``name`` the GPU tier must serve: listed (not retired) and targeting the GPU."""
    entry = manifest.models.get(name)
    if entry is None:
        return []
    return sorted((v for v, mv in entry.listed().items() if mv.serves_gpu), key=int)


def _parse(text: str, where: str) -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ManifestError(f"{where} is not a valid Triton model config: {exc}") from exc


def _signature(cfg: Any) -> tuple[Any, ...]:
    return (cfg.max_batch_size, [(i.name, i.data_type, list(i.dims)) for i in cfg.input],
            [(o.name, o.data_type, list(o.dims)) for o in cfg.output])


def model_config_text(name: str, version_configs: dict[str, str], revision: int = 0) -> tuple[str, list[str]]:
    """The model's ``config.pbtxt`` serving ``version_configs`` (version -> that version's config text), and
    the versions left out because their signature differs from the newest one's."""
    from google.protobuf import text_format

    if not version_configs:
        raise ManifestError(f"model {name!r} has no GPU version to serve")
    parsed = {v: _parse(text, f"{TRITON_DIR}/{name}/{v}/{CONFIG}") for v, text in version_configs.items()}
    newest = max(parsed, key=int)
    cfg = parsed[newest]
    served = sorted((v for v, c in parsed.items() if _signature(c) == _signature(cfg)), key=int)
    cfg.version_policy.Clear()
    cfg.version_policy.specific.versions.extend(int(v) for v in served)
    header = f"# derived by tierserve from the configs of versions {', '.join(served)} (manifest revision {revision})\n"
    return header + str(text_format.MessageToString(cfg)), sorted(set(parsed) - set(served), key=int)


def config_revision(text: str) -> int:
    """The manifest revision a model config says it was derived from (0: not said)."""
    first = text.split("\n", 1)[0]
    marker = "(manifest revision "
    if first.startswith("#") and marker in first:
        try:
            return int(first.rsplit(marker, 1)[1].rstrip(")\n "))
        except ValueError:
            return 0
    return 0
