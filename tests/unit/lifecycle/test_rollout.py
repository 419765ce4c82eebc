"""The rollout state machine on a folder store with scripted metrics: promote, roll back (errors, p99,
fallbacks), hold without traffic, resume after a driver died, and stop when someone else steps in."""

from __future__ import annotations

import dataclasses

import pytest

from tests.support.lifecycle import version
from tierserve.errors import LifecycleError
from tierserve.lifecycle.objects import FolderObjects
from tierserve.lifecycle.registry import Registry
from tierserve.lifecycle.rollout import (
    ABORTED,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    Figures,
    RolloutState,
    Thresholds,
    breaches,
    new_rollout,
    tick,
)


class Scripted:
    """Metrics as a function of the version: ``canary`` and ``default`` Figures per second of window."""

    def __init__(self, canary: Figures, default: Figures) -> None:
        self.per_s = {"2": canary, "1": default}
        self.calls: list[tuple[float, float]] = []

    def figures(self, model, versions, start, end):
        self.calls.append((start, end))
        span = end - start
        return {v: Figures(f.requests * span, f.errors * span, f.fallbacks * span, f.p99_ms)
                for v, f in self.per_s.items() if v in versions}


GOOD = Figures(requests=10, errors=0, fallbacks=0, p99_ms=5.0)
BASE = Figures(requests=90, errors=0, fallbacks=0, p99_ms=5.0)


@pytest.fixture
def reg(tmp_path) -> Registry:
    r = Registry(FolderObjects(tmp_path / "store"), actor="rollout-test")
    r.publish(version("m", "1"))
    r.publish(version("m", "2"))
    return r


def run(state: RolloutState, reg: Registry, metrics, start: float, until: float, every: float = 1.0) -> RolloutState:
    t = start
    while t <= until and state.status == RUNNING:
        state = tick(state, reg, metrics, t)
        t += every
    return state


def rollout(reg, **thresholds) -> RolloutState:
    return new_rollout(reg, "m", "2", [10, 50, 100], 5.0, Thresholds(**{"max_error_rate": 0.01, **thresholds}), 0.0)


def test_a_good_version_goes_through_every_step_and_is_promoted(reg):
    state = run(rollout(reg, max_p99_ms=50), reg, Scripted(GOOD, BASE), 0.0, 60.0)
    assert state.status == PROMOTED
    assert [e["event"] for e in state.events] == ["step_started", "step_passed", "step_started", "step_passed",
                                                  "promoted"]
    assert [e.get("percent") for e in state.events if e["event"] == "step_started"] == [10, 50]
    entry = reg.entry("m")
    assert (entry.default_version, entry.canary) == ("2", None)
    actions = [(h["action"], h["why"]) for h in reg.history("m")][2:]
    assert actions == [("canary", "rollout step 1/3"), ("canary", "rollout step 2/3"),
                       ("promote", "rollout passed every step (10,50,100%)")]
    assert reg.history("m")[-1]["details"]["figures"]["canary"]["requests"] >= 20


def test_a_version_failing_5_percent_is_rolled_back_within_one_interval(reg):
    failing = dataclasses.replace(GOOD, errors=0.5)  # 5% of its requests
    state = run(rollout(reg), reg, Scripted(failing, BASE), 0.0, 60.0)
    assert state.status == ROLLED_BACK and "error rate 5.00% > 1.00%" in state.reason
    rolled = next(e for e in state.events if e["event"] == "rolled_back")
    assert rolled["at"] - state.events[0]["at"] <= state.interval_s  # within the first interval
    entry = reg.entry("m")
    assert (entry.default_version, entry.canary) == ("1", None)
    last = reg.history("m")[-1]
    assert last["action"] == "rollback" and last["why"].startswith("automatic rollback at 10%")
    assert last["details"]["figures"]["canary"]["error_rate"] == 0.05


def test_a_3x_slower_version_is_rolled_back_on_p99(reg):
    slow = dataclasses.replace(GOOD, p99_ms=15.0)
    state = run(rollout(reg, max_p99_ms=10), reg, Scripted(slow, BASE), 0.0, 60.0)
    assert state.status == ROLLED_BACK and "p99 15.0 ms > 10 ms (default: 5.0 ms)" in state.reason


def test_fallbacks_count_only_when_worse_than_the_default(reg):
    t = Thresholds(max_fallback_rate=0.05, min_requests=1)
    both = Figures(requests=100, fallbacks=50)
    assert breaches(both, both, t) == []  # the GPU tier is down for everyone: not the canary's fault
    assert breaches(both, Figures(requests=100), t) == ["fallback rate 50.00% > 5.00% (default: 0.00%)"]
    assert breaches(Figures(requests=5, errors=5), Figures(), Thresholds(min_requests=20)) == []  # too few to judge


def test_without_enough_traffic_the_step_is_held(reg):
    quiet = Figures(requests=1, p99_ms=5.0)
    state = run(rollout(reg), reg, Scripted(quiet, BASE), 0.0, 12.0)
    assert state.status == RUNNING and state.step == 0 and state.events[-1]["event"] == "held"
    assert reg.entry("m").canary == {"version": "2", "percent": 10}


def test_an_interrupted_rollout_resumes_where_it_was(reg):
    # Given a rollout saved after its first step passed, whose driver died right after it applied step 2's
    # share (the saved state still says step 1)
    metrics = Scripted(GOOD, BASE)
    state = run(rollout(reg), reg, metrics, 0.0, 6.0)
    assert state.step == 1 and reg.entry("m").canary["percent"] == 50
    saved = dataclasses.replace(state, step=0, step_started_at=1.0)
    # When another driver picks it up, Then it restarts the saved step and carries on to the promotion
    resumed = run(saved, reg, metrics, 7.0, 60.0)
    assert resumed.status == PROMOTED and reg.entry("m").default_version == "2"


def test_someone_else_stepping_in_stops_the_rollout(reg):
    state = run(rollout(reg), reg, Scripted(GOOD, BASE), 0.0, 1.0)
    reg.rollback("m", why="by hand")
    state = tick(state, reg, Scripted(GOOD, BASE), 2.0)
    assert state.status == ABORTED and "changed by someone else" in state.reason


def test_bad_rollouts_are_refused(reg):
    with pytest.raises(LifecycleError, match="end at 100"):
        new_rollout(reg, "m", "2", [10, 50], 5, Thresholds(), 0)
    with pytest.raises(LifecycleError, match="already the default"):
        new_rollout(reg, "m", "1", [100], 5, Thresholds(), 0)
    with pytest.raises(LifecycleError, match="no published version 7"):
        new_rollout(reg, "m", "7", [100], 5, Thresholds(), 0)


def test_the_state_round_trips_through_json_and_dynamodb_values(reg):
    from tierserve.dynamo import to_dynamo

    state = rollout(reg, max_p99_ms=12.5)
    assert RolloutState.from_json(to_dynamo(state.to_json())) == state
