"""tierserve.admission: a model's cap on concurrent generations shared by every router (one DynamoDB item per
model version, a map of leased slots), exact under 20 racing threads; released when a stream ends, fails or is
closed; a dead router's expired lease reclaimed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.usage_table import Clock, moto_usage_table
from tierserve import admission, errors
from tierserve.generation.events import GenerationEvent
from tierserve.manifest import GenerationSpec
from tierserve.protocol.rendering import render_error

TABLE = "tierserve-admission-test"
T0 = 1_800_000_000.0


@pytest.fixture
def dynamodb(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with moto_usage_table(monkeypatch, TABLE, serialize_updates=True) as client:
        yield client


def cap(client: Any, clock: Clock | None = None) -> admission.ConcurrencyCap:
    return admission.ConcurrencyCap(TABLE, client=client, clock=clock or Clock(T0))


def test_twenty_threads_racing_for_a_cap_of_three_admit_exactly_three(dynamodb: Any) -> None:
    threads = 20
    start = threading.Barrier(threads)
    shared = cap(dynamodb)

    def race(_: int) -> admission.Slot | errors.TooManyRequestsError:
        start.wait()
        try:
            return shared.acquire("tiny", "1", 3)
        except errors.TooManyRequestsError as exc:
            return exc

    with ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(race, range(threads)))
    slots = [o for o in out if isinstance(o, admission.Slot)]
    refused = [o for o in out if isinstance(o, errors.TooManyRequestsError)]
    assert (len(slots), len(refused)) == (3, 17)
    assert set(shared.in_flight("tiny", "1")) == {s.id for s in slots}
    assert all(r.retry_after_s > 0 and "cap on concurrent generations (3)" in str(r) for r in refused)


def test_release_frees_a_slot_once(dynamodb: Any) -> None:
    shared = cap(dynamodb)
    first, second = shared.acquire("tiny", "1", 2), shared.acquire("tiny", "1", 2)
    with pytest.raises(errors.TooManyRequestsError):
        shared.acquire("tiny", "1", 2)
    first.release()
    first.release()  # twice: nothing more
    third = shared.acquire("tiny", "1", 2)
    assert set(shared.in_flight("tiny", "1")) == {second.id, third.id}
    with pytest.raises(errors.TooManyRequestsError):
        shared.acquire("tiny", "1", 2)


def test_versions_and_models_have_their_own_caps(dynamodb: Any) -> None:
    shared = cap(dynamodb)
    shared.acquire("tiny", "1", 1)
    shared.acquire("tiny", "2", 1)
    shared.acquire("other", "1", 1)
    with pytest.raises(errors.TooManyRequestsError):
        shared.acquire("tiny", "1", 1)


def test_an_expired_lease_is_reclaimed_and_a_live_one_is_not(dynamodb: Any) -> None:
    clock = Clock(T0)
    shared = cap(dynamodb, clock)
    dead = shared.acquire("tiny", "1", 2, lease_s=60)  # its router dies: never released
    alive = shared.acquire("tiny", "1", 2, lease_s=600)
    clock.t += 59
    with pytest.raises(errors.TooManyRequestsError):
        shared.acquire("tiny", "1", 2)
    clock.t += 2  # the dead router's lease has expired
    taken = shared.acquire("tiny", "1", 2, lease_s=600)
    assert set(shared.in_flight("tiny", "1")) == {alive.id, taken.id}
    dead.release()  # a late release of a reclaimed slot removes nothing else
    assert set(shared.in_flight("tiny", "1")) == {alive.id, taken.id}
    with pytest.raises(errors.TooManyRequestsError):
        shared.acquire("tiny", "1", 2)


def test_a_cap_lowered_below_the_slots_held_refuses_until_they_drain(dynamodb: Any) -> None:
    shared = cap(dynamodb)
    held = [shared.acquire("tiny", "1", 3) for _ in range(3)]
    held[0].release()
    with pytest.raises(errors.TooManyRequestsError):
        shared.acquire("tiny", "1", 2)
    held[1].release()
    shared.acquire("tiny", "1", 2)


def test_a_refusal_is_openais_429_with_retry_after(dynamodb: Any) -> None:
    shared = cap(dynamodb)
    shared.acquire("tiny", "1", 1)
    with pytest.raises(errors.TooManyRequestsError) as caught:
        shared.acquire("tiny", "1", 1)
    answer = render_error(caught.value, "openai")
    assert answer.status == 429
    assert {k.lower(): v for k, v in answer.headers.items()}.get("retry-after") == "1"
    assert answer.document["error"]["code"] == "rate_limit_exceeded"


def test_a_cap_that_is_not_positive_is_a_configuration_error(dynamodb: Any) -> None:
    with pytest.raises(errors.ConfigurationError, match="max_concurrency"):
        cap(dynamodb).acquire("tiny", "1", 0)


# --- the hook: run_capped -----------------------------------------------------------------------------------------


class Model:
    name, version = "tiny", "1"
    generation = GenerationSpec(context_length=64, eos_token_ids=(0,), max_concurrency=1)


def _events(n: int, fail: bool = False) -> Iterator[GenerationEvent]:
    for i in range(n):
        if fail and i == 1:
            raise RuntimeError("the tier failed mid-stream")
        yield GenerationEvent(text=str(i), token_ids=(i,), finish_reason="stop" if i == n - 1 else None)


@pytest.fixture
def routed(dynamodb: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from tierserve import settings

    monkeypatch.setenv("USAGE_TABLE", TABLE)
    monkeypatch.delenv("GENERATION_MAX_CONCURRENCY", raising=False)
    settings.reset_settings()
    admission.reset()
    monkeypatch.setattr(admission.ConcurrencyCap, "client", property(lambda self: dynamodb))
    yield dynamodb
    admission.reset()
    settings.reset_settings()


@pytest.mark.parametrize("end", ["final", "error", "close", "start_fails"])
def test_run_capped_releases_the_slot_when_the_generation_ends(routed: Any, end: str) -> None:
    model: Any = Model()
    if end == "start_fails":
        def start() -> Iterator[GenerationEvent]:
            raise errors.TooManyRequestsError("over the caller's budget")

        with pytest.raises(errors.TooManyRequestsError, match="budget"):
            admission.run_capped(model, 60, start)
    else:
        events = admission.run_capped(model, 60, lambda: _events(3, fail=end == "error"))
        with pytest.raises(errors.TooManyRequestsError):  # the cap (1) is held while it streams
            admission.run_capped(model, 60, lambda: _events(3))
        if end == "final":
            assert [e.text for e in events] == ["0", "1", "2"]
        elif end == "error":
            with pytest.raises(RuntimeError):
                list(events)
        else:
            next(events)
            events.close()  # type: ignore[attr-defined]
    assert admission.shared_cap().in_flight("tiny", "1") == {}  # type: ignore[union-attr]
    assert [e.text for e in admission.run_capped(model, 60, lambda: _events(2))] == ["0", "1"]


def test_run_capped_takes_the_settings_override_and_leases_the_invocations_time(
        routed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierserve import settings

    monkeypatch.setenv("GENERATION_MAX_CONCURRENCY", "2")
    settings.reset_settings()
    model: Any = Model()
    first = admission.run_capped(model, 120, lambda: _events(2))
    admission.run_capped(model, None, lambda: _events(2))
    with pytest.raises(errors.TooManyRequestsError, match=r"\(2\)"):
        admission.run_capped(model, 60, lambda: _events(2))
    leases = sorted(admission.shared_cap().in_flight("tiny", "1").values())  # type: ignore[union-attr]
    assert first.slot.expires_at in leases  # type: ignore[attr-defined]
    import time

    now = time.time()
    assert abs(leases[0] - (now + 120 + admission.LEASE_GRACE_S)) < 10
    assert abs(leases[1] - (now + admission.DEFAULT_LEASE_S + admission.LEASE_GRACE_S)) < 10


def test_without_a_usage_table_nothing_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    from tierserve import settings

    monkeypatch.delenv("USAGE_TABLE", raising=False)
    settings.reset_settings()
    admission.reset()
    model: Any = Model()
    first = admission.run_capped(model, 60, lambda: _events(2))
    second = admission.run_capped(model, 60, lambda: _events(2))
    assert [e.text for e in first] == [e.text for e in second] == ["0", "1"]
