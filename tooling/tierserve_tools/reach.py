"""Which modules of the runtime package a Lambda handler can import: each artifact's allowlist.

Why: a function's artifact used to be the whole ``tierserve`` package minus an ``rm -rf`` list of what must
not ship; every new tooling or edge module shipped to Lambda until someone remembered to list it. The
artifact is now built from what its handler can reach (issue 16): the handler's module, everything it
imports, transitively, counting the imports a function makes when it runs (``def f(): import x``, the lazy
imports of optional backends such as ``onnxruntime_genai``), ``importlib.import_module("literal")`` and
``__import__("literal")``, and the ``__init__.py`` of every package on the way (Python runs them).
Imports under ``if TYPE_CHECKING:`` never run, and do not count.

It reads source with :mod:`ast` and imports nothing it scans. It uses only the standard library, because
``sam build`` runs it (through :mod:`tierserve_tools.lambda_build`) with whatever ``python3`` is on PATH.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: The functions' handlers live in this package (template.yaml's ``Handler: tierserve.handlers.<x>.<fn>``).
PACKAGE = "tierserve"


class ReachError(Exception):
    """The handler or a module it imports cannot be found, or a template names no such function."""


@dataclass
class Reach:
    """What ``handler`` can import from ``root`` (a folder holding the package, e.g. ``functions/``)."""

    root: Path
    handler_module: str
    #: module name -> its source file under ``root`` (packages as their ``__init__.py``)
    modules: dict[str, Path] = field(default_factory=dict)
    #: top-level names of the imports that are neither the package nor the standard library
    third_party: set[str] = field(default_factory=set)
    #: module name -> the modules it imports (of the package only), for explaining why a module ships
    edges: dict[str, set[str]] = field(default_factory=dict)

    def files(self) -> list[Path]:
        """The source files to ship, relative to ``root``, sorted."""
        return sorted(p.relative_to(self.root) for p in self.modules.values())

    def why(self, module: str) -> list[str]:
        """A chain of imports from the handler's module to ``module`` (empty when unreachable)."""
        parents: dict[str, str | None] = {self.handler_module: None}
        queue = [self.handler_module]
        while queue:
            name = queue.pop(0)
            if name == module:
                chain: list[str] = []
                at: str | None = name
                while at is not None:
                    chain.append(at)
                    at = parents[at]
                return chain[::-1]
            for nxt in sorted(self.edges.get(name, ())):
                if nxt not in parents:
                    parents[nxt] = name
                    queue.append(nxt)
        return []


def module_file(root: Path, name: str) -> Path | None:
    """``root/a/b.py`` or ``root/a/b/__init__.py`` for ``a.b``, or None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve_relative(module: str | None, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module or ""
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    if level - 1 > len(base) - 1:
        raise ReachError(f"{importer}: relative import beyond the top-level package (level {level})")
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


class _Imports(ast.NodeVisitor):
    """Every name a module can import when it and its functions run: candidates, resolved later."""

    def __init__(self, importer: str, is_package: bool) -> None:
        self.importer, self.is_package = importer, is_package
        #: (name, optional) pairs: ``from a import b`` gives ``a`` and the candidate ``a.b`` (b may be a name)
        self.names: set[tuple[str, bool]] = set()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for stmt in node.orelse:  # `else:` of TYPE_CHECKING runs
                self.visit(stmt)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.names.add((alias.name, False))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve_relative(node.module, node.level, self.importer, self.is_package)
        self.names.add((base, False))
        for alias in node.names:
            if alias.name != "*":
                self.names.add((f"{base}.{alias.name}", True))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if called in ("import_module", "__import__") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                name = first.value
                if name.startswith("."):
                    package = node.args[1] if len(node.args) > 1 else None
                    anchor = package.value if isinstance(package, ast.Constant) and isinstance(
                        package.value, str) else self.importer
                    level = len(name) - len(name.lstrip("."))
                    name = _resolve_relative(name.lstrip(".") or None, level, anchor, True)
                self.names.add((name, False))
        self.generic_visit(node)


def imports_of(source: str, importer: str, is_package: bool = False,
               filename: str = "<source>") -> set[tuple[str, bool]]:
    """The (absolute name, optional) candidates ``importer``'s source can import (see :class:`_Imports`)."""
    visitor = _Imports(importer, is_package)
    visitor.visit(ast.parse(source, filename=filename))
    return visitor.names


def _parents(name: str) -> Iterable[str]:
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def reachable(root: Path, handler: str, package: str = PACKAGE) -> Reach:
    """Every module of ``package`` under ``root`` that ``handler`` (``pkg.mod.function`` or ``pkg.mod``)
    can import, with the ``__init__.py`` of each package on the way."""
    root = Path(root)
    module = handler
    if module_file(root, module) is None:
        module = handler.rpartition(".")[0]
    if module_file(root, module) is None:
        raise ReachError(f"handler {handler}: no module {module} under {root} "
                         f"(template.yaml's Handler is module.function, e.g. {package}.handlers.router.lambda_handler)")
    if module.split(".")[0] != package:
        raise ReachError(f"handler {handler} is not in the {package} package")
    reach = Reach(root=root, handler_module=module)
    stdlib = set(sys.stdlib_module_names)
    queue = [module]
    while queue:
        name = queue.pop()
        if name in reach.modules:
            continue
        path = module_file(root, name)
        if path is None:  # checked before it was queued
            continue
        reach.modules[name] = path
        edges = reach.edges.setdefault(name, set())
        wanted = {(p, False) for p in _parents(name)}
        wanted |= imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", str(path))
        for target, optional in sorted(wanted):
            top = target.split(".")[0]
            if top != package:
                if top and top not in stdlib and not optional:
                    reach.third_party.add(top)
                continue
            if module_file(root, target) is None:
                if optional:  # `from pkg.mod import name`: a name, not a module
                    continue
                raise ReachError(f"{name} ({path}) imports {target}, which is not a module under {root}")
            for parent in _parents(target):
                edges.add(parent)
                queue.append(parent)
            edges.add(target)
            queue.append(target)
    return reach


# --- template.yaml, read without PyYAML (sam build's python3 may not have it) ----------------------

_RESOURCE = re.compile(r"^  (?P<name>[A-Za-z0-9]+):\s*(#.*)?$")
_KEY = re.compile(r"^\s+(?P<key>Type|Handler):\s*(?P<value>[^#\s]+)")
_WRAPPER = re.compile(r"^\s+AWS_LAMBDA_EXEC_WRAPPER:\s*(?P<value>[^#\s]+)")
#: Where Lambda unpacks a function's code: an exec wrapper of the artifact is named under it.
TASK_ROOT = "/var/task/"
#: The module a shipped exec wrapper starts (``tierserve/streaming/wrapper.sh`` execs it): it ships beside it.
WRAPPER_MODULE = f"{PACKAGE}.streaming.runtime_loop"


def _resources(template_text: str) -> Iterator[tuple[str, list[str]]]:
    """Each resource under ``Resources:`` (in order): its logical id and its lines (neither blank nor comments).

    A line reader for the CloudFormation YAML this project writes (two-space indents, one resource per
    top-level key under Resources): its tags (``!Ref``, ``!Sub``) make a plain YAML load fail, and the build
    must not depend on PyYAML."""
    current: str | None = None
    lines: list[str] = []
    in_resources = False
    for line in template_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        top_level = not line.startswith(" ")
        top = _RESOURCE.match(line) if in_resources and not top_level else None
        if top_level or top:  # the resource before ends here
            if current is not None:
                yield current, lines
            current, lines = (top.group("name") if top else None), []
            if top_level:
                in_resources = line.rstrip().startswith("Resources:")
        elif current is not None:
            lines.append(line)
    if current is not None:
        yield current, lines


def exec_wrappers(template_text: str) -> dict[str, str]:
    """logical id -> its literal ``AWS_LAMBDA_EXEC_WRAPPER`` (under ``Environment: Variables:``), for every
    resource that sets one; read as :func:`template_functions` reads the template."""
    found: dict[str, str] = {}
    for name, lines in _resources(template_text):
        for line in lines:
            wrapper = _WRAPPER.match(line)
            if wrapper:
                found[name] = wrapper.group("value").strip("'\"")
    return found


def wrapper_file(template: Path, logical_id: str, root: Path) -> Path | None:
    """The artifact file ``logical_id``'s ``AWS_LAMBDA_EXEC_WRAPPER`` names (``/var/task/<file>``), relative to
    ``root``; None when it sets none; a :class:`ReachError` when it names a file outside the artifact or one
    that does not exist under ``root``."""
    value = exec_wrappers(Path(template).read_text(encoding="utf-8")).get(logical_id)
    if value is None:
        return None
    if not value.startswith(TASK_ROOT):
        raise ReachError(f"{logical_id}: AWS_LAMBDA_EXEC_WRAPPER {value} is not in the artifact ({TASK_ROOT}...)")
    rel = Path(value[len(TASK_ROOT):])
    if not (Path(root) / rel).is_file():
        raise ReachError(f"{logical_id}: AWS_LAMBDA_EXEC_WRAPPER names {value}, but there is no {rel} under {root}")
    return rel


def template_functions(template_text: str) -> dict[str, str]:
    """logical id -> Handler for every ``AWS::Serverless::Function`` under ``Resources:`` (in order), read by
    :func:`_resources`'s line reader. A function with no literal Handler is an error.
    """
    functions: dict[str, str] = {}
    for name, lines in _resources(template_text):
        fields: dict[str, str] = {}
        for line in lines:
            key = _KEY.match(line)
            if key and key.group("key") not in fields:
                fields[key.group("key")] = key.group("value")
        if fields.get("Type") == "AWS::Serverless::Function":
            if "Handler" not in fields:
                raise ReachError(f"template: function {name} has no literal Handler")
            functions[name] = fields["Handler"].strip("'\"")
    return functions


def function_handler(template: Path, logical_id: str) -> str:
    """template.yaml's Handler for ``logical_id``, or a :class:`ReachError` that lists the declared functions."""
    functions = template_functions(Path(template).read_text(encoding="utf-8"))
    if logical_id not in functions:
        raise ReachError(f"{template} declares no function {logical_id}; it declares: {', '.join(functions)}")
    return functions[logical_id]
