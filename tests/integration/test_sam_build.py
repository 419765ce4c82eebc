"""The README's deploy step, `sam build`, for real: every function template.yaml declares (issue 16, defect 1).

`sam build` (aws-sam-cli in .venv-tools, `make lint-tools`) runs each function's `BuildMethod: makefile`
target in functions/Makefile with Lambda's platform, arm64 / Python 3.12: wheels for that platform from the
package registries, no Docker. A function without a target failed the whole build on a fresh clone
(`No rule to make target 'build-CpuInferenceFunction3538'`); here every declared function must build, the
memory classes included, and its artifact must hold what its handler can reach and nothing else
(tierserve_tools.reach), with no emulation, within Lambda's 250 MB unzipped.

It skips only where sam is not installed or the registries cannot be reached (the reason says which).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from tierserve_tools.sam import load_template

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LINT_VENV = Path(os.environ.get("LINT_VENV", ROOT / ".venv-tools"))
TEMPLATE = ROOT / "template.yaml"
#: Lambda's quota for a function's deployment package, unzipped (250 MB, counted in MiB by AWS: 262,144,000 bytes)
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024


def _sam() -> str:
    path = LINT_VENV / "bin" / "sam"
    if path.is_file():
        return str(path)
    found = shutil.which("sam")
    if found is None:
        pytest.skip(f"sam is not installed: run `make lint-tools` (a virtualenv of its own, {LINT_VENV})")
    return found


def _index_unreachable() -> str | None:
    """Why pip's index cannot be reached from here, or None when it can."""
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    host = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((host.hostname or "pypi.org", host.port or 443), timeout=10):
            return None
    except OSError as exc:
        return f"the package registry {url} cannot be reached ({exc})"


def declared_functions() -> dict[str, str]:
    """logical id -> Handler, for every AWS::Serverless::Function in template.yaml."""
    resources = load_template(TEMPLATE)["Resources"]
    return {name: res["Properties"]["Handler"] for name, res in resources.items()
            if res.get("Type") == "AWS::Serverless::Function"}


@pytest.fixture(scope="module")
def sam_build(tmp_path_factory) -> dict[str, Path]:
    """`sam build` as the README runs it, into a scratch build dir: logical id -> artifact."""
    sam = _sam()
    out = tmp_path_factory.mktemp("sam") / "build"
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    started = time.monotonic()
    done = subprocess.run([sam, "build", "--template-file", str(TEMPLATE), "--build-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    print(f"sam build of {len(declared_functions())} functions: {time.monotonic() - started:.1f} s")
    if done.returncode != 0:
        why = _index_unreachable()
        if why is not None:
            pytest.skip(f"sam build needs the package registries for arm64 wheels: {why}")
    assert done.returncode == 0, f"sam build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return {fn: out / fn for fn in declared_functions()}


def test_sam_build_builds_every_function_the_template_declares(sam_build):
    functions = declared_functions()
    assert len(functions) >= 7, functions  # Router, the CPU function and its memory classes, Batch, Rollout
    for fn, handler in functions.items():
        module = handler.rpartition(".")[0]
        assert (sam_build[fn] / (module.replace(".", "/") + ".py")).is_file(), f"{fn}: no {module} in its artifact"


def _top_levels(dist_info: Path) -> set[str]:
    """The top-level names (packages, modules, extension files) a distribution installed (its RECORD)."""
    names = set()
    for line in (dist_info / "RECORD").read_text().splitlines():
        first = line.split(",")[0].split("/")[0]
        if first and not first.endswith(".dist-info") and first not in ("..", "bin"):
            names.add(first.split(".")[0] if first.endswith((".py", ".so", ".pth")) else first)
    return names


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _requirement_closure(artifact: Path, requirements: Path) -> set[str]:
    """The distributions the requirements file asks for, and theirs, transitively (markers and extras
    counted, as a superset), by normalised name, as the artifact's own metadata states them."""
    import re

    requires: dict[str, set[str]] = {}
    for info in artifact.glob("*.dist-info"):
        meta = (info / "METADATA").read_text(errors="replace")
        name = _norm(re.search(r"^Name: (.+)$", meta, re.M).group(1).strip())
        requires[name] = {_norm(re.match(r"[A-Za-z0-9._-]+", r).group(0))
                          for r in re.findall(r"^Requires-Dist: (.+)$", meta, re.M)}
    wanted = {_norm(re.match(r"[A-Za-z0-9._-]+", ln.strip()).group(0)) for ln in requirements.read_text().splitlines()
              if ln.strip() and not ln.strip().startswith("#")}
    closure: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name not in closure:
            closure.add(name)
            wanted |= requires.get(name, set())
    return closure


def _requirements_file(handler_module: str) -> Path:
    import re

    text = (ROOT / "functions" / "Makefile").read_text()
    match = re.search(re.escape(handler_module) + r":(\S+)", text)
    assert match, f"functions/Makefile's REQUIREMENTS names no requirements file for {handler_module}"
    return ROOT / "functions" / match.group(1)


def test_each_artifact_holds_what_its_handler_reaches_and_nothing_else(sam_build):
    import modulefinder

    from tierserve_tools.lambda_build import package_modules, size_bytes
    from tierserve_tools.reach import WRAPPER_MODULE, reachable, wrapper_file

    for fn, handler in declared_functions().items():
        task = sam_build[fn]
        shipped = set(package_modules(task))
        found = reachable(ROOT / "functions", handler)
        wrapper = wrapper_file(ROOT / "template.yaml", fn, ROOT / "functions")
        if wrapper is not None:  # the streaming runtime loop (AWS_LAMBDA_EXEC_WRAPPER) ships, executable
            assert os.access(task / wrapper, os.X_OK), f"{fn}: {wrapper} is not executable in its artifact"
            found.modules.update(reachable(ROOT / "functions", WRAPPER_MODULE).modules)
        # no emulation, no tooling, no compiler, no edge runtime
        assert not (task / "tierserve_tools").exists() and not (task / "tierserve_compiler").exists(), fn
        assert not (task / "benchmarks").exists() and not (task / "tierserve" / "edge").exists(), fn
        assert not (task / "boto3").exists() and not (task / "botocore").exists(), fn  # Lambda's runtime has them
        # exactly the modules its handler can import (reach), checked against the standard library's
        # bytecode-based ModuleFinder over the artifact alone: every module shipped is one it reaches
        assert shipped == set(found.modules), (fn, shipped ^ set(found.modules))
        others = [p.name.split(".")[0] for p in task.iterdir() if p.name != "tierserve"]
        finder = modulefinder.ModuleFinder(path=[str(task)], excludes=others)
        finder.import_hook(found.handler_module)
        if wrapper is not None:
            finder.import_hook(WRAPPER_MODULE)
        unreached = shipped - set(finder.modules)
        assert not unreached, f"{fn} ships modules its handler cannot import: {sorted(unreached)}"
        # third party: only what its requirements file asks for, transitively
        requirements = _requirements_file(found.handler_module)
        closure = _requirement_closure(task, requirements)
        owners = {top: _norm(info.name.split("-")[0]) for info in task.glob("*.dist-info")
                  for top in _top_levels(info)}
        for entry in task.iterdir():
            top = entry.name.split(".")[0]
            if entry.name == "tierserve" or entry.name.endswith(".dist-info"):
                continue
            assert top in owners, f"{fn}: {entry.name} belongs to no installed distribution"
            assert owners[top] in closure, f"{fn}: {entry.name} ({owners[top]}) is not required by {requirements.name}"
        # Lambda's quota
        size = size_bytes(task)
        print(f"{fn}: {size / 2**20:.1f} MB unzipped, {len(shipped)} tierserve modules")
        assert size <= LAMBDA_UNZIPPED_LIMIT, f"{fn}: {size / 2**20:.1f} MB unzipped, over Lambda's 250 MB"


def test_batch_generate_function_holds_the_engine_and_neither_pyarrow_nor_tritonclient(sam_build):
    """Issue 19: OpenAI batch jobs run in BatchGenerateFunction, because BatchInferenceFunction's package (pyarrow,
    tritonclient) has no room for the engine; this one must hold onnxruntime-genai, tokenizers and jinja2, and fit."""
    from tierserve_tools.lambda_build import size_bytes

    task = sam_build["BatchGenerateFunction"]
    for package in ("onnxruntime_genai", "tokenizers", "jinja2", "onnxruntime", "numpy", "orjson"):
        assert (task / package).is_dir(), f"BatchGenerateFunction's artifact holds no {package}"
    for package in ("pyarrow", "tritonclient", "gevent", "grpc"):
        assert not (task / package).exists(), f"BatchGenerateFunction's artifact holds {package}"
    assert (task / "tierserve" / "handlers" / "batch_generate.py").is_file()
    assert (task / "tierserve" / "batch" / "generate.py").is_file()
    assert (task / "tierserve" / "generation" / "engine.py").is_file()
    size = size_bytes(task)
    print(f"BatchGenerateFunction: {size / 2**20:.1f} MB unzipped")
    assert size <= LAMBDA_UNZIPPED_LIMIT
