"""A real moto_server (S3, SQS, DynamoDB, CloudWatch over HTTP) on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tierserve_tools.emulation import free_port


def moto_server_command(port: int) -> list[str]:
    """moto_server, with percentile statistics for CloudWatch added (``tierserve_tools.moto_ext``)."""
    return [sys.executable, "-m", "tierserve_tools.moto_ext", "-H", "127.0.0.1", "-p", str(port)]


class MotoServer:
    def __init__(self, log_path: Path | None = None, port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> MotoServer:
        if self.log_path is not None:
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(moto_server_command(self.port), stdout=self._log or subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)  # Ctrl-C reaches the owner, who stops us in order
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).read()  # noqa: S310 - loopback
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start within {timeout_s:.0f} s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


@contextmanager
def running_moto_server(log_path: Path | None = None) -> Iterator[str]:
    """Start moto_server, yield its endpoint URL, and always stop it."""
    server = MotoServer(log_path).start()
    try:
        yield server.url
    finally:
        server.stop()
