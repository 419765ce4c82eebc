"""Shared GPU tier health: one instance's opening reaches the fleet, one trial per cooldown for the fleet,
the closing reaches everyone; the DynamoDB store's conditional writes against moto; a store that is
down leaves each instance a lone breaker."""

from __future__ import annotations

import pytest

from tests.support.fakes import FakeClock
from tierserve.tier_health import DynamoHealthStore, MemoryHealthStore, SharedCircuitBreaker


class Fleet:
    """N router instances sharing one store; one clock drives both the monotonic and the wall time."""

    def __init__(self, n: int, store=None, read_ttl_s: float = 1.0) -> None:
        self.clock = FakeClock(1000.0)
        self.store = store or MemoryHealthStore()
        self.breakers = [SharedCircuitBreaker(self.store, failure_threshold=3, cooldown_s=30, success_threshold=1,
                                              clock=self.clock, wall=self.clock, read_ttl_s=read_ttl_s,
                                              instance=f"i{i}") for i in range(n)]


def test_the_first_instance_to_open_tells_the_fleet():
    fleet = Fleet(3)
    a, b, c = fleet.breakers
    # Given instance a fails three times: its circuit opens and the store says so
    for _ in range(3):
        assert a.allow()
        a.record_failure("refused")
    assert a.state == "open" and fleet.store.item["state"] == "open" and fleet.store.item["by"] == "i0"
    # Then b, which has not failed once, opens on its next look (after its cached read expires)
    fleet.clock.advance(1.0)
    assert b.state == "open" and not b.allow()
    # And c, whose cached read is still fresh, opens after its first failure at the latest
    c._read_at = fleet.clock()  # c just read "closed"
    assert c.allow()
    c.record_failure("refused")
    assert c.state == "open"


def test_one_trial_for_the_whole_fleet_then_everyone_closes():
    fleet = Fleet(3)
    a, b, c = fleet.breakers
    for _ in range(3):
        a.record_failure()
    fleet.clock.advance(1.0)
    assert b.state == "open" and c.state == "open"
    # When the cooldown has passed, exactly one instance gets the trial
    fleet.clock.advance(31)
    allowed = [br.allow() for br in (a, b, c)]
    assert allowed.count(True) == 1
    winner = (a, b, c)[allowed.index(True)]
    # And when its trial succeeds, the fleet's item closes and the others follow
    winner.record_success()
    assert fleet.store.item["state"] == "closed"
    fleet.clock.advance(1.0)
    others = [br for br in (a, b, c) if br is not winner]
    for br in others:
        assert br.allow()  # its own trial: the tier is back, no lease needed
        br.record_success()
        assert br.state == "closed"


def test_a_failed_trial_reopens_the_tier_for_everyone():
    fleet = Fleet(2)
    a, b = fleet.breakers
    for _ in range(3):
        a.record_failure()
    fleet.clock.advance(31)
    assert a.allow()  # a wins the trial
    a.record_failure("still down")
    assert fleet.store.item["until"] == pytest.approx(fleet.clock() + 30)
    assert not b.allow()  # the tier was reopened: b waits for the new cooldown without a call


def test_a_store_that_is_down_leaves_a_lone_breaker():
    class Down:
        def read(self):
            raise ConnectionError("no DynamoDB")

        publish_open = publish_closed = take_trial = read

    br = SharedCircuitBreaker(Down(), failure_threshold=2, cooldown_s=30, clock=FakeClock(), wall=FakeClock())
    assert br.allow()
    br.record_failure()
    br.record_failure()
    assert br.state == "open"  # as a CircuitBreaker alone


def test_dynamodb_store_conditional_writes(monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    with moto.mock_aws():
        client = boto3.client("dynamodb")
        client.create_table(TableName="jobs", KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                            BillingMode="PAY_PER_REQUEST")
        store = DynamoHealthStore("jobs", lambda: client)
        assert store.read().state == "closed"
        store.publish_open(1030.0, "i0", "3 consecutive failures")
        shared = store.read()
        assert (shared.state, shared.until, shared.by) == ("open", 1030.0, "i0")
        item = client.get_item(TableName="jobs", Key={"id": {"S": "tier-health#gpu"}})["Item"]
        assert int(item["expiration"]["N"]) == 1030 + 3600  # the JobTable's TTL removes it
        assert not store.take_trial(1010.0, 10, "i1")  # still cooling down
        assert store.take_trial(1031.0, 10, "i1")  # one winner
        assert not store.take_trial(1032.0, 10, "i2")  # the lease holds
        assert store.take_trial(1042.0, 10, "i2")  # it expired: another may try
        store.publish_closed("i2")
        assert store.read().state == "closed"
        assert not store.take_trial(1100.0, 10, "i3")  # nothing to try while closed


def test_in_the_simulation_the_fleet_pays_one_trial_per_cooldown_instead_of_one_per_instance():
    # tooling/tierserve_tools/bench/shared_health_sim.py, small: 20 instances, 200 req/s, a 70 s outage (two cooldowns)
    from tierserve_tools.bench.shared_health_sim import simulate

    alone = simulate(False, instances=20, rate=200, outage=(5, 75), duration=90)
    shared = simulate(True, instances=20, rate=200, outage=(5, 75), duration=90)
    assert alone["failed_later"] == 2 * 20  # every instance sends its own trial after each cooldown
    assert shared["failed_later"] == 2  # one trial per cooldown for the fleet
    assert shared["failed_gpu_attempts"] < alone["failed_gpu_attempts"]
    assert shared["served_by_gpu"] + shared["served_by_cpu"] == shared["requests"]  # nothing was lost
