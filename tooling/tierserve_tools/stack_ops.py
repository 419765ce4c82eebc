"""What `tierserve serve` runs for operations, beside the functions (kept out of serve.py).

* the EMF bridge: every function's EMF lines become CloudWatch metrics in moto_server (``PutMetricData``),
  which the rollout reads with ``GetMetricData`` as it does in AWS, and the figures of ``GET /metrics``
  (Prometheus text: the functions' counters and latency histograms, then Triton's own metrics);
* the Triton sync: the local tritonserver (explicit model control) loads and unloads model versions as the
  store's manifest lists them (``tierserve_tools.triton_sync``);
* the rollouts table in moto's DynamoDB (``ROLLOUT_TABLE``), for ``tierserve models rollout --stack``.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Sequence
from typing import Any

from tierserve_tools.emf_bridge import EmfBridge, MetricsRegistry

ROLLOUT_TABLE = "tierserve-rollouts"
#: tritonserver flags for explicit model control: every model in the repository at start, then the sync.
TRITON_EXPLICIT = ("--model-control-mode=explicit", "--load-model=*")
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


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
        return self

    def stop(self) -> None:
        if self.sync is not None:
            self.sync.stop()
            self.sync = None
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None

    def http(self, method: str, target: str) -> tuple[int, dict[str, str], bytes] | None:
        """``GET /metrics`` on the API's port; None for anything else."""
        if method != "GET" or target.split("?", 1)[0] != "/metrics":
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
