"""`tierserve invoke FUNCTION_ID -e EVENT.json`: what `sam local invoke` does, without Docker.

The handler runs in a fresh Python interpreter (a cold start), with the function's environment
from template.yaml (plus --env-vars), a Lambda context with its memory and timeout, the
handler's JSON response on stdout and the function's logs on stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tierserve_tools import paths
from tierserve_tools.emulation import lambda_environment
from tierserve_tools.sam import function_spec, load_env_vars, load_template


def invoke(function_id: str, event_path: Path, template_path: Path | None = None,
           env_vars: Path | None = None, extra_env: dict[str, str] | None = None,
           capture: bool = False) -> subprocess.CompletedProcess:
    template_path = paths.template(template_path).resolve()
    template = load_template(template_path)
    env_vars = paths.local_env(env_vars) if env_vars is not None else paths.default_local_env()
    spec = function_spec(template, function_id, template_path.parent, load_env_vars(env_vars))
    env = lambda_environment(spec.logical_id, spec.memory_mb, spec.timeout_s,
                             {**spec.environment, **(extra_env or {})}, spec.code_uri)
    cmd = [sys.executable, "-m", "tierserve_tools.worker", spec.handler, "--event", str(event_path)]
    return subprocess.run(cmd, env=env, capture_output=capture, text=True, check=False)


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("invoke", help="invoke a function from template.yaml locally (no Docker)")
    p.add_argument("function_id", help="logical id in template.yaml, e.g. RouterFunction")
    p.add_argument("-e", "--event", required=True, type=Path, help="event JSON file (see events/)")
    p.add_argument("-t", "--template", type=Path, default=None,
                   help="the SAM template (default: ./template.yaml, else the one that ships with tierserve)")
    p.add_argument("-n", "--env-vars", type=Path, default=None,
                   help="SAM-format environment overrides (default: ./events/local-env.json, else the shipped one)")
    p.set_defaults(func=_run)


def _run(args) -> int:  # type: ignore[no-untyped-def]
    if not args.event.is_file():
        print(f"error: event file {args.event} does not exist", file=sys.stderr)
        return 2
    return invoke(args.function_id, args.event, args.template, args.env_vars).returncode


