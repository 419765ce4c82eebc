"""Every test module has its own basename.

Why: the test folders have no ``__init__.py``, so pytest imports each test file under its basename; two files
with one name (tests/unit/bench/test_generate.py beside tests/unit/batch/test_generate.py) make the whole
collection fail on a clean clone ("import file mismatch"), while a working tree with warm caches may not show it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_files_share_a_basename() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
