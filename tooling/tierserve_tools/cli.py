"""The `tierserve` command: compile, invoke, triton, serve, models, bench. Each subcommand registers itself.

Every parser under it shows each argument's default in its help (``HelpFormatter``); ``tierserve --version``
prints the installed package's version, and ``tierserve completion bash|zsh`` a completion script.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

#: subcommand module -> where its `register(subparsers)` lives. Imported lazily, so that
#: `tierserve invoke` never imports the compiler (or torch) and vice versa.
SUBCOMMANDS: dict[str, str] = {
    "compile": "tierserve_compiler.cli",
    "invoke": "tierserve_tools.invoke",
    "triton": "tierserve_tools.triton",
    "serve": "tierserve_tools.serve",
    "models": "tierserve_tools.models_cli",
    "edge": "tierserve_tools.greengrass",  # tierserve.edge.cli's run flags, plus `package`
    "bench": "tierserve_tools.bench.cli",  # tierserve_tools.bench: the suites ship with the tooling
    "sagemaker-package": "tierserve_compiler.sagemaker",
    "artifact-invoke": "tierserve_tools.artifact",
    "deploy-config": "tierserve_tools.deploy_config",
    "keys": "tierserve_tools.keys_cli",  # the streaming REST API's API keys (ApiAuth=keys)
    "usage": "tierserve_tools.usage_cli",  # tokens per caller, model and tier, their cost; budgets (issue 18)
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each help text, except where the text already says its default, and for
    flags (on or off) and arguments without one (None, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text.lower() or action.nargs == 0 or action.default is None
                or action.default == [] or action.default is argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every parser of the CLI (subparsers inherit the class): ``HelpFormatter``, mixed into any formatter a
    subcommand asks for (e.g. argparse.RawDescriptionHelpFormatter for a docstring's layout)."""

    def __init__(self, *args: Any, formatter_class: type[argparse.HelpFormatter] = HelpFormatter,
                 **kwargs: Any) -> None:
        if not issubclass(formatter_class, HelpFormatter):
            formatter_class = type(f"Defaults{formatter_class.__name__}", (HelpFormatter, formatter_class), {})
        kwargs["formatter_class"] = formatter_class
        super().__init__(*args, **kwargs)


def package_version() -> str:
    """The installed ``tierserve`` distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tierserve")
    except PackageNotFoundError:
        return "(not installed: run from a source tree)"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="tierserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the installed package's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if only in (None, "completion"):
        _register_completion(sub)
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            importlib.import_module(module).register(sub)
        except ImportError as exc:
            p = sub.add_parser(name, help=f"(unavailable: {exc})")
            p.set_defaults(func=lambda _a, e=exc, n=name: _missing(n, e))
    return parser


def _register_completion(sub: Any) -> None:
    from tierserve_tools.completion import SHELLS

    p = sub.add_parser("completion", help="print a shell completion script: source <(tierserve completion bash)",
                       description="Print a completion script for bash or zsh, generated from this CLI's parsers. "
                                   "bash: add `source <(tierserve completion bash)` to ~/.bashrc; zsh: "
                                   "`source <(tierserve completion zsh)` in ~/.zshrc (after compinit).")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    p.set_defaults(func=_completion)


def _completion(args: argparse.Namespace) -> int:
    from tierserve_tools.completion import script

    sys.stdout.write(script(build_parser(), args.shell))
    return 0


def _missing(name: str, exc: Exception) -> int:
    print(f"error: `tierserve {name}` needs a package that is not installed ({exc}). "
          "Install the project with `make install` (or pip install -e '.[dev]').", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    only = args_list[0] if args_list and (args_list[0] in SUBCOMMANDS or args_list[0] == "completion") else None
    args = build_parser(only).parse_args(args_list)
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # a clean message, not a traceback, for every known error
        from tierserve.errors import TierserveError

        root = getattr(importlib.import_module("tierserve_compiler.errors"), "CompilerError", None) \
            if "tierserve_compiler.errors" in sys.modules else None
        if isinstance(exc, TierserveError) or (root is not None and isinstance(exc, root)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
