"""tierserve_tools.moto_ext: moto as DynamoDB behaves where the project relies on it.

Why: moto serves each request on its own thread (moto_server is threaded) and runs an UpdateItem as a
read-modify-write of the stored item with no lock, so two concurrent ``ADD``s to one number can lose one
of them. That lost a fanned-out batch job's shard from ``counts.lines`` (issue 16, defect 9): DynamoDB
applies an UpdateItem atomically, the emulator must too. The test pauses one update between its read of
the counter and its write, and lets a second update run meanwhile: the interleaving that lost the count.
"""

from __future__ import annotations

import threading

import boto3
import pytest

from tierserve_tools.moto_ext import patch


@pytest.fixture
def table(monkeypatch):
    from moto import mock_aws

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    patch()  # what moto_server runs under `tierserve serve` and the integration tests
    with mock_aws():
        ddb = boto3.resource("dynamodb")
        ddb.create_table(TableName="jobs", KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                         AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                         BillingMode="PAY_PER_REQUEST")
        t = ddb.Table("jobs")
        t.put_item(Item={"id": "job", "lines": 0, "lines_ok": 0})
        yield t


def _count(table, shard: int, lines: int) -> None:
    """A shard's completion, as tierserve.batch.shards.shard_done writes it."""
    table.update_item(Key={"id": "job"}, UpdateExpression="ADD done_shards :i, #l :l, #o :l",
                      ConditionExpression="attribute_exists(id) AND NOT contains(done_shards, :n)",
                      ExpressionAttributeNames={"#l": "lines", "#o": "lines_ok"},
                      ExpressionAttributeValues={":i": {shard}, ":n": shard, ":l": lines})


def test_an_update_item_is_atomic_while_another_runs_between_its_read_and_its_write(table, monkeypatch):
    from moto.dynamodb.models.dynamo_type import DynamoType

    # Given shard 0's update paused after it read `lines` (the sum is computed from the value read) ...
    first = threading.Event()  # shard 0 has read `lines`
    second_done = threading.Event()
    add = DynamoType.__add__

    def paused_add(self, other):
        if threading.current_thread().name == "shard-0" and not first.is_set():
            first.set()
            second_done.wait(1.0)  # an atomic update holds shard 1 back: this waits out its second
        return add(self, other)

    monkeypatch.setattr(DynamoType, "__add__", paused_add)
    a = threading.Thread(target=_count, args=(table, 0, 50), name="shard-0")
    a.start()
    assert first.wait(5)

    # ... when shard 1 completes meanwhile
    def second() -> None:
        _count(table, 1, 51)
        second_done.set()

    b = threading.Thread(target=second, name="shard-1")
    b.start()
    a.join(10)
    b.join(10)

    # Then both shards are in the set and in every counter
    item = table.get_item(Key={"id": "job"}, ConsistentRead=True)["Item"]
    assert sorted(item["done_shards"]) == [0, 1]
    assert (item["lines"], item["lines_ok"]) == (101, 101), "a concurrent UpdateItem lost a shard's ADD"
