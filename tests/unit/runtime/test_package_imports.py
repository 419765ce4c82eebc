"""What the runtime package imports: nothing heavy at cold start, and never the tooling or the compiler.

The tooling (``tierserve_tools``: the CLI, the emulators, serve, the operator commands) and the compiler
never ship in a Lambda artifact, so an import of either anywhere in ``tierserve`` (even inside a function)
would fail in AWS the first time it ran.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tierserve

HEAVY = {"onnxruntime", "tritonclient", "torch", "onnx", "sklearn", "skl2onnx", "tierserve_compiler", "gevent",
         "grpc", "matplotlib", "onnxruntime_genai", "tokenizers", "jinja2", "transformers"}
PACKAGE = Path(tierserve.__file__).parent
OUTSIDE_RUNTIME = ("tierserve_tools", "tierserve_compiler")


def _modules_after_import(module: str, env: dict[str, str] | None = None, then: str = "") -> set[str]:
    code = (f"import sys, json, {module}; {then}"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    base = {k: v for k, v in os.environ.items() if k not in ("LAMBDA_TASK_ROOT", "POWERTOOLS_TRACE_DISABLED",
                                                               "AWS_SAM_LOCAL", "AWS_CHALICE_CLI_MODE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**base, **(env or {})})
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("handler", ["tierserve.handlers.router", "tierserve.handlers.cpu_inference",
                                     "tierserve.generation.service", "tierserve.generation.openai",
                                     "tierserve.generation.triton_generate", "tierserve.protocol.dataplane"])
def test_importing_a_handler_pulls_in_no_heavy_library(handler):
    # When the handler module is imported cold, Then none of the heavy libraries is loaded yet
    loaded = _modules_after_import(handler)
    assert not (HEAVY & loaded), f"{handler} imports {sorted(HEAVY & loaded)} at import time"


@pytest.mark.parametrize(("env", "xray"), [
    ({}, False),                                                                 # outside Lambda
    ({"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": "true"}, False),  # Tracing: Disabled
    ({"LAMBDA_TASK_ROOT": "/var/task", "AWS_SAM_LOCAL": "true"}, False),           # sam local / tierserve invoke
    ({"LAMBDA_TASK_ROOT": "/var/task", "POWERTOOLS_TRACE_DISABLED": "false"}, True),  # Tracing: Active in AWS
], ids=["local", "disabled", "sam-local", "lambda-active"])
def test_the_xray_sdk_is_imported_only_when_tracing_is_on(env: dict[str, str], xray: bool) -> None:
    # Given the router handler imported cold in an environment (about 175 ms of X-Ray SDK when it loads)
    # When its tracer is looked at
    loaded = _modules_after_import("tierserve.handlers.router", env,
                                   "from tierserve.observability import tracer; print(type(tracer).__name__); ")
    # Then Powertools' Tracer, and the X-Ray SDK with it, is there only when tracing is on
    assert ("aws_xray_sdk" in loaded) is xray


def test_the_stand_in_tracer_leaves_the_handler_as_it_is() -> None:
    from tierserve.observability import NoTracer

    def handler(event, context):
        return event

    tracer = NoTracer()
    assert tracer.capture_lambda_handler(handler) is handler
    assert tracer.capture_lambda_handler(capture_response=False)(handler) is handler
    assert tracer.capture_method(handler) is handler


def imported_names(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) for every import in ``source`` wherever it stands (functions included), relative
    imports resolved against ``package``; ``from a import b`` yields both ``a`` and ``a.b``; so does a
    string passed to ``importlib.import_module`` or ``__import__``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def reaches_local(module: str) -> bool:
    """True for a module of the tooling or the compiler, the packages the runtime must never import."""
    return any(module == top or module.startswith(top + ".") for top in OUTSIDE_RUNTIME)


@pytest.mark.parametrize(("source", "package", "reaches"), [
    ("import tierserve_tools.emulation", "tierserve", True),
    ("from tierserve_tools import batch", "tierserve", True),
    ("def f():\n    from tierserve_tools.emulation import LocalContext\n", "tierserve.batch", True),
    ("from tierserve_compiler.pipeline import compile_model", "tierserve.batch", True),
    ("import importlib\nimportlib.import_module('tierserve_tools.batch')", "tierserve", True),
    ("import tierserve.locale\nfrom tierserve import localisation\nimport tierserve_toolsx\nfrom . import wire",
     "tierserve", False),
], ids=["import", "from-package", "inside-a-function", "compiler", "importlib", "look-alikes"])
def test_the_import_finder_sees_every_form_of_import(source: str, package: str, reaches: bool) -> None:
    # Given a module's source, When its imports are listed, Then an import of the emulation is seen in any form
    assert any(reaches_local(name) for _, name in imported_names(source, package)) is reaches


def test_no_module_of_the_shipped_package_imports_the_local_emulation() -> None:
    # Given every module of the runtime package
    shipped = sorted(PACKAGE.rglob("*.py"))
    assert len(shipped) > 20
    # When their imports are listed
    offenders = []
    for path in shipped:
        package = ".".join(("tierserve", *path.relative_to(PACKAGE).parent.parts))
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
                      for line, name in imported_names(path.read_text(), package) if reaches_local(name)]
    # Then none of them reaches the tooling or the compiler, which no function ships
    assert offenders == []


# --- the import graph: no cycles, and backends that stand on their own ------------------------------------

#: The entry modules: what a handler or a transport calls. A backend is called by them, never the reverse.
ENTRY_MODULES = ("tierserve.app", "tierserve.direct", "tierserve.inference", "tierserve.api", "tierserve.handlers")
#: Modules under backends/ that every backend may use: they are no backend themselves.
BACKEND_SHARED = {"tierserve.backends", "tierserve.backends.base", "tierserve.backends.split"}


def runtime_modules() -> dict[str, Path]:
    """Every module of the runtime package by dotted name (the tooling, if still under local/, excluded)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "local") in path.parents:
            continue
        parts = ("tierserve", *path.relative_to(PACKAGE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(sources: dict[str, str], packages: set[str] = frozenset()) -> dict[str, set[str]]:
    """module -> the modules of ``sources`` it imports, wherever the import stands (functions included);
    importing ``a.b.c`` counts ``a`` and ``a.b`` too (Python runs their ``__init__`` first)."""
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        package = module if module in packages else module.rpartition(".")[0]
        targets: set[str] = set()
        for _, name in imported_names(source, package):
            parts = name.split(".")
            targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[module] = {t for t in targets if t in sources and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _is_entry(module: str) -> bool:
    return any(module == e or module.startswith(e + ".") for e in ENTRY_MODULES)


def backend_offences(module: str, source: str) -> list[str]:
    """What a backend module must not import: an entry module, or another backend's ``_private`` names."""
    offences = []
    for line, name in imported_names(source, module.rpartition(".")[0]):
        if _is_entry(name):
            offences.append(f"{module}:{line} imports the entry module {name}")
        owner, _, attr = name.rpartition(".")
        if (attr.startswith("_") and owner.startswith("tierserve.backends.") and owner != module
                and owner not in BACKEND_SHARED):
            offences.append(f"{module}:{line} imports {attr}, a private helper of the backend {owner}")
    return offences


@pytest.mark.parametrize(("sources", "expected"), [
    ({"p.a": "from p import b", "p.b": "def f():\n    from . import c\n", "p.c": "import p.a"},
     [["p.a", "p.b", "p.c"]]),
    ({"p.a": "import p.b", "p.b": "import p.c", "p.c": ""}, []),
    ({"p.a": "def f():\n    import importlib\n    importlib.import_module('p.b')\n", "p.b": "from .a import x"},
     [["p.a", "p.b"]]),
    ({"p.x": "from p.y.z import f", "p.y": "from p import x", "p.y.z": ""}, [["p.x", "p.y"]]),
], ids=["through-a-function", "none", "importlib", "via-a-package-init"])
def test_the_cycle_finder_sees_cycles_through_any_form_of_import(sources: dict[str, str],
                                                                   expected: list[list[str]]) -> None:
    # Given modules whose imports (at the top, inside functions, relative, by importlib) close a loop
    # When the cycles are looked for, Then each loop is found, and nothing else
    assert cycles(import_graph(sources, packages={"p.y"})) == expected


def test_the_runtime_package_has_no_import_cycle() -> None:
    # Given every module of the runtime package and every import in it, those inside functions included
    modules = runtime_modules()
    assert len(modules) > 30
    graph = import_graph({m: p.read_text() for m, p in modules.items()},
                         {m for m, p in modules.items() if p.name == "__init__.py"})
    # When its strongly connected components are found, Then there is none: no module reaches itself
    assert cycles(graph) == []


@pytest.mark.parametrize(("source", "offends"), [
    ("def f():\n    from tierserve.direct import payload\n", True),
    ("from tierserve.app import get_runtime", True),
    ("from tierserve.handlers import router", True),
    ("from tierserve.backends.triton import _await_all, _call_pool", True),
    ("from .triton import _call_pool", True),
    ("from tierserve.backends.base import shared_pool\nfrom tierserve.backends.split import run_parts\n"
     "from tierserve.invoke_payload import payload\nfrom tierserve.apis import x", False),
], ids=["entry-in-a-function", "app", "handlers", "private-helpers", "relative-private", "allowed"])
def test_the_backend_rules_see_what_they_forbid(source: str, offends: bool) -> None:
    assert bool(backend_offences("tierserve.backends.sagemaker", source)) is offends


def test_no_backend_imports_an_entry_module_or_another_backends_private_helpers() -> None:
    # Given every backend module (what backends share lives in backends/base.py and backends/split.py)
    backends = {m: p for m, p in runtime_modules().items()
                if m.startswith("tierserve.backends.") and m not in BACKEND_SHARED}
    assert {"tierserve.backends.triton", "tierserve.backends.lambda_invoke"} <= set(backends)
    # When their imports are read, Then none reaches an entry module or another backend's private names
    offences = [o for m, p in backends.items() for o in backend_offences(m, p.read_text())]
    assert offences == []
