"""The `tierserve` command: compile, invoke, triton, serve, models, bench. Each subcommand registers itself."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

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
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            importlib.import_module(module).register(sub)
        except ImportError as exc:
            p = sub.add_parser(name, help=f"(unavailable: {exc})")
            p.set_defaults(func=lambda _a, e=exc, n=name: _missing(n, e))
    return parser


def _missing(name: str, exc: Exception) -> int:
    print(f"error: `tierserve {name}` needs a package that is not installed ({exc}). "
          "Install the project with `make install` (or pip install -e '.[dev]').", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    only = args_list[0] if args_list and args_list[0] in SUBCOMMANDS else None
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
