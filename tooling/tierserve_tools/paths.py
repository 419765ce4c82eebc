"""Where the tooling finds the project's files, from any working directory.

Why: `tierserve serve`, `invoke` and `artifact-invoke` read the stack's ``template.yaml`` and the default
environment overrides (``events/local-env.json``). Reading them only from ``./`` made the commands work
from the repository's root alone. The order here is: the path given on the command line; the file in
the current directory (a checkout, or a project of the user's own with its own template); the copy that
ships inside this package (``tierserve_tools/data/``: links to the repository's files in a checkout,
copied into the wheel by setuptools).
"""

from __future__ import annotations

from pathlib import Path

from tierserve.errors import ConfigurationError

PACKAGE_DATA = Path(__file__).resolve().parent / "data"


def repo_root() -> Path | None:
    """The source checkout this package runs from (pyproject.toml beside functions/tierserve), or None."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() and (parent / "functions" / "tierserve").is_dir():
            return parent
    return None


def require_repo_root(why: str) -> Path:
    """:func:`repo_root`, or a clear error naming what needed a checkout."""
    root = repo_root()
    if root is None:
        raise ConfigurationError(f"{why} needs tierserve's source checkout (pyproject.toml and functions/); "
                                 "run it from a clone of the repository")
    return root


def _find(name: str, relative: str, explicit: Path | str | None) -> Path:
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigurationError(f"{name} not found at {path}; pass an existing file")
        return path
    here = Path(relative)
    if here.is_file():
        return here
    packaged = PACKAGE_DATA / Path(relative).name
    if packaged.is_file():
        return packaged
    raise ConfigurationError(f"no {name}: none at ./{relative} and none shipped with tierserve_tools; "
                             f"pass its path with the command's flag")


def template(explicit: Path | str | None = None) -> Path:
    """The SAM template: ``explicit``, else ./template.yaml, else the one that ships with the tooling."""
    return _find("template.yaml", "template.yaml", explicit)


def local_env(explicit: Path | str | None = None) -> Path:
    """SAM's ``--env-vars`` file for local runs: ``explicit``, else ./events/local-env.json, else the shipped one."""
    return _find("local-env.json", "events/local-env.json", explicit)


def sam_env(explicit: Path | str | None = None) -> Path:
    """The env-vars file for SAM's containers: ``explicit``, else ./events/sam-env.json, else the shipped one."""
    return _find("sam-env.json", "events/sam-env.json", explicit)


def default_local_env() -> Path | None:
    """:func:`local_env` when one exists (local runs need none: the template's own environment applies)."""
    try:
        return local_env()
    except ConfigurationError:
        return None
