"""`tierserve triton`'s command line: a busy port is named with its flag before tritonserver starts (issue 16,
defect 10). The server process itself is tested against the real binary in tests/integration/test_triton_local.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.ports import listening
from tierserve_tools.cli import main


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port", "--metrics-port"])
def test_a_busy_port_names_the_port_and_the_flag_to_change(flag: str, tmp_path: Path, capsys) -> None:
    with listening() as busy:
        code = main(["triton", "--repository", str(tmp_path / "repo"), flag, str(busy),
                     *(f for other in ("--http-port", "--grpc-port", "--metrics-port") if other != flag
                       for f in (other, "0"))])
    err = capsys.readouterr().err
    assert code == 2 and f"port {busy}" in err and f"{flag} " in err and "already in use" in err, err


class _Server:
    """A TritonServer stand-in: exits when told, fails its next ``fail`` starts."""

    startup_timeout_s = 1.0

    def __init__(self, fail: int = 0) -> None:
        self.code: int | None = None
        self.fail = fail
        self.reaped = 0
        self.starts: list[float] = []
        self.pid = 1

    def exit_code(self) -> int | None:
        return self.code

    def reap(self) -> None:
        self.reaped += 1
        self.code = None

    def start(self, die_with_parent: bool | None = None) -> None:
        import time

        from tierserve_tools.triton import TritonServerError

        self.starts.append(time.monotonic())
        if self.fail:
            self.fail -= 1
            raise TritonServerError("tritonserver exited with code 1 before becoming ready\nlog tail")


def test_the_supervisor_reaps_at_once_and_restarts_with_a_doubling_backoff() -> None:
    import time

    from tierserve_tools.triton import TritonSupervisor

    # Given a server whose first two starts after a crash fail
    server, events = _Server(fail=2), []
    sup = TritonSupervisor(server, backoff_s=(0.1, 0.3), poll_s=0.01, on_event=events.append).start()
    try:
        # When it exits on its own
        server.code = -9
        t0 = time.monotonic()
        deadline = t0 + 5
        while sup.status()["restarts"] < 1:
            assert time.monotonic() < deadline, events
            time.sleep(0.01)
        # Then its process group was reaped at once, and the starts came after 0.1, 0.2 and 0.3 s (capped)
        gaps = [b - a for a, b in zip([t0, *server.starts], server.starts, strict=False)]
        assert server.reaped == 1 and len(server.starts) == 3
        assert all(want <= gap < want + 1.0 for want, gap in zip((0.1, 0.2, 0.3), gaps, strict=True)), gaps
        assert sup.status() == {"state": "serving", "restarts": 1, "last_exit": -9, "last_error": None,
                                "next_attempt_in_s": None}
        assert "did not start again (tritonserver exited with code 1 before becoming ready)" in events[1]
        assert events[-1].startswith("tritonserver restarted")
    finally:
        sup.stop()
    assert sup.status()["state"] == "stopped"
