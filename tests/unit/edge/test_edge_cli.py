"""`tierserve edge` / `tierserve-edge`: one sync with --once, and clear errors for bad flags."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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


def test_the_process_writes_nothing_per_request_to_stdout(store_dir: Path, tmp_path: Path) -> None:
    # Given `tierserve edge` whose stdout (a pipe) is read once, for the ready line, as a supervisor might
    import re

    from tests.support.fakes import json_body, rows_of
    from tierserve.client import Client

    proc = subprocess.Popen([sys.executable, "-m", "tierserve.edge.cli", "--store", str(store_dir), "--cache-dir",
                             str(tmp_path / "cache"), "--port", "0", "--grpc-port", "-1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = re.search(r"ready on (http://\S+)", proc.stdout.readline()).group(1)
        api = Client(url, timeout_s=10)
        # (the first sync runs in the background after "ready on": wait until the model is held, as a client would)
        deadline = time.monotonic() + 60
        while api.request("GET", "/v2/models/lin/ready").status != 200:
            assert time.monotonic() < deadline, "the edge never synced 'lin'"
            time.sleep(0.05)
        # When it serves far more requests than a pipe buffer holds of per-request lines (EMF, logs)
        codes = {api.request("POST", "/v2/models/lin/infer", json_body(rows_of(1))).status for _ in range(400)}
        # Then every one is answered: nothing blocks on a full stdout
        assert codes == {200}
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


def test_version_prints_the_installed_package_version() -> None:
    from importlib.metadata import version

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"tierserve-edge {version('tierserve')}"


def test_a_busy_port_names_the_port_and_the_flag_to_change(store_dir: Path, tmp_path: Path) -> None:
    from tests.support.ports import listening

    # Given something already listening on a port, as the HTTP port and then as the gRPC port
    with listening() as busy:
        base = ("--store", str(store_dir), "--cache-dir", str(tmp_path / "cache"))
        for flags, named in ((("--port", str(busy), "--grpc-port", "-1"), "--port"),
                             (("--port", "0", "--grpc-port", str(busy)), "--grpc-port")):
            # When the edge starts on it
            out = run(*base, *flags)
            # Then it exits 2 with the port and the flag (and its variable) that move it, and no traceback
            assert out.returncode == 2, out.stderr
            assert f"port {busy}" in out.stderr and f"{named} " in out.stderr, out.stderr
            assert "Traceback" not in out.stderr
