"""EdgeDispatcher: edge or cloud per request, the cloud link's breaker, and the one fallback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.fakes import FakeCloud, json_call
from tierserve.breaker import CircuitBreaker, HealthCache
from tierserve.edge.backend import EdgeBackend
from tierserve.edge.dispatch import FORWARDED, EdgeDispatcher
from tierserve.edge.store import EdgeStore
from tierserve.errors import BackendUnavailableError, InvalidRequestError
from tierserve.routing import at_edge, size_aware


def make(store_dir: Path, tmp_path: Path, cloud: FakeCloud | None, **kw) -> EdgeDispatcher:
    store = EdgeStore(str(store_dir), tmp_path / "cache")
    store.sync()
    return EdgeDispatcher(store, EdgeBackend(store, 1, 64 << 20), cloud, at_edge(size_aware),
                          CircuitBreaker(failure_threshold=2, cooldown_s=30.0), HealthCache(0.0),
                          **{"max_rows": 8, "concurrency": 2, **kw})


def model(d: EdgeDispatcher, name: str):
    return d.store.manifest().resolve(name)


def test_what_the_device_holds_and_can_take_is_served_here(store_dir: Path, tmp_path: Path) -> None:
    cloud = FakeCloud()
    d = make(store_dir, tmp_path, cloud)
    done = d.dispatch(model(d, "lin"), json_call(8))
    assert done.served_by == "edge" and done.decision.target == "edge" and done.fallback is None
    assert done.reply.arrays()["y"].shape == (8, 3) and not FORWARDED.get() and cloud.calls == []
    assert d.counters.hits[("lin", "1")] == 1


@pytest.mark.parametrize(("name", "rows", "why"), [
    ("gpu-only", 1, "not placed on the edge"), ("lin", 9, "9 rows > edge_max_rows 8")])
def test_the_rest_is_forwarded_and_the_cloud_says_which_tier_served(store_dir, tmp_path, name, rows, why) -> None:
    cloud = FakeCloud(served_by="gpu")
    d = make(store_dir, tmp_path, cloud)
    done = d.dispatch(model(d, name), json_call(rows), hint=None)
    assert done.served_by == "gpu" and why in done.decision.reason and FORWARDED.get()
    assert [(m.name, m.version) for m, _, _ in cloud.calls] == [(name, "1")]
    assert d.counters.forwards[(name, "1", "gpu")] == 1


def test_a_saturated_device_forwards(store_dir: Path, tmp_path: Path) -> None:
    cloud = FakeCloud()
    d = make(store_dir, tmp_path, cloud, concurrency=1)
    with d._slot():  # one inference already running
        done = d.dispatch(model(d, "lin"), json_call(1))
    assert done.served_by == "cpu" and "saturated" in done.decision.reason


def test_cloud_unreachable_edge_models_keep_serving_and_the_rest_get_503(store_dir: Path, tmp_path: Path) -> None:
    cloud = FakeCloud(fail=BackendUnavailableError("cannot reach the gateway"))
    d = make(store_dir, tmp_path, cloud)
    # A held model keeps serving here, even a batch meant for the cloud (fallback noted)
    done = d.dispatch(model(d, "lin"), json_call(20))
    assert (done.served_by, done.fallback) == ("edge", "cloud-unavailable") and d.counters.fallbacks["lin"] == 1
    # A model the device does not hold gets a fast 503 with Retry-After
    with pytest.raises(BackendUnavailableError, match="cannot use") as err:
        d.dispatch(model(d, "gpu-only"), json_call(1))
    assert err.value.retry_after_s and err.value.retry_after_s > 0
    # The breaker opened after 2 failures: the link is not tried again until its cooldown
    assert d.breaker.state == "open" and len(cloud.calls) == 2
    with pytest.raises(BackendUnavailableError, match="circuit open") as err:
        d.dispatch(model(d, "gpu-only"), json_call(1))
    assert len(cloud.calls) == 2 and 0 < err.value.retry_after_s <= 30
    assert d.state() == {"edge": "1 held", "cloud": "open"}


def test_without_a_cloud_gateway_the_message_says_how_to_configure_one(store_dir: Path, tmp_path: Path) -> None:
    d = make(store_dir, tmp_path, None)
    with pytest.raises(BackendUnavailableError, match="--cloud-url"):
        d.dispatch(model(d, "cpu-only"), json_call(1))
    assert d.state()["cloud"] == "none"


def test_a_device_that_cannot_run_a_held_model_forwards_it(store_dir: Path, tmp_path: Path) -> None:
    cloud = FakeCloud()
    d = make(store_dir, tmp_path, cloud)
    # Given the held artifact disappeared from the device's disk (and no session is loaded)
    shutil.rmtree(d.store.held(model(d, "lin")).path.parent)
    done = d.dispatch(model(d, "lin"), json_call(1))
    assert (done.served_by, done.fallback) == ("cpu", "edge-unavailable") and len(cloud.calls) == 1


def test_an_input_error_is_the_requests_never_forwarded(store_dir: Path, tmp_path: Path) -> None:
    cloud = FakeCloud()
    d = make(store_dir, tmp_path, cloud)
    from tierserve.protocol.calls import Body, InferenceCall

    bad = InferenceCall.from_body(Body(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], '
                                       b'"data": [1, 2, 3, 4, 5]}]}'))
    with pytest.raises(InvalidRequestError):
        d.dispatch(model(d, "lin"), bad)
    assert cloud.calls == []


def test_ready_asks_the_cloud_only_for_what_the_device_does_not_hold(store_dir: Path, tmp_path: Path) -> None:
    cloud = FakeCloud(ready=False)
    d = make(store_dir, tmp_path, cloud)
    assert d.ready(model(d, "lin")) and cloud.ready_calls == 0
    assert not d.ready(model(d, "gpu-only")) and cloud.ready_calls == 1
    cloud.ready_value = True
    assert d.ready(model(d, "gpu-only"))
