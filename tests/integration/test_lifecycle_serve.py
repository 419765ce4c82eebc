"""The lifecycle through `tierserve serve`: a promote reaching live traffic without breaking a request, the
metrics page, and the rollout cases run by `tierserve models rollout --stack` against real traffic.

Each rollout case has its own model (v1 the default, v2 the candidate) on one stack: its S3 store, its
CloudWatch (the functions' EMF lines, turned into PutMetricData) and its DynamoDB rollouts table are
moto_server's. The bad versions are bad for real: v2 of ``flaky`` fails in onnxruntime on one request in
twenty (answered 400: the input's values made the graph fail), v2 of ``slow`` runs hundreds of extra
MatMuls. Intervals are seconds long.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.support.lifecycle import compiled_bytes, linear_variant_onnx
from tierserve.lifecycle.objects import open_objects
from tierserve.lifecycle.registry import Registry
from tierserve.manifest import parse_time
from tierserve_tools.publishing import publish_version
from tierserve_tools.serve import LocalStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
#: The candidates: (model, what makes its v2 what it is).
CANDIDATES = {"good": {}, "flaky": {"fail_above": 1.645}, "slow": {"matmuls": 1000}, "resumed": {},
              "swap": {}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    build, candidates = tmp_path_factory.mktemp("build"), tmp_path_factory.mktemp("candidates")
    for name, bad in CANDIDATES.items():
        compiled_bytes(build, name, "1", linear_variant_onnx(seed=1))
        compiled_bytes(candidates / name, name, "2", linear_variant_onnx(seed=2, **bad))
    workdir = tmp_path_factory.mktemp("serve")
    with LocalStack(build, port=0, batch=False, triton=False, workdir=workdir, env={"MANIFEST_TTL_S": "1"}) as s:
        s.candidates = candidates
        s.registry = Registry(open_objects(s.model_store_uri, s.client("s3")), actor="test")
        yield s


def infer(url: str, model: str, x: np.ndarray, rid: str) -> tuple[int, str | None]:
    body = json.dumps({"id": rid, "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                              "data": x.tolist()}]}).encode()
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())["model_version"]
    except urllib.error.HTTPError as err:
        return err.code, None


class Traffic:
    """Requests to one model from ``threads`` threads until stopped: (time, status, version) each.
    Inputs are seeded; request ids are sequential, so the canary split is the same on every run."""

    def __init__(self, url: str, model: str, threads: int = 2, seed: int = 0) -> None:
        self.url, self.model = url, model
        self.results: list[tuple[float, int, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(seed + i, i), daemon=True) for i in range(threads)]

    def _run(self, seed: int, lane: int) -> None:
        rng = np.random.default_rng(seed)
        n = 0
        while not self._stop.is_set():
            status, version = infer(self.url, self.model, rng.standard_normal(4).astype(np.float32),
                                    f"{self.model}-{lane}-{n}")
            self.results.append((time.time(), status, version))
            n += 1

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def rollout(stack, model: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tierserve_tools.cli", "models", "--stack", str(stack.workdir), "--by", "ci",
           "rollout", model, "2", "--tick", "0.25s", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def publish(stack, model: str) -> None:
    publish_version(stack.candidates / model / model / "2", stack.registry.objects, stack.registry)


def test_a_promote_reaches_live_traffic_without_breaking_a_request(stack):
    # Given steady traffic to 'swap' (v1 the default) and v2 published
    publish(stack, "swap")
    with Traffic(stack.url, "swap") as traffic:
        time.sleep(1.0)
        # When v2 is promoted
        promoted_at = time.time()
        stack.registry.promote("swap", "2", why="test")
        deadline = time.time() + 30
        while time.time() < deadline and not any(t > promoted_at and v == "2" for t, _, v in traffic.results):
            time.sleep(0.05)
        time.sleep(0.5)
    # Then v2 serves within MANIFEST_TTL_S (1 s here) plus a request, and no request failed on the way
    first = min(t for t, _, v in traffic.results if t > promoted_at and v == "2")
    assert first - promoted_at < 5.0
    assert [s for _, s, _ in traffic.results] == [200] * len(traffic.results)
    assert traffic.results[-1][2] == "2"


def test_the_metrics_page_has_per_version_figures(stack):
    for i in range(3):
        infer(stack.url, "good", np.zeros(4, np.float32), f"page-{i}")
    with urllib.request.urlopen(f"{stack.url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
        assert resp.headers["content-type"].startswith("text/plain")
    line = next(x for x in text.splitlines() if x.startswith("tierserve_requests_total{")
                and 'function="RouterFunction"' in x and 'model="good"' in x)
    assert 'version="1"' in line and float(line.rsplit(" ", 1)[1]) >= 3
    assert "tierserve_latency_ms_bucket{" in text and "tierserve_model_load_time_ms_count{" in text


def test_a_good_version_is_promoted_to_100_percent(stack):
    publish(stack, "good")
    with Traffic(stack.url, "good"):
        proc = rollout(stack, "good", "--steps", "25,50,100", "--interval", "3s", "--max-error-rate", "0.01",
                       "--max-p99-ms", "5000", "--min-requests", "10")
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "step_started 25%" in out and "step_started 50%" in out and "good: promoted" in out
    entry = stack.registry.entry("good")
    assert (entry.default_version, entry.canary) == ("2", None)
    last = stack.registry.history("good")[-1]
    assert last["action"] == "promote" and last["details"]["figures"]["canary"]["requests"] >= 10


def test_a_version_failing_5_percent_of_requests_is_rolled_back_within_one_interval(stack):
    publish(stack, "flaky")
    with Traffic(stack.url, "flaky", threads=3) as traffic:
        proc = rollout(stack, "flaky", "--steps", "25,50,100", "--interval", "20s", "--max-error-rate", "0.01",
                       "--min-requests", "20")
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, out
    assert "flaky: rolled_back: automatic rollback at 25%: error rate" in out
    last = stack.registry.history("flaky")[-1]
    assert last["action"] == "rollback" and last["to"]["canary"] is None and last["to"]["default"] == "1"
    figures = last["details"]["figures"]
    assert figures["canary"]["error_rate"] > 0.01 and figures["default"]["error_rate"] == 0
    assert figures["window_s"] <= 20  # within the first interval
    errors = [t for t, s, _ in traffic.results if s >= 400]
    rolled_at = parse_time(last["at"])
    assert rolled_at is not None
    print(f"\nfirst canary error -> rollback committed: {rolled_at - errors[0]:.1f} s "
          f"({figures['canary']['requests']} canary requests, {figures['canary']['error_rate']:.1%} failed)")


def test_a_much_slower_version_is_rolled_back_on_p99(stack):
    publish(stack, "slow")
    with Traffic(stack.url, "slow"):
        proc = rollout(stack, "slow", "--steps", "50,100", "--interval", "30s", "--max-p99-ms", "200",
                       "--min-requests", "10")
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, out
    assert "slow: rolled_back: automatic rollback at 50%: p99" in out
    figures = stack.registry.history("slow")[-1]["details"]["figures"]
    assert figures["canary"]["p99_ms"] > 3 * figures["default"]["p99_ms"] or figures["canary"]["p99_ms"] > 200


def test_an_interrupted_rollout_resumes_where_it_was(stack):
    publish(stack, "resumed")
    with Traffic(stack.url, "resumed"):
        # Given a rollout driver killed once its second step has started
        proc = rollout(stack, "resumed", "--steps", "20,50,100", "--interval", "3s", "--min-requests", "10")
        seen = ""
        assert proc.stdout is not None
        for line in proc.stdout:
            seen += line
            if "step_started 50%" in line:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert stack.registry.entry("resumed").canary == {"version": "2", "percent": 50}, seen
        # When it is started again with the same arguments
        again = rollout(stack, "resumed", "--steps", "20,50,100", "--interval", "3s", "--min-requests", "10")
        out, _ = again.communicate(timeout=240)
    # Then it resumes at step 2 and promotes
    assert again.returncode == 0, out
    assert "resuming the rollout of v2 at step 2/3 (50%)" in out and "resumed: promoted" in out
    assert stack.registry.entry("resumed").default_version == "2"
