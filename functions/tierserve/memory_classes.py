"""CPU memory classes: the compiler's per-model memory recommendation, made real.

Why classes: the compiler measures each model and recommends a memory size (``cpu.memory_mb`` in the
manifest; Lambda gives one vCPU per 1,769 MB, so memory is also the model's thread count). One CPU
function per model would not scale to many models, and one function for all of them (the old
1,769 MB ``CpuInferenceFunction``) starves the large ones. So models are grouped into a few classes,
each deployed as its own CPU function (template.yaml: ``CpuInferenceFunction`` is the 1,769 MB class,
``CpuInferenceFunction3538`` ... the others, created when ``tierserve deploy-config`` says a model
needs them), and the router invokes the model's class: the smallest deployed class at least as large
as the model's recommendation. A model that needs more than any deployed class is refused with what
to do, instead of running out of memory.

``CPU_FUNCTIONS`` (the router's setting) maps each deployed class to its function name:
``1769=NAME,3538=NAME``. Pure Python; no AWS, no numpy.
"""

from __future__ import annotations

from collections.abc import Mapping

from tierserve.errors import BackendUnavailableError, ConfigurationError
from tierserve.manifest import ModelVersion

#: The classes template.yaml can deploy: 1, 2, 3 and ~5.8 vCPUs.
CLASSES_MB = (1769, 3538, 5307, 10240)
DEFAULT_CLASS_MB = CLASSES_MB[0]


def class_for(memory_mb: int | float | None) -> int:
    """The smallest class holding ``memory_mb`` (the 1,769 MB class when the manifest says nothing)."""
    if not memory_mb:
        return DEFAULT_CLASS_MB
    for mb in CLASSES_MB:
        if memory_mb <= mb:
            return mb
    raise ValueError(f"{memory_mb} MB is more than the largest CPU class ({CLASSES_MB[-1]:,} MB)")


def model_class(model: ModelVersion) -> int:
    """The class the compiler's recommendation for ``model`` lands in."""
    return class_for((model.cpu or {}).get("memory_mb"))


def parse_functions(text: str) -> dict[int, str]:
    """``"1769=fn-a,3538=fn-b"`` -> {1769: "fn-a", 3538: "fn-b"}; ConfigurationError says what is wrong."""
    out: dict[int, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        mb, sep, name = item.partition("=")
        if not sep or not name.strip() or not mb.strip().isdigit() or int(mb) not in CLASSES_MB:
            raise ConfigurationError(f"CPU_FUNCTIONS entry {item!r} must be CLASS=FUNCTION_NAME with CLASS one of "
                                     f"{', '.join(map(str, CLASSES_MB))}")
        out[int(mb)] = name.strip()
    return out


def function_for(model: ModelVersion, functions: Mapping[int, str]) -> str:
    """The CPU function that runs ``model``: the smallest deployed class at least as large as its own."""
    need = model_class(model)
    fits = sorted(mb for mb in functions if mb >= need)
    if not fits:
        deployed = ", ".join(f"{mb:,} MB" for mb in sorted(functions)) or "none"
        raise BackendUnavailableError(
            f"model {model.name!r} v{model.version} needs the {need:,} MB CPU class, which is not deployed "
            f"(deployed: {deployed}); run `tierserve deploy-config` and redeploy with its parameters",
            retry_after_s=300)
    return functions[fits[0]]
