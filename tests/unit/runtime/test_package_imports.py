"""What the shipped Lambda package imports: nothing heavy at cold start, and never the local emulation.

``functions/Makefile`` strips ``tierserve/local`` from every function's package, so an import of it
anywhere else (even inside a function, even relative) would fail in AWS the first time it ran.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tierserve

HEAVY = {"onnxruntime", "tritonclient", "torch", "onnx", "sklearn", "skl2onnx", "tierserve_compiler", "gevent",
         "grpc", "matplotlib"}
PACKAGE = Path(tierserve.__file__).parent
LOCAL = "tierserve.local"


def _modules_after_import(module: str) -> set[str]:
    code = (f"import sys, json, {module}; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("handler", ["tierserve.handlers.router", "tierserve.handlers.cpu_inference"])
def test_importing_a_handler_pulls_in_no_heavy_library(handler):
    # When the handler module is imported cold, Then none of the heavy libraries is loaded yet
    loaded = _modules_after_import(handler)
    assert not (HEAVY & loaded), f"{handler} imports {sorted(HEAVY & loaded)} at import time"


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
