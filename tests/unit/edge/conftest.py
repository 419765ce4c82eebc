"""Fixtures for the edge runtime's unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.edge import write_edge_store


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A store folder: 'lin' v1 on the edge (and the cloud CPU), 'cpu-only' and 'gpu-only' not on the edge."""
    return write_edge_store(tmp_path / "store")
