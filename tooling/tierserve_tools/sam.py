"""Read an AWS SAM template the way `sam local invoke` does: functions, handlers, environment.

Only what local invocation needs: the function's handler, code location, memory, timeout and
environment variables (Globals merged, parameter defaults resolved, `--env-vars` applied).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierserve.errors import ConfigurationError


class _CfnLoader:
    """A yaml SafeLoader that keeps CloudFormation short-form intrinsics (!Ref, !Sub, ...) as dicts."""

    @staticmethod
    def load(text: str) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def construct(loader: Any, tag_suffix: str, node: Any) -> Any:
            name = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
            if isinstance(node, yaml.ScalarNode):
                value: Any = loader.construct_scalar(node)
                if tag_suffix == "GetAtt" and isinstance(value, str):
                    value = value.split(".", 1)
            elif isinstance(node, yaml.SequenceNode):
                value = loader.construct_sequence(node, deep=True)
            else:
                value = loader.construct_mapping(node, deep=True)
            return {name: value}

        Loader.add_multi_constructor("!", construct)
        return yaml.load(text, Loader=Loader)  # noqa: S506 - SafeLoader subclass


@dataclass
class FunctionSpec:
    logical_id: str
    handler: str
    code_uri: Path
    memory_mb: int
    timeout_s: int
    environment: dict[str, str]


def load_template(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigurationError(f"no SAM template at {path}; run from the project root or pass --template")
    return _CfnLoader.load(path.read_text())


def _resolve(value: Any, params: dict[str, str]) -> str:
    """Resolve what can be resolved offline: literals and !Ref to parameters; '' for the rest
    (as `sam local invoke` leaves unresolvable intrinsics, to be set with --env-vars)."""
    if isinstance(value, str | int | float | bool):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(value, dict) and "Ref" in value and value["Ref"] in params:
        return params[value["Ref"]]
    return ""


def function_spec(template: dict[str, Any], logical_id: str, template_dir: Path,
                  env_overrides: dict[str, Any] | None = None, only_declared: bool = False) -> FunctionSpec:
    """A function as `sam local invoke` sees it. ``only_declared``: as SAM itself does, the env-vars file
    overrides only variables the template declares for the function (tierserve's own runs add others)."""
    resources = template.get("Resources") or {}
    res = resources.get(logical_id)
    functions = sorted(k for k, v in resources.items() if v.get("Type") == "AWS::Serverless::Function")
    if res is None or res.get("Type") != "AWS::Serverless::Function":
        raise ConfigurationError(f"{logical_id!r} is not a function in the template; functions: {', '.join(functions)}")
    overrides = env_overrides or {}
    params = {k: str(v.get("Default", "")) for k, v in (template.get("Parameters") or {}).items()}
    params.update({k: str(v) for k, v in (overrides.get("Parameters") or {}).items()})
    glob = (template.get("Globals") or {}).get("Function") or {}
    props = {**glob, **(res.get("Properties") or {})}
    env_raw = {**((glob.get("Environment") or {}).get("Variables") or {}),
               **(((res.get("Properties") or {}).get("Environment") or {}).get("Variables") or {})}
    env = {k: _resolve(v, params) for k, v in env_raw.items()}
    # SAM's --env-vars format: {"Parameters": {...all functions...}, "<LogicalId>": {...}}
    for scope in ("Parameters", logical_id):
        for k, v in (overrides.get(scope) or {}).items():
            if (scope == "Parameters" or only_declared) and k not in env:
                continue
            env[k] = str(v)
    return FunctionSpec(
        logical_id=logical_id,
        handler=str(props.get("Handler")),
        code_uri=(template_dir / str(props.get("CodeUri", "."))).resolve(),
        memory_mb=int(_resolve(props.get("MemorySize", 128), params) or 128),  # a literal or !Ref a parameter
        timeout_s=int(props.get("Timeout", 3)),
        environment=env,
    )


def load_env_vars(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read --env-vars {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"--env-vars {path} must be a JSON object keyed by function logical id")
    return data
