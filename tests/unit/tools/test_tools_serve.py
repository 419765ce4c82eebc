"""`tierserve serve`'s command line: a busy port is named with the flag that moves it (issue 16, defect 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.ports import free_pair, listening
from tierserve_tools.cli import main


@pytest.fixture
def models(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "manifest.json").write_text("{}")  # the ports are bound before it is read
    return tmp_path / "models"


def serve(models: Path, workdir: Path, *flags: str) -> int:
    return main(["serve", "--models", str(models), "--workdir", str(workdir), "--no-triton", "--no-s3", *flags])


@pytest.mark.parametrize("which", ["--port", "--invoke-port", "--port + 1"])
def test_a_busy_port_names_the_port_and_the_flag_to_change(which: str, models: Path, tmp_path: Path,
                                                              capsys) -> None:
    # Given a port already taken: the API's, the Invoke API's, or the one after --port (the Invoke API's default)
    base = free_pair()
    busy = base + 1 if which == "--port + 1" else base
    with listening(busy):
        flags = {"--port": ("--port", str(busy), "--invoke-port", "0"),
                 "--invoke-port": ("--port", "0", "--invoke-port", str(busy)),
                 "--port + 1": ("--port", str(base))}[which]
        # When serve starts
        code = serve(models, tmp_path / "w", *flags)
    err = capsys.readouterr().err
    # Then it exits 2 naming the port and the flag to change (for P + 1: that it is --port + 1)
    assert code == 2, err
    assert f"port {busy}" in err and "already in use" in err and "Errno" not in err
    flag = "--port" if which == "--port" else "--invoke-port"
    assert f"{flag} " in err, err
    if which == "--port + 1":
        assert f"--port {base} + 1" in err, err


def test_the_invoke_ports_help_says_it_defaults_to_the_port_after_port(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--port + 1" in help_text and "Lambda Invoke API" in help_text
