"""Fixtures shared by every test layer: events from events/, a tiny model store, a clean runtime."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierserve.app import reset_runtime

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"


def load_event(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


@pytest.fixture
def runtime_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """A clean runtime: no cached settings, app or sessions; Powertools quiet and local."""
    for var in ("MODEL_STORE_URI", "CPU_BACKEND", "CPU_FUNCTION_NAME", "TRITON_URL", "MAX_PAYLOAD_BYTES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "tierserve-test")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "tierserve")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    reset_runtime()
    yield monkeypatch
    reset_runtime()


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding the demo 'digits' classifier (version 1), built once per session."""
    from tests.support.models import write_digits

    root = tmp_path_factory.mktemp("digits-store")
    write_digits(root)
    return root


@pytest.fixture
def lambda_context():
    from tierserve_tools.emulation import LocalContext

    return LocalContext("test-function", 1769, 30)
