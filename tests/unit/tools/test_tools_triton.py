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
