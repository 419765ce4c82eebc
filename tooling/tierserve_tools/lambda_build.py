"""Build one Lambda function's artifact: its requirements' wheels for Lambda's platform, then the modules of
``tierserve`` that its handler can reach, and nothing else.

Why: ``functions/Makefile``'s ``build-%`` target runs this for every function template.yaml declares
(``sam build``'s ``BuildMethod: makefile``, ``make package``, ``tierserve artifact-invoke``), so a new
function, a memory class, needs no new target (issue 16, defect 1), and what ships is an allowlist
computed from the template's ``Handler`` (:mod:`tierserve_tools.reach`), never the whole package minus an
``rm -rf`` list. A function whose template environment sets ``AWS_LAMBDA_EXEC_WRAPPER`` (the streaming runtime
loop, issue 17: ``/var/task/tierserve/streaming/wrapper.sh``) also ships that script, executable, and the
modules its loop (``tierserve.streaming.runtime_loop``) reaches.

Speed: ``sam build`` builds seven functions from four requirements files. The third-party part of an
artifact is installed once per (requirements file, platform) into a cache (``build/lambda-deps``, or
``TIERSERVE_LAMBDA_DEPS``), under a file lock so that ``sam build --parallel`` installs it once, and each
function's artifact links (or copies) those files. The cache is reused while the requirements file is
unchanged and younger than ``TIERSERVE_LAMBDA_DEPS_TTL_S`` (a day by default; 0 resolves afresh);
``make clean`` removes it.

Only the standard library: ``sam build`` runs this with the ``python3`` on PATH, with ``tooling/`` on
``PYTHONPATH`` and nothing installed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tierserve_tools import reach

#: What Lambda's Python runtime provides beside /var/task: a second copy would cost 30+ MB and never be used
#: (pip installs them as dependencies of aws-xray-sdk and tritonclient's extras).
RUNTIME_PROVIDED = ("boto3", "botocore", "s3transfer")
#: Distributions an extra installs that no function imports: tritonclient's ``http`` extra brings aiohttp (and
#: its own dependencies) for ``tritonclient.http.aio`` alone; tierserve uses the synchronous client. 15 MB.
NEVER_IMPORTED = ("aiohttp",)
#: Lambda's quota for a function's code and layers, unzipped: 250 MB (262,144,000 bytes, AWS counts MiB).
LAMBDA_UNZIPPED_LIMIT = 250 * 1024 * 1024
#: Parts of third-party packages that no function loads, left out so that BatchInferenceFunction (onnxruntime,
#: numpy, pyarrow, tritonclient) fits in 250 MB: 345 MB with them. Each is optional by its package's design
#: (pyarrow.fs imports its S3/GCS/Azure/HDFS filesystems in ``try: ... except ImportError``; Flight and ORC
#: are separate modules that nothing imports; no library NEEDs them), or is never imported at run time
#: (test suites, C headers, Cython sources, the unversioned and fully versioned copies of shared libraries
#: that only extension builds link: the loader asks for ``lib*.so.<major>``). Globs, under the package's folder.
TRIM = {
    "pyarrow": ("_flight.*", "flight.py", "libarrow_flight.so*", "libarrow_python_flight.so*",
                "_s3fs.*", "libarrow_s3.so*", "_gcsfs.*", "_azurefs.*", "_hdfs.*",
                "_orc.*", "_dataset_orc.*", "orc.py", "include", "src", "tests", "*.pyx", "*.pxd", "*.pxi",
                "libarrow*.so", "libparquet*.so", "libarrow*.so.*.*.*", "libparquet*.so.*.*.*"),
    "numpy": ("*/tests", "tests", "_core/include", "*/*.pyx", "*/*.pxd"),
    # beside the packages: pip's --target puts C headers (greenlet's), console scripts and data files here
    ".": ("include", "bin"),
}
DEFAULT_TTL_S = 86_400


class BuildError(Exception):
    """A function cannot be built: what failed and what to do."""


def pip_target_flags(arch: str, python_version: str) -> list[str]:
    """Wheels for Lambda's platform only: manylinux_2_28 included (onnxruntime and numpy ship no
    manylinux2014 aarch64 wheels any more; Lambda's python3.12 runtime has glibc 2.34)."""
    return ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version,
            *(f for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014")
              for f in ("--platform", f"{tag}_{arch}"))]


def parse_requirements_map(text: str) -> dict[str, str]:
    """``"module:file module:file"`` (functions/Makefile's REQUIREMENTS) -> {handler module: file}."""
    out: dict[str, str] = {}
    for item in text.split():
        module, sep, path = item.partition(":")
        if not sep or not module or not path:
            raise BuildError(f"REQUIREMENTS entry {item!r} is not handler_module:requirements-file")
        out[module] = path
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if match:
            names.add(_norm(match.group(1)))
    return names


def _unrequired(site: Path, requirements: Path) -> set[str]:
    """The distributions in ``site`` that the requirements file does not need, transitively, once what
    Lambda's runtime provides is taken as given: boto3, botocore, s3transfer, and what only they need
    (python-dateutil, ...: the runtime's botocore comes with its own); and :data:`NEVER_IMPORTED`, with what
    only it needs. Markers and extras are not evaluated:
    every Requires-Dist counts, so a distribution is only ever kept too readily, never dropped wrongly."""
    requires: dict[str, set[str]] = {}
    for info in site.glob("*.dist-info"):
        meta = (info / "METADATA").read_text(encoding="utf-8", errors="replace")
        found = re.search(r"^Name:\s*(.+)$", meta, re.M)
        if found:
            requires[_norm(found.group(1).strip())] = _requirement_names(
                re.findall(r"^Requires-Dist:\s*(.+)$", meta, re.M))
    given = {_norm(p) for p in (*RUNTIME_PROVIDED, *NEVER_IMPORTED)}
    wanted = _requirement_names(requirements.read_text(encoding="utf-8").splitlines()) - given
    needed: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name not in needed:
            needed.add(name)
            wanted |= requires.get(name, set()) - given
    return set(requires) - needed


def _dist_files(site: Path, project: str) -> list[Path]:
    """The files pip installed for ``project`` in ``site`` (its RECORD), dist-info included."""
    norm = _norm(project)
    files: list[Path] = []
    for info in site.glob("*.dist-info"):
        if _norm(info.name.split("-")[0]) != norm:
            continue
        record = info / "RECORD"
        if record.is_file():
            for line in record.read_text(encoding="utf-8").splitlines():
                rel = line.split(",")[0]
                if rel:
                    files.append(site / rel)
        files.append(info)
    return files


def _remove(paths: list[Path], site: Path) -> None:
    for path in paths:
        resolved = path.resolve()
        if site.resolve() not in resolved.parents:
            continue  # a RECORD entry outside the site (bin/../): never delete outside it
        if resolved.is_dir():
            shutil.rmtree(resolved)
        elif resolved.exists():
            resolved.unlink()
    for folder in sorted((p for p in site.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # the empty folders left behind


def third_party_site(requirements: Path, arch: str, python_version: str, pip: list[str], cache_root: Path,
                     ttl_s: float = DEFAULT_TTL_S, log=print) -> Path:  # type: ignore[no-untyped-def]
    """The requirements installed for Lambda's platform, once per (file, platform), minus what Lambda's
    runtime provides. Returns the folder; a fresh one is installed when missing or older than ``ttl_s``."""
    flags = pip_target_flags(arch, python_version)
    # the requirements, the platform and this file (what it removes and trims) name the install
    key = hashlib.sha256("\0".join([requirements.read_text(encoding="utf-8"), *flags,
                                     Path(__file__).read_text(encoding="utf-8")]).encode()).hexdigest()[:12]
    home = cache_root / f"{requirements.stem}-{arch}-py{python_version}-{key}"
    site, done = home / "site", home / "site.json"
    with _locked(home / ".lock"):
        if done.is_file() and time.time() - done.stat().st_mtime < ttl_s and site.is_dir():
            return site
        for stale in cache_root.glob(f"{requirements.stem}-{arch}-py{python_version}-*"):
            if stale != home:  # an install for an older requirements file or build: never used again
                shutil.rmtree(stale, ignore_errors=True)
        staging = home / "site.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [*pip, "install", "-q", "--no-compile", "--target", str(staging), *flags, "-r", str(requirements)]
        log(f"installing {requirements.name} for {arch} / Python {python_version} into {home}")
        started = time.monotonic()
        ran = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if ran.returncode != 0:
            raise BuildError(f"pip could not install {requirements} for Lambda ({arch}, Python {python_version}); "
                             f"it needs the package registries.\n$ {shlex.join(cmd)}\n{ran.stdout[-2000:]}"
                             f"{ran.stderr[-4000:]}")
        for project in sorted(_unrequired(staging, requirements)):
            _remove(_dist_files(staging, project), staging)
        _trim(staging)
        shutil.rmtree(site, ignore_errors=True)
        staging.rename(site)
        done.write_text(json.dumps({"requirements": str(requirements), "arch": arch, "python": python_version,
                                    "seconds": round(time.monotonic() - started, 1)}) + "\n")
        return site


def _trim(site: Path) -> None:
    """Leave out :data:`TRIM`'s parts (each package's folder only; nothing outside it)."""
    for package, patterns in TRIM.items():
        folder = site / package
        if not folder.is_dir():
            continue
        for pattern in patterns:
            for path in folder.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
    for path in site.iterdir():  # a wheel's data files land at the top (a LICENSE.txt): not importable
        if path.is_file() and not path.name.endswith((".py", ".so", ".pth")):
            path.unlink()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _empty(out: Path) -> None:
    """An empty ``out``: an earlier artifact there is removed (no module of it may linger); any other
    content is an error, never deleted."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / reach.PACKAGE / "handlers").is_dir():
            raise BuildError(f"{out} is not empty and holds no earlier artifact: give an empty folder")
        for entry in out.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def build(logical_id: str, out: Path, template: Path, source: Path, requirements_map: dict[str, str],
          arch: str, python_version: str, pip: list[str], cache_root: Path, ttl_s: float = DEFAULT_TTL_S,
          log=print) -> reach.Reach:  # type: ignore[no-untyped-def]
    """Build ``logical_id``'s artifact into ``out`` (see the module docstring); returns what it ships."""
    try:
        handler = reach.function_handler(template, logical_id)
        found = reach.reachable(source, handler)
        wrapper = reach.wrapper_file(template, logical_id, source)
        if wrapper is not None:  # the exec wrapper execs the streaming runtime loop: it and what it imports ship
            loop = reach.reachable(source, reach.WRAPPER_MODULE)
            for name, path in loop.modules.items():
                found.modules.setdefault(name, path)
            found.third_party |= loop.third_party
    except reach.ReachError as exc:
        raise BuildError(str(exc)) from exc
    if found.handler_module not in requirements_map:
        raise BuildError(f"{logical_id}: its handler's module {found.handler_module} has no requirements file: "
                         f"add `{found.handler_module}:requirements-<name>.txt` to REQUIREMENTS in "
                         f"{source / 'Makefile'}")
    requirements = source / requirements_map[found.handler_module]
    if not requirements.is_file():
        raise BuildError(f"{logical_id}: no requirements file {requirements}")
    site = third_party_site(requirements, arch, python_version, pip, cache_root, ttl_s, log)
    _empty(out)
    shutil.copytree(site, out, copy_function=_link_or_copy, dirs_exist_ok=True)
    for rel in found.files():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, out / rel)
    if wrapper is not None:
        (out / wrapper).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / wrapper, out / wrapper)
        (out / wrapper).chmod(0o755)  # Lambda execs it
    log(f"{logical_id}: {len(found.modules)} {reach.PACKAGE} modules from {handler}, "
        f"{requirements.name}, {size_bytes(out) / 2**20:.1f} MB unzipped")
    return found


def size_bytes(tree: Path) -> int:
    """Bytes unzipped: what Lambda counts against its 250 MB (apparent sizes, each file once)."""
    return sum(p.stat().st_size for p in Path(tree).rglob("*") if p.is_file() and not p.is_symlink())


def package_modules(tree: Path, package: str = reach.PACKAGE) -> list[str]:
    """The modules of ``package`` an artifact holds (dotted names)."""
    root = Path(tree)
    names = []
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tierserve_tools.lambda_build", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build one function's artifact")
    b.add_argument("function", help="the function's logical id in the template")
    b.add_argument("--out", required=True, type=Path, help="the artifact's folder (SAM's ARTIFACTS_DIR)")
    b.add_argument("--template", type=Path, default=_repo_root() / "template.yaml", help="the SAM template")
    b.add_argument("--source", type=Path, default=_repo_root() / "functions",
                   help="the folder with the tierserve package and the requirements files")
    b.add_argument("--requirements", required=True,
                   help="handler_module:requirements-file pairs, space-separated (functions/Makefile's REQUIREMENTS)")
    b.add_argument("--arch", default="aarch64", help="aarch64 (Lambda arm64) or x86_64")
    b.add_argument("--python-version", default="3.12", help="Lambda's runtime Python, MAJOR.MINOR")
    b.add_argument("--pip", default=f"{sys.executable} -m pip", help="the pip command line")
    b.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("TIERSERVE_LAMBDA_DEPS", _repo_root() / "build" / "lambda-deps")),
                   help="where each requirements file's install is kept (TIERSERVE_LAMBDA_DEPS)")
    b.add_argument("--ttl-s", type=float, default=float(os.environ.get("TIERSERVE_LAMBDA_DEPS_TTL_S", DEFAULT_TTL_S)),
                   help="reuse a cached install younger than this (TIERSERVE_LAMBDA_DEPS_TTL_S; 0: resolve afresh)")
    f = sub.add_parser("functions", help="print the functions the template declares, one per line")
    f.add_argument("--template", type=Path, default=_repo_root() / "template.yaml")
    r = sub.add_parser("report", help="each artifact's size unzipped and its tierserve module count")
    r.add_argument("artifacts", nargs="+", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.command == "functions":
            print("\n".join(reach.template_functions(args.template.read_text(encoding="utf-8"))))
        elif args.command == "report":
            worst = 0
            for tree in args.artifacts:
                size = size_bytes(tree)
                worst = max(worst, size)
                print(f"{tree.name}: {size / 2**20:.1f} MB unzipped (Lambda limit 250 MB), "
                      f"{len(package_modules(tree))} {reach.PACKAGE} modules")
            return 0 if worst <= LAMBDA_UNZIPPED_LIMIT else 1
        else:
            build(args.function, args.out.resolve(), args.template.resolve(), args.source.resolve(),
                  parse_requirements_map(args.requirements), args.arch, args.python_version,
                  shlex.split(args.pip), args.cache.resolve(), args.ttl_s)
    except (BuildError, OSError) as exc:
        print(f"error: {str(exc)[:4000]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
