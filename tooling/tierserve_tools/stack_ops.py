"""What `tierserve serve` runs for operations, beside the functions (kept out of serve.py).

* the EMF bridge: every function's EMF lines become CloudWatch metrics in moto_server (``PutMetricData``),
  which the rollout reads with ``GetMetricData`` as it does in AWS, and the figures of ``GET /metrics``
  (Prometheus text: the functions' counters and latency histograms, then Triton's own metrics);
* the Triton sync: the local tritonserver (explicit model control) loads and unloads model versions as the
  store's manifest lists them (``tierserve_tools.triton_sync``);
* the rollouts table in moto's DynamoDB (``ROLLOUT_TABLE``), for ``tierserve models rollout --stack``;
* the Triton supervisor (``tierserve_tools.triton.TritonSupervisor``): a tritonserver that exits on its own (a
  crash, ``kill -9``) loses its stubs at once and is started again with backoff, and the stack's
  ``GET /v2/health/ready`` answers 503, saying so, until it serves again (the router's own readiness, that the
  manifest is readable, is asked only when Triton is up: the API's handler knows nothing of the process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.request
from collections.abc import Sequence
from typing import Any

from tierserve_tools.emf_bridge import EmfBridge, MetricsRegistry

ROLLOUT_TABLE = "tierserve-rollouts"
#: tritonserver flags for explicit model control: every model in the repository at start, then the sync.
TRITON_EXPLICIT = ("--model-control-mode=explicit", "--load-model=*")
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
log = logging.getLogger("tierserve_tools.stack_ops")


def create_rollout_table(dynamodb: Any, name: str = ROLLOUT_TABLE) -> str:
    """The rollouts table as template.yaml's RolloutTable defines it (key ``id``)."""
    with contextlib.suppress(dynamodb.exceptions.ResourceInUseException):
        dynamodb.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                              AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                              KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}])
    return name


class StackOps:
    """The operations beside ``stack``'s functions; ``functions`` names those whose ``NAME.log`` (in the stack's
    workdir) carries EMF lines. The caller (serve.py) passes them: this module never imports serve."""

    def __init__(self, stack: Any, functions: Sequence[str]) -> None:
        self.stack = stack
        self.functions = tuple(functions)
        self.registry = MetricsRegistry()
        self.bridge: EmfBridge | None = None
        self.sync: Any = None
        self.supervisor: Any = None

    def start(self) -> StackOps:
        stack = self.stack
        cloudwatch = stack.client("cloudwatch") if stack.moto is not None else None
        self.bridge = EmfBridge([stack.workdir / f"{fn}.log" for fn in self.functions], self.registry,
                                cloudwatch).start()
        # A SageMaker endpoint serves the model.tar.gz it was deployed with (a new version is a new endpoint
        # config), so the local endpoint's Triton is never synced with the store.
        if stack.triton is not None and stack._own_triton and getattr(stack, "sagemaker", None) is None:
            from tierserve.lifecycle.objects import open_objects
            from tierserve_tools.triton_sync import TritonSync

            s3 = stack.client("s3") if stack.model_store_uri.startswith("s3://") else None
            objects = open_objects(stack.model_store_uri, s3_client=s3)
            self.sync = TritonSync(stack.triton.http_url, stack.triton.model_repository, objects)
            self.sync.sync()  # align with the store before the first request
            self.sync.start()
        if stack.triton is not None and stack._own_triton:
            from tierserve_tools.triton import TritonSupervisor

            self.supervisor = TritonSupervisor(stack.triton, stack.triton_restart_backoff_s,
                                               on_event=self._triton_event, on_restart=self._after_restart).start()
        return self

    def _triton_event(self, text: str) -> None:
        log.warning("%s", text)
        self.stack.triton_events.append(text)
        sink = getattr(self.stack, "on_triton_event", None)
        if sink is not None:
            sink(text)

    def _after_restart(self) -> None:
        """A restarted Triton loads every model in its repository (--load-model=*): the sync loads the store's
        versions again, and unloads what the store no longer lists."""
        if self.sync is not None:
            self.sync.loaded = {p.name: [] for p in self.sync.repo_dir.iterdir() if (p / "config.pbtxt").is_file()}
            self.sync.sync()

    def not_ready(self) -> str | None:
        """Why the stack is not ready (its Triton is down or restarting), else None."""
        sup = self.supervisor
        if sup is None or sup.state == "serving":
            return None
        st = sup.status()
        when = f", next start in {st['next_attempt_in_s']} s" if st["next_attempt_in_s"] is not None else ""
        error = f" (last start: {st['last_error']})" if st["last_error"] else ""
        return (f"the GPU tier's tritonserver is {st['state']}: it exited with status {st['last_exit']}, "
                f"{st['restarts']} restart(s) so far{when}{error}; GPU requests fall back to the CPU tier "
                "meanwhile (GPU-only models get 503)")

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if self.sync is not None:
            self.sync.stop()
            self.sync = None
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None

    def http(self, method: str, target: str) -> tuple[int, dict[str, str], bytes] | None:
        """``GET /metrics`` on the API's port, and ``GET /v2/health/ready`` while the stack's Triton is down;
        None for anything else (the API's)."""
        path = target.split("?", 1)[0]
        if method == "GET" and path == "/v2/health/ready":
            why = self.not_ready()
            if why is None:
                return None  # the router answers
            body = json.dumps({"ready": False, "error": why, "gpu_tier": self.supervisor.status()}).encode()
            return 503, {"content-type": "application/json", "retry-after": "1", "x-served-by": "cpu"}, body
        if method != "GET" or path != "/metrics":
            return None
        if self.bridge is not None:
            self.bridge.poll()  # what the functions wrote up to now
        text = self.registry.render()
        triton = self.stack.triton
        if triton is not None:
            text += f"# Triton's own metrics, from {triton.metrics_url}\n"
            try:
                with urllib.request.urlopen(triton.metrics_url, timeout=5) as resp:  # noqa: S310 - loopback
                    text += resp.read().decode()
            except OSError as exc:
                text += f"# unavailable: {exc}\n"
        return 200, {"content-type": PROMETHEUS}, text.encode()
