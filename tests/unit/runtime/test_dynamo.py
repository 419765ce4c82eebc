"""tierserve.dynamo: the DynamoDB value converters that the batch state and the rollout state share."""

from __future__ import annotations

from decimal import Decimal

from tierserve.dynamo import from_dynamo, to_dynamo


def test_floats_become_decimals_of_their_repr_through_dicts_and_lists():
    doc = {"a": 0.1, "b": [1, 2.5, {"c": 1e-7}], "s": "x", "n": None, "t": True}
    assert to_dynamo(doc) == {"a": Decimal("0.1"), "b": [1, Decimal("2.5"), {"c": Decimal("1e-07")}], "s": "x",
                              "n": None, "t": True}


def test_decimals_come_back_as_ints_when_whole_and_floats_otherwise():
    assert from_dynamo({"i": Decimal("3"), "f": Decimal("0.25"), "l": [Decimal("2.0"), "s"], "set": {1}}) == \
        {"i": 3, "f": 0.25, "l": [2, "s"], "set": {1}}
    assert type(from_dynamo(Decimal("2.0"))) is int


def test_a_round_trip_keeps_every_float():
    doc = {"read_s": 0.123456, "timings": [1.5, 2.25e-3], "count": 7}
    assert from_dynamo(to_dynamo(doc)) == doc
