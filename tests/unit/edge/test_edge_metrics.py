"""EdgeCounters and the Prometheus text: labels are bounded by what the device knows, never by request input."""

from __future__ import annotations

from tierserve.edge.metrics import OTHER_MODEL, EdgeCounters, PromText


def test_requests_for_models_the_device_does_not_know_share_one_label() -> None:
    counters = EdgeCounters(known=lambda name: name == "lin")
    counters.request("lin", "edge", "http", 200)
    for i in range(40):
        counters.request(f"random-{i}", "edge", "http", 404)
    counters.request("-", "edge", "http", 200)  # not a model route
    assert dict(counters.requests) == {("lin", "edge", "http", 200): 1, (OTHER_MODEL, "edge", "http", 404): 40,
                                       ("-", "edge", "http", 200): 1}


def test_without_a_predicate_every_name_is_its_own_label() -> None:
    counters = EdgeCounters()
    counters.request("a", "edge", "grpc", 200)
    counters.request("b", "edge", "grpc", 200)
    assert {m for m, *_ in counters.requests} == {"a", "b"}


def test_prometheus_text_escapes_label_values() -> None:
    p = PromText()
    p.family("x_total", "counter", "help", [({"model": 'a"b\\c\nd'}, 2), ({}, 1.5)])
    assert p.text().splitlines()[2:] == ['x_total{model="a\\"b\\\\c\\nd"} 2', "x_total 1.5"]
