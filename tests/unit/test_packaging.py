"""The wheel ships every package of the project and nothing else at the top level.

Why: ``[tool.setuptools] packages`` is an explicit list, so a new subpackage that is not named in it works in
the editable install (tests, CI) and is missing from the wheel a device installs (``tierserve edge package``)
or a user installs from PyPI.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_in_the_source_tree_is_in_the_wheel_and_benchmarks_is_not_top_level() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = config["package-dir"]
    found = set()
    for package, folder in dirs.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            found.add(".".join((package, *rel.parts)))
    assert found - listed == set(), f"packages missing from pyproject's list: {sorted(found - listed)}"
    assert listed - found == set(), f"listed packages with no folder: {sorted(listed - found)}"
    assert not any(p.split(".")[0] == "benchmarks" for p in listed)
