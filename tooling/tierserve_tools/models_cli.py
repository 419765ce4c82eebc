"""`tierserve models`: what a store serves, and every change to it (operator tooling, not shipped).

    tierserve models [--store URI | --stack build/serve] list
    tierserve models show NAME
    tierserve models publish DIR/NAME/VERSION [--promote | --canary PERCENT] [--why TEXT]
    tierserve models canary NAME VERSION --percent P
    tierserve models promote NAME VERSION
    tierserve models rollback NAME [--to VERSION]
    tierserve models retire NAME VERSION
    tierserve models history NAME [--json]
    tierserve models rollout NAME VERSION --steps 10,50,100 --interval 5m --max-error-rate 0.01 --max-p99-ms N
                             [--max-ttft-p99-ms 2000 --min-tokens-per-s-ratio 0.8]   (text-generation models)

The store is a folder or ``s3://bucket/prefix`` (``--store``, default ``MODEL_STORE_URI``). ``--stack DIR``
targets a running ``tierserve serve`` (its ``DIR/env.json``): its store, and its moto_server for S3,
CloudWatch and DynamoDB. Every change goes through ``tierserve.lifecycle.registry`` (atomic, recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tierserve.lifecycle.objects import ObjectStore, open_objects
from tierserve.lifecycle.registry import Registry
from tierserve.manifest import ModelEntry, ModelVersion
from tierserve.settings import Settings

#: What `--stack` takes from `tierserve serve`'s env.json (RouterFunction's environment).
_STACK_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")


def register(subparsers) -> None:  # type: ignore[no-untyped-def]
    p = subparsers.add_parser("models", help="list, publish, canary, promote, roll back, retire and roll out models",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="folder or s3://bucket/prefix (default: MODEL_STORE_URI, else build/models)")
    p.add_argument("--stack", type=Path, metavar="DIR",
                   help="a running `tierserve serve` (its workdir, e.g. build/serve): its store and moto_server")
    p.add_argument("--by", help="who is making the change (default: the caller's AWS identity, or user@host)")
    sub = p.add_subparsers(dest="models_command", required=True)
    ls = sub.add_parser("list", help="every model and version: default, canary, targets, size, variants, published")
    ls.add_argument("--json", action="store_true", help="one JSON document (stable keys) instead of the table")
    show = sub.add_parser("show", help="one model in detail")
    show.add_argument("name", help="the model")
    show.add_argument("--json", action="store_true", help="one JSON document (stable keys) instead of the text")
    pub = sub.add_parser("publish", help="upload a compiled version (DIR/NAME/VERSION) and add it to the manifest")
    pub.add_argument("version_dir", type=Path, help="the compiler's DIR/NAME/VERSION folder, e.g. build/models/m/2")
    mode = pub.add_mutually_exclusive_group()
    mode.add_argument("--promote", action="store_true", help="make it the default at once")
    mode.add_argument("--canary", type=float, metavar="PERCENT", help="send it PERCENT of the traffic")
    can = sub.add_parser("canary", help="send PERCENT of a model's traffic to VERSION")
    can.add_argument("name", help="the model")
    can.add_argument("version", help="the published version that gets the traffic")
    can.add_argument("--percent", type=float, required=True, help="the share of the traffic, 0 to 100")
    pro = sub.add_parser("promote", help="make VERSION the default (ends its canary)")
    pro.add_argument("name", help="the model")
    pro.add_argument("version", help="the published version to make the default")
    rb = sub.add_parser("rollback", help="drop the canary; without one, return to the previous default")
    rb.add_argument("name", help="the model")
    rb.add_argument("--to", metavar="VERSION", help="make this published version the default instead")
    ret = sub.add_parser("retire", help="stop serving VERSION (refused while it is the default or the canary)")
    ret.add_argument("name", help="the model")
    ret.add_argument("version", help="the version to stop serving")
    hist = sub.add_parser("history", help="every change to a model: who, when, from, to and why")
    hist.add_argument("name", help="the model")
    hist.add_argument("--json", action="store_true", help="one JSON record per line")
    for q in (pub, can, pro, rb, ret):
        q.add_argument("--why", default="", help="the reason, kept in the history")
    from tierserve_tools.rollout_driver import add_arguments

    add_arguments(sub)
    p.set_defaults(func=run_cli)


def load_stack(workdir: Path) -> str:
    """Point boto3 at a running `tierserve serve` (its moto_server) and return the store it serves."""
    env_file = Path(workdir) / "env.json"
    if not env_file.is_file():
        from tierserve.errors import ConfigurationError

        raise ConfigurationError(f"no {env_file}: start `tierserve serve --workdir {workdir}` first")
    env = json.loads(env_file.read_text())["RouterFunction"]
    for key, value in env.items():
        if key.startswith("AWS_ENDPOINT_URL") or key in _STACK_VARS:
            os.environ[key] = value
    for key in ("ROLLOUT_TABLE", "POWERTOOLS_METRICS_NAMESPACE"):
        if key in env:
            os.environ.setdefault(key, env[key])
    return str(env["MODEL_STORE_URI"])


def store_uri(args: argparse.Namespace) -> str:
    if getattr(args, "stack", None):
        stacked = load_stack(args.stack)
        return args.store or stacked
    return args.store or os.environ.get("MODEL_STORE_URI") or Settings().model_store_uri


def open_registry(args: argparse.Namespace) -> tuple[ObjectStore, Registry]:
    objects = open_objects(store_uri(args))
    return objects, Registry(objects, actor=getattr(args, "by", None))


def run_cli(args: argparse.Namespace) -> int:
    objects, registry = open_registry(args)
    command = args.models_command
    if command == "list":
        manifest = registry.manifest()
        if args.json:
            print(json.dumps(list_document(manifest), indent=2, sort_keys=True))
            return 0
        print_versions([manifest.models[n] for n in sorted(manifest.models)])
        for name, bad in sorted(manifest.broken.items()):
            print(f"{name}: INVALID ({bad.reason})")
        return 0
    if command == "show":
        if args.json:
            print(json.dumps(show_document(registry, args.name), indent=2, sort_keys=True))
            return 0
        return show(registry, args.name)
    if command == "history":
        return history(registry, args.name, args.json)
    if command == "rollout":
        from tierserve_tools.rollout_driver import run_rollout

        return run_rollout(args, objects, registry)
    return change(args, objects, registry)


def change(args: argparse.Namespace, objects: ObjectStore, registry: Registry) -> int:
    command = args.models_command
    if command == "publish":
        from tierserve_tools.publishing import publish_version

        result = publish_version(args.version_dir, objects, registry, promote=args.promote, canary=args.canary,
                                 why=args.why)
        print(f"uploaded {len(result.uploaded)} object(s), {len(result.skipped)} already there (same sha256)")
        for note in result.notes:
            print(note)
        record = result.record
    elif command == "canary":
        record = registry.canary(args.name, args.version, args.percent, args.why)
    elif command == "promote":
        record = registry.promote(args.name, args.version, args.why)
    elif command == "rollback":
        record = registry.rollback(args.name, args.to, args.why)
    else:
        record = registry.retire(args.name, args.version, args.why)
        if registry.entry(args.name).versions[args.version].serves_gpu:
            from tierserve_tools.publishing import sync_triton_config

            for note in sync_triton_config(objects, registry, args.name):
                print(note)
    print(describe_change(record))
    return 0


def describe_change(record: dict[str, Any]) -> str:
    if record.get("noop"):
        return f"{record['model']}: nothing to change (manifest revision {record['revision']})"
    return (f"{record['model']}: {record['action']} -> {state_text(record['to'])} "
            f"(manifest revision {record['revision']}, by {record['by']})")


def state_text(state: dict[str, Any] | None) -> str:
    if not state:
        return "absent"
    canary = state.get("canary")
    text = f"default v{state['default']}"
    if canary:
        text += f", canary v{canary['version']} at {canary['percent']}%"
    return text


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def serving(entry: ModelEntry, mv: ModelVersion) -> str:
    if mv.retired:
        return f"retired {mv.retired_at}"
    if mv.version == entry.default_version:
        return "default" + (f" ({100 - float(entry.canary['percent']):g}%)" if entry.canary else "")
    if entry.canary and str(entry.canary["version"]) == mv.version:
        return f"canary {float(entry.canary['percent']):g}%"
    return "listed"


def print_versions(entries: list[ModelEntry]) -> None:
    rows = [("MODEL", "VERSION", "SERVES", "TARGETS", "SIZE", "VARIANTS (* = CPU tier)", "PUBLISHED", "BY")]
    for entry in entries:
        for v in sorted(entry.versions, key=int):
            mv = entry.versions[v]
            cpu = mv.cpu_variant or mv.selected_variant
            variants = ", ".join(k + ("*" if k == cpu else "") for k in mv.variants)
            rows.append((entry.name, v, serving(entry, mv), ",".join(mv.targets), _size(mv.cpu_artifact.size_bytes),
                         variants, mv.published_at or "(compiled, not published)", mv.published_by or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# --- --json: the same facts as the table and the text, as documents whose keys do not change -----------------


def version_document(entry: ModelEntry, mv: ModelVersion) -> dict[str, Any]:
    """One version as ``models list --json`` gives it: every key present for every version (null when unset)."""
    cpu = mv.cpu_variant or mv.selected_variant
    state = serving(entry, mv).split(" ")[0]  # default, canary, listed or retired
    return {"version": mv.version, "serves": state, "targets": list(mv.targets),
            "size_bytes": int(mv.cpu_artifact.size_bytes), "variants": list(mv.variants), "cpu_variant": cpu,
            "published_at": mv.published_at or None, "published_by": mv.published_by or None,
            "retired_at": mv.retired_at or None}


def model_document(entry: ModelEntry) -> dict[str, Any]:
    canary = ({"version": str(entry.canary["version"]), "percent": float(entry.canary["percent"])}
              if entry.canary else None)
    return {"name": entry.name, "default_version": entry.default_version, "canary": canary,
            "versions": [version_document(entry, entry.versions[v]) for v in sorted(entry.versions, key=int)]}


def list_document(manifest: Any) -> dict[str, Any]:
    """``models list --json``: {"models": [...], "invalid": [{"name", "reason"}]}."""
    return {"models": [model_document(manifest.models[n]) for n in sorted(manifest.models)],
            "invalid": [{"name": n, "reason": bad.reason} for n, bad in sorted(manifest.broken.items())]}


def show_document(registry: Registry, name: str) -> dict[str, Any]:
    """``models show NAME --json``: the model as in ``list --json``, each version with its signature and
    artifacts, the previous default and the manifest's revision."""
    entry = registry.entry(name)
    doc = model_document(entry)
    doc.update(previous_default=entry.previous_default or None, manifest_revision=registry.manifest().revision)
    for version in doc["versions"]:
        mv = entry.versions[version["version"]]
        version.update(
            inputs=[{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in mv.inputs],
            outputs=[{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in mv.outputs],
            max_batch_size=mv.max_batch_size, created_at=mv.created_at or None,
            artifacts={k: {"size_bytes": int(x.size_bytes + sum(e.size_bytes for e in x.external_data)),
                           "sha256": x.sha256} for k, x in mv.variants.items()})
    return doc


def show(registry: Registry, name: str) -> int:
    entry = registry.entry(name)
    manifest = registry.manifest()
    print(f"{name}: default v{entry.default_version}"
          + (f", canary v{entry.canary['version']} at {entry.canary['percent']}%" if entry.canary else "")
          + (f", previous default v{entry.previous_default}" if entry.previous_default else "")
          + f" (manifest revision {manifest.revision})")
    print_versions([entry])
    for v in sorted(entry.versions, key=int):
        mv = entry.versions[v]
        sizes = ", ".join(f"{k} {_size(x.size_bytes + sum(e.size_bytes for e in x.external_data))} "
                          f"sha256 {x.sha256[:12]}" for k, x in mv.variants.items())
        sig = "; ".join(f"{s.name} {s.datatype} {list(s.shape)}" for s in mv.inputs)
        print(f"  v{v}: inputs {sig}; max_batch_size {mv.max_batch_size}; created {mv.created_at or '-'}")
        print(f"       {sizes}")
    return 0


def history(registry: Registry, name: str, as_json: bool) -> int:
    records = registry.history(name)
    if as_json:
        for r in records:
            print(json.dumps(r, sort_keys=True))
        return 0
    if not records:
        print(f"{name}: no recorded changes in {registry.objects.uri}")
        return 0
    for r in records:
        version = (r.get("details") or {}).get("version")
        what = f"{r['action']}{' v' + str(version) if version else ''}"
        line = f"#{r['revision']:<4} {r['at']}  {r['by']}  {what}: {state_text(r['from'])} -> {state_text(r['to'])}"
        print(line + (f"  why: {r['why']}" if r.get("why") else ""), file=sys.stdout)
        figures = (r.get("details") or {}).get("figures")
        if figures:
            print(f"       figures: {json.dumps(figures, sort_keys=True)}")
    return 0
