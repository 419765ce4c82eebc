"""tierserve compile: argument parsing, exit codes and messages, and a cheap import."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from tierserve_compiler.cli import main, register


def test_register_adds_compile_subcommand():
    # Given a top-level parser / When compile is registered
    parser = argparse.ArgumentParser(prog="tierserve")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "compile",
            "m.onnx",
            "--name",
            "m",
            "--dynamic-axis",
            "input_ids:1",
            "--quantize",
            "static",
            "--calibration-method",
            "percentile",
            "--slo-ms",
            "20",
        ]
    )
    # Then the options land where compile expects them
    assert args.func.__name__ == "run_compile" and args.dynamic_axis == [("input_ids", 1)]
    assert args.per_channel is None and str(args.out) == "build/models"


def test_cli_compiles_the_digits_demo(tmp_path, capsys):
    # Given the bundled digits demo and its validation split
    from tierserve_compiler.demo import write_digits_validation

    val = write_digits_validation(tmp_path / "digits.npz")
    # When compiled through the CLI
    rc = main(
        [
            "compile",
            "tierserve_compiler.demo:digits_classifier",
            "--name",
            "digits",
            "--validation",
            str(val),
            "--calibration",
            str(val),
            "--preset",
            "test",
            "--out",
            str(tmp_path / "models"),
        ]
    )
    # Then it succeeds and reports the selection
    assert rc == 0
    assert "digits v1 written" in capsys.readouterr().out
    assert (tmp_path / "models" / "digits" / "1" / "int8_dynamic.onnx").is_file()


def test_cli_errors_exit_2_with_the_message(tmp_path, capsys):
    rc = main(
        ["compile", str(tmp_path / "x.onnx"), "--name", "x", "--quantize", "static", "--quiet", "--out", str(tmp_path)]
    )
    assert rc == 2
    assert "pass --calibration or use --quantize dynamic" in capsys.readouterr().err


def test_bad_dynamic_axis_is_refused():
    with pytest.raises(SystemExit):
        main(["compile", "m.onnx", "--name", "m", "--dynamic-axis", "input_ids"])


def test_import_is_cheap():
    # Given a fresh interpreter / When the package is imported / Then no heavy library is loaded
    code = (
        "import sys, tierserve_compiler, tierserve_compiler.cli; "
        "heavy = ('torch', 'onnxruntime', 'sklearn', 'skl2onnx', 'matplotlib'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unsafe_model_is_a_clear_error_without_a_traceback(tmp_path, capsys):
    # Given an ONNX file whose external data location holds a NUL byte
    from tests.support.onnx_external import external_linear, with_location

    src, _, _ = external_linear(tmp_path / "src")
    with_location(src, "w\x00.bin")
    # When it is compiled through the CLI / Then exit 2 and one line saying what is wrong
    rc = main(["compile", str(src), "--name", "bad", "--quiet", "--out", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert rc == 2 and "NUL byte" in err and "Traceback" not in err


@pytest.mark.parametrize(("name", "version"), [("nl\n", None), ("ok", "1\n")])
def test_names_and_versions_with_a_trailing_newline_are_refused(tmp_path, capsys, name, version):
    # Given the bundled MLP / When compiled with a name or version ending in a newline
    from compiler_testlib import make_mlp_onnx

    src = make_mlp_onnx(tmp_path / "mlp.onnx")
    argv = ["compile", str(src), "--name", name, "--quiet", "--out", str(tmp_path / "models")]
    rc = main(argv + (["--version", version] if version else []))
    # Then it is refused up front, and the store is untouched
    assert rc == 2 and "invalid model" in capsys.readouterr().err
    assert not (tmp_path / "models" / "manifest.json").exists()
