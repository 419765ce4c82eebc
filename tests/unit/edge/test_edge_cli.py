"""`tierserve edge` / `tierserve-edge`: one sync with --once, and clear errors for bad flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tierserve.edge.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_once_syncs_and_prints_the_devices_status(store_dir: Path, tmp_path: Path) -> None:
    out = run("--store", str(store_dir), "--cache-dir", str(tmp_path / "cache"), "--once")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["sync"]["state"] == "ok" and [m["name"] for m in status["models"]] == ["lin"]


def test_an_unreachable_store_with_once_exits_1_and_a_bad_flag_exits_2(tmp_path: Path) -> None:
    out = run("--store", str(tmp_path / "none"), "--cache-dir", str(tmp_path / "cache"), "--once")
    assert out.returncode == 1 and "no manifest" in json.loads(out.stdout)["sync"]["last_error"]
    out = run("--port", "eighty")
    assert out.returncode == 2 and "--port (EDGE_PORT) = 'eighty' is invalid" in out.stderr
    assert "Traceback" not in out.stderr
