"""`tierserve edge`: run the edge runtime on a device (and `tierserve edge package`: a Greengrass component).

Also installed as its own script, ``tierserve-edge``, so that a device (``pip install "tierserve[edge]"``)
runs it without the developer CLI. Every run flag has an environment variable (``tierserve.edge.settings``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from tierserve.edge.settings import OPTIONS, EdgeSettings, parse_edge_settings
from tierserve.errors import TierserveError
from tierserve.telemetry import ENABLED_ENV

_HELP = {
    "store_uri": "model store: a folder or s3://bucket/prefix holding manifest.json (default build/models)",
    "cache_dir": "where verified artifacts and the saved state live (default ~/.cache/tierserve-edge)",
    "seed_dir": "a store folder shipped with the device, served before the first sync (a Greengrass artifact)",
    "models": "only these edge-placed models, comma-separated (default: every model placed on the edge)",
    "sync_interval_s": "seconds between syncs of the store (default 60)",
    "host": "address to bind (default 127.0.0.1; 0.0.0.0 to serve the local network)",
    "port": "HTTP port (default 8000)",
    "grpc_port": "gRPC port, Triton's service (default 8001; 0: a free port; -1: no gRPC)",
    "cloud_url": "the cloud gateway's URL (the stack's ApiUrl); empty: standalone",
    "cloud_auth": "how to sign forwarded requests: iam (SigV4, credential chain), jwt or none (default iam)",
    "cloud_region": "region to sign for (default: from the gateway's host name, else AWS_REGION)",
    "cloud_token_file": "with --cloud-auth jwt: a file holding the JWT, re-read on every request",
    "forward_timeout_s": "seconds a forwarded request may take (default 30)",
    "max_rows": "largest batch served here (default: the manifest's edge_max_rows, else 64)",
    "max_concurrency": "inferences run here at once before new ones are forwarded (default: one per core)",
    "max_memory_mb": "memory budget for loaded models, estimated (default 512)",
    "max_disk_mb": "disk budget for cached artifacts (default 2048)",
    "threads": "onnxruntime threads per model (default: one per core, at most 4)",
    "log_level": "DEBUG, INFO (default), WARNING or ERROR",
    "log_requests": "true: one structured log line per request",
}


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    for name, (flag, var, _) in OPTIONS.items():
        p.add_argument(flag, dest=name, default=None, metavar=var, help=f"{_HELP[name]} [{var}]")
    p.add_argument("--once", action="store_true", help="sync once, print the device's status as JSON, and exit")
    p.add_argument("--version", action="version", version=f"tierserve-edge {package_version()}",
                   help="print the installed package's version and exit")


def package_version() -> str:
    """The installed ``tierserve`` distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tierserve")
    except PackageNotFoundError:
        return "(not installed: run from a source tree)"


def register(subparsers: Any, extra: Callable[[Any], None] | None = None) -> None:
    """``tierserve edge``; ``extra`` adds subcommands under it (the developer CLI adds ``package``)."""
    p = subparsers.add_parser("edge", help="the edge runtime: serve edge-placed models on this device, forward "
                              "the rest to the cloud (`tierserve edge package` builds a Greengrass component)")
    add_run_arguments(p)
    if extra is not None:
        extra(p.add_subparsers(dest="edge_command"))
    p.set_defaults(func=run_cli)


def settings_from(args: argparse.Namespace) -> EdgeSettings:
    return parse_edge_settings({name: getattr(args, name, None) for name in OPTIONS})


def run_cli(args: argparse.Namespace) -> int:
    if getattr(args, "package_func", None) is not None:
        return int(args.package_func(args) or 0)
    try:
        settings = settings_from(args)
        _logs_to_stderr()
        # No EMF document per request on a device: nothing collects them, and they would fill its logs (and the
        # stdout of whoever started it). /metrics serves the device's figures; TIERSERVE_METRICS=true turns EMF on.
        os.environ.setdefault(ENABLED_ENV, "false")
        from tierserve.edge.runtime import EdgeRuntime

        if args.once:
            import json

            rt = EdgeRuntime(settings)
            rt.store.load_state()
            rt.sync()
            print(json.dumps(rt.status(), indent=2))
            return 0 if rt.store.status.last_error is None else 1
        return serve(EdgeRuntime(settings))
    except TierserveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # a port in use (grpc says so with a RuntimeError), an unwritable folder
        busy = _busy_port(args)
        if busy is None and not isinstance(exc, OSError):
            raise
        print(f"error: {busy or exc}", file=sys.stderr)
        return 2


def _busy_port(args: argparse.Namespace) -> str | None:
    """When one of the edge's ports is taken: that port and the flag (and variable) that moves it."""
    from tierserve import ports

    try:
        settings = settings_from(args)
    except TierserveError:
        return None
    for name, what in (("port", "the edge's HTTP service"), ("grpc_port", "the edge's gRPC service")):
        port = getattr(settings, name)
        if ports.is_busy(settings.host, port):
            flag, var, _ = OPTIONS[name]
            return ports.in_use(settings.host, port, f"{flag} (or {var})", what).message
    return None


def _logs_to_stderr() -> None:
    """Structured logs on stderr: stdout carries only the ready line (or --once's JSON) for whoever started us."""
    import logging

    from tierserve.observability import logger

    handler = getattr(logger, "registered_handler", None)
    if isinstance(handler, logging.StreamHandler):
        handler.setStream(sys.stderr)


def serve(runtime: Any) -> int:
    """Run until SIGINT or SIGTERM (what systemd and Greengrass send to stop a service)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        runtime.start()
        print(runtime.ready_line(), flush=True)
        stop.wait()
        return 0
    finally:
        runtime.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("tierserve edge: stopped", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """``tierserve-edge``'s parser: ``edge`` (what every command line is parsed as) under the program."""
    parser = argparse.ArgumentParser(prog="tierserve-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``tierserve-edge``: the same command without the developer CLI."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(["edge", *args_list])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
