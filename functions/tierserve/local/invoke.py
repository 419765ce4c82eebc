"""`tierserve invoke FUNCTION_ID -e EVENT.json`: what `sam local invoke` does, without Docker.

The handler runs in a fresh Python interpreter (a cold start), with the function's environment
from template.yaml (plus --env-vars), a Lambda context with its memory and timeout, the
handler's JSON response on stdout and the function's logs on stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tierserve.local.emulation import lambda_environment
from tierserve.local.sam import function_spec, load_env_vars, load_template

DEFAULT_LOCAL_ENV = Path("events/local-env.json")


def invoke(function_id: str, event_path: Path, template_path: Path = Path("template.yaml"),
           env_vars: Path | None = None, extra_env: dict[str, str] | None = None,
           capture: bool = False) -> subprocess.CompletedProcess:
    template = load_template(template_path)
    if env_vars is None and DEFAULT_LOCAL_ENV.is_file():
        env_vars = DEFAULT_LOCAL_ENV
    spec = function_spec(template, function_id, template_path.parent, load_env_vars(env_vars))
    env = lambda_environment(spec.logical_id, spec.memory_mb, spec.timeout_s,
                             {**spec.environment, **(extra_env or {})}, spec.code_uri)
    cmd = [sys.executable, "-m", "tierserve.local.worker", spec.handler, "--event", str(event_path)]
    return subprocess.run(cmd, env=env, capture_output=capture, text=True, check=False)


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("invoke", help="invoke a function from template.yaml locally (no Docker)")
    p.add_argument("function_id", help="logical id in template.yaml, e.g. RouterFunction")
    p.add_argument("-e", "--event", required=True, type=Path, help="event JSON file (see events/)")
    p.add_argument("-t", "--template", type=Path, default=Path("template.yaml"))
    p.add_argument("-n", "--env-vars", type=Path, default=None,
                   help=f"SAM-format environment overrides (default: {DEFAULT_LOCAL_ENV} if present)")
    p.set_defaults(func=_run)


def _run(args) -> int:  # type: ignore[no-untyped-def]
    if not args.event.is_file():
        print(f"error: event file {args.event} does not exist", file=sys.stderr)
        return 2
    return invoke(args.function_id, args.event, args.template, args.env_vars).returncode


