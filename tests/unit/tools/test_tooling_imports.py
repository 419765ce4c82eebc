"""The tooling package's import graph: no cycles (issue 16), counting imports inside functions too.

Why: a cycle between two tooling modules (``serve`` <-> ``stack_ops`` was one) makes their import order matter
and hides which one owns a definition; the runtime's own graph is checked in tests/unit/runtime.
"""

from __future__ import annotations

from pathlib import Path

import tierserve_tools
from tests.unit.runtime.test_package_imports import cycles, import_graph

TOOLING = Path(tierserve_tools.__file__).parent


def tooling_modules() -> dict[str, Path]:
    """Every module of ``tierserve_tools`` (``bench`` included) by dotted name."""
    modules = {}
    for path in sorted(TOOLING.rglob("*.py")):
        parts = ("tierserve_tools", *path.relative_to(TOOLING).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def test_the_tooling_package_has_no_import_cycle() -> None:
    # Given every module of the tooling and every import in it, those inside functions included
    modules = tooling_modules()
    assert {"tierserve_tools.serve", "tierserve_tools.stack_ops", "tierserve_tools.bench.cli"} <= set(modules)
    graph = import_graph({m: p.read_text() for m, p in modules.items()},
                         {m for m, p in modules.items() if p.name == "__init__.py"})
    # When its strongly connected components are found, Then there is none
    assert cycles(graph) == []
