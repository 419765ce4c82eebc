"""Render template.yaml for one set of parameter values: what CloudFormation would create, as a template.

Why: linters judge a template whole, conditions and all, so a resource that exists only for one
``GpuTier`` is checked with the defaults of every other. Rendering resolves the conditions for the
given values (parameters become those values as defaults; resources and outputs whose condition is
false are dropped; ``Fn::If`` picks its branch; ``AWS::NoValue`` disappears), so ``sam validate
--lint``, ``cfn-lint`` and ``checkov`` each see exactly what that ``GpuTier`` deploys.
Only the condition functions CloudFormation allows are evaluated (Equals, Not, And, Or, Condition)
over parameter references and literals.
"""

from __future__ import annotations

import copy
from typing import Any

_NO_VALUE = object()


def render(template: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """A copy of ``template`` with ``values`` as parameter defaults and every condition resolved."""
    t = copy.deepcopy(template)
    params = t.get("Parameters") or {}
    unknown = set(values) - set(params)
    if unknown:
        raise KeyError(f"not parameters of the template: {sorted(unknown)}")
    for name, value in values.items():
        params[name]["Default"] = value
    resolved: dict[str, bool] = {}
    conditions = t.pop("Conditions", {}) or {}

    def param(name: str) -> Any:
        spec = params[name]
        default = spec.get("Default", "")
        if spec.get("Type") == "CommaDelimitedList" and isinstance(default, str):
            return default.split(",") if default else [""]
        return default

    def cond(name: str) -> bool:
        if name not in resolved:
            resolved[name] = bool(evaluate(conditions[name]))
        return resolved[name]

    def evaluate(node: Any) -> Any:
        if isinstance(node, dict) and len(node) == 1:
            (key, arg), = node.items()
            if key == "Ref":
                return param(arg)
            if key == "Condition":
                return cond(arg)
            if key == "Fn::Equals":
                a, b = (evaluate(x) for x in arg)
                return str(a) == str(b)
            if key == "Fn::Not":
                return not evaluate(arg[0])
            if key == "Fn::And":
                return all(evaluate(x) for x in arg)
            if key == "Fn::Or":
                return any(evaluate(x) for x in arg)
        if isinstance(node, (str, int, float, bool)):
            return node
        raise ValueError(f"cannot evaluate condition {node!r}")

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if len(node) == 1 and "Fn::If" in node:
                name, yes, no = node["Fn::If"]
                return walk(yes if cond(name) else no)
            if node == {"Ref": "AWS::NoValue"}:
                return _NO_VALUE
            out = {}
            for k, v in node.items():
                w = walk(v)
                if w is not _NO_VALUE:
                    out[k] = w
            return out
        if isinstance(node, list):
            return [w for w in (walk(v) for v in node) if w is not _NO_VALUE]
        return node

    for section in ("Resources", "Outputs"):
        entries = t.get(section) or {}
        for logical_id in list(entries):
            entry = entries[logical_id]
            if "Condition" in entry and not cond(entry.pop("Condition")):
                del entries[logical_id]
    rules = t.pop("Rules", None)
    t = walk(t)
    if rules is not None:
        t["Rules"] = rules  # evaluated by CloudFormation against the parameters, never rendered away
    used = _mappings_used(t)
    for name in list(t.get("Mappings") or {}):
        if name not in used:
            del t["Mappings"][name]  # e.g. the Triton image accounts, when no SageMaker model is rendered
    return t


def _mappings_used(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = set()
        if "Fn::FindInMap" in node and isinstance(node["Fn::FindInMap"], list):
            found.add(str(node["Fn::FindInMap"][0]))
        for v in node.values():
            found |= _mappings_used(v)
        return found
    if isinstance(node, list):
        return set().union(*(_mappings_used(v) for v in node)) if node else set()
    return set()
