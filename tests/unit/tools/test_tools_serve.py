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


def test_the_local_batch_queues_follow_the_templates_visibility_timeouts(models: Path, tmp_path: Path) -> None:
    # Given serve's local stack over the project's template.yaml
    from tierserve_tools import batch as batch_local
    from tierserve_tools.sam import load_template
    from tierserve_tools.serve import LocalStack

    template = Path(__file__).resolve().parents[3] / "template.yaml"
    stack = LocalStack(models, port=0, triton=False, template=template, workdir=tmp_path / "w")
    # Then its batch queues get the template's settings (BatchGenerateJobsQueue's 5,400 s, not 120 s)
    settings = stack.batch_queue_settings()
    assert settings == batch_local.template_queues(load_template(template))
    assert settings["generate_queue_url"][0] == int(
        load_template(template)["Resources"]["BatchGenerateJobsQueue"]["Properties"]["VisibilityTimeout"])
