"""`tierserve` as people use a CLI (issue 16, defect 10): --version, help on every argument with its default,
and shell completion generated from the parsers."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Iterator
from importlib.metadata import version

import pytest

from tierserve.edge.cli import build_parser as edge_parser
from tierserve_tools.cli import build_parser, main


def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under ``parser`` (itself first), with the words that reach it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")


def every_argument() -> Iterator[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    for root, prog in ((build_parser(), "tierserve"), (edge_parser(), "tierserve-edge")):
        for path, parser in walk(root, prog):
            for action in parser._actions:
                if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                    yield path, parser, action


def test_version_prints_the_installed_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"tierserve {version('tierserve')}"


def test_every_argument_of_every_subcommand_has_help() -> None:
    # Given every parser the CLI builds (each subcommand, each nested one) and tierserve-edge's
    arguments = list(every_argument())
    assert len(arguments) > 130
    # When each argument's help is read, Then none is missing
    missing = [f"{path}: {'/'.join(a.option_strings) or a.dest}" for path, _, a in arguments if not a.help]
    assert missing == []


def test_every_default_is_shown_in_the_help() -> None:
    # Given every argument that takes a value and has a default (not None or an empty list)
    shown = []
    for path, parser, action in every_argument():
        if action.default in (None, [], argparse.SUPPRESS) or action.nargs == 0:  # a flag: on or off
            continue
        # When its help is formatted, Then the default is in it
        text = parser._get_formatter()._get_help_string(action) or ""
        if "default" not in text.lower():
            shown.append(f"{path}: {'/'.join(action.option_strings) or action.dest} = {action.default!r}")
    assert shown == []
    # And every parser's help formats (a stray % in a help text would break it)
    for _, parser in walk(build_parser(), "tierserve"):
        assert parser.format_help()


def complete(script: str, *words: str) -> list[str]:
    """What bash offers after ``words`` (the last one being typed) with ``script`` loaded."""
    line = " ".join(f"'{w}'" for w in words)
    code = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _tierserve; "
            'printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_offers_subcommands_flags_and_choices(capsys) -> None:
    # Given the script `tierserve completion bash` prints
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete " in script and "_tierserve" in script
    # Then it completes subcommands, nested subcommands, flags and a flag's choices
    assert complete(script, "tierserve", "mod") == ["models"]
    assert set(complete(script, "tierserve", "models", "")) >= {"list", "show", "publish", "rollout"}
    assert set(complete(script, "tierserve", "models", "--")) >= {"--store", "--stack", "--help"}
    assert complete(script, "tierserve", "--store", "x", "models", "--stack", "d", "sh") == ["show"]
    assert complete(script, "tierserve", "serve", "--gpu-tier", "") == ["triton", "sagemaker"]
    assert "--invoke-port" in complete(script, "tierserve", "serve", "--inv")
    assert complete(script, "tierserve", "serve", "--port", "") == []  # a value: the shell's default
    assert complete(script, "tierserve", "completion", "") == ["bash", "zsh"]


def test_zsh_completion_reuses_the_bash_function_through_bashcompinit(capsys) -> None:
    assert main(["completion", "zsh"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#compdef tierserve") and "bashcompinit" in script and "_tierserve" in script
    if shutil.which("zsh"):
        subprocess.run(["zsh", "-c", f"autoload -U compinit && compinit -u; {script}"], check=True, timeout=30)
