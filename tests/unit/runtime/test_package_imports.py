"""What the shipped Lambda package imports: nothing heavy at cold start, and never the local emulation.

``functions/Makefile`` strips ``tierserve/local`` from every function's package, so an import of it
anywhere else (even inside a function, even relative) would fail in AWS the first time it ran.
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
         "grpc", "matplotlib"}
PACKAGE = Path(tierserve.__file__).parent
LOCAL = "tierserve.local"


def _modules_after_import(module: str, env: dict[str, str] | None = None, then: str = "") -> set[str]:
    code = (f"import sys, json, {module}; {then}"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    base = {k: v for k, v in os.environ.items() if k not in ("LAMBDA_TASK_ROOT", "POWERTOOLS_TRACE_DISABLED",
                                                               "AWS_SAM_LOCAL", "AWS_CHALICE_CLI_MODE")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**base, **(env or {})})
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("handler", ["tierserve.handlers.router", "tierserve.handlers.cpu_inference"])
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
    return module == LOCAL or module.startswith(LOCAL + ".")


@pytest.mark.parametrize(("source", "package", "reaches"), [
    ("import tierserve.local.emulation", "tierserve", True),
    ("from tierserve import local", "tierserve", True),
    ("def f():\n    from tierserve.local.emulation import LocalContext\n", "tierserve.batch", True),
    ("from ..local import batch", "tierserve.batch", True),
    ("import importlib\nimportlib.import_module('tierserve.local.batch')", "tierserve", True),
    ("import tierserve.locale\nfrom tierserve import localisation\nfrom . import wire", "tierserve", False),
], ids=["import", "from-package", "inside-a-function", "relative", "importlib", "look-alikes"])
def test_the_import_finder_sees_every_form_of_import(source: str, package: str, reaches: bool) -> None:
    # Given a module's source, When its imports are listed, Then an import of the emulation is seen in any form
    assert any(reaches_local(name) for _, name in imported_names(source, package)) is reaches


def test_no_module_of_the_shipped_package_imports_the_local_emulation() -> None:
    # Given every module the Lambda functions ship (tierserve/ without tierserve/local/)
    shipped = [p for p in sorted(PACKAGE.rglob("*.py")) if (PACKAGE / "local") not in p.parents]
    assert len(shipped) > 20
    # When their imports are listed
    offenders = []
    for path in shipped:
        package = ".".join(("tierserve", *path.relative_to(PACKAGE).parent.parts))
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
                      for line, name in imported_names(path.read_text(), package) if reaches_local(name)]
    # Then none of them reaches tierserve.local, which the package build strips
    assert offenders == []
