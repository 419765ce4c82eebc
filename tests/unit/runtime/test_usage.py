"""tierserve.usage: usage per caller and UTC day, budgets per caller in fixed UTC minute and day windows,
reservations settled at the end of a generation; exact under concurrent routers (20 threads against a real
moto_server over HTTP)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest

from tests.support.moto_server import running_moto_server
from tests.support.usage_table import Clock, moto_usage_table
from tierserve import errors, usage
from tierserve.generation.events import GenerationEvent, Usage
from tierserve.protocol.rendering import render_error
from tierserve_tools.usage_cli import create_table

TABLE = "tierserve-usage-test"
#: 2027-01-15T08:00:30Z: 30 s into a minute, 8 h into a UTC day.
T0 = 1_800_000_000 - 1_800_000_000 % 86_400 + 8 * 3600 + 30


@pytest.fixture
def dynamodb(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with moto_usage_table(monkeypatch, TABLE) as client:
        yield client


def ledger(client: Any, tpm: int = 0, tpd: int = 0, clock: Clock | None = None, table: str = TABLE) -> usage.Ledger:
    return usage.Ledger(table, usage.Budget(tpm, tpd), client=client, clock=clock or Clock(T0), override_ttl_s=0)


def items(client: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(i["caller"]["S"], i["sk"]["S"]): i for i in client.scan(TableName=TABLE)["Items"]}


# --- callers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("context", "caller"), [
    ({"authorizer": {"caller": "team-a", "key_id": "0123456789abcdef"}}, "team-a"),       # a tierserve API key
    ({"authorizer": {"claims": {"sub": "3f1c-user"}}}, "3f1c-user"),                     # Cognito on a REST API
    ({"authorizer": {"jwt": {"claims": {"sub": "u-9"}}}}, "u-9"),                        # JWT on an HTTP API
    ({"authorizer": {"iam": {"userArn": "arn:aws:iam::123456789012:user/alice"}}},
     "arn:aws:iam::123456789012:user/alice"),                                             # IAM on an HTTP API
    ({"identity": {"userArn": "arn:aws:sts::123456789012:assumed-role/R/s"}},
     "arn:aws:sts::123456789012:assumed-role/R/s"),                                      # IAM on a REST API
    ({}, usage.ANONYMOUS),
])
def test_the_caller_is_the_key_the_jwt_sub_or_the_iam_principal(context: dict, caller: str) -> None:
    assert usage.caller_of({"requestContext": context}) == caller


def test_a_caller_that_cannot_be_a_key_is_a_400() -> None:
    with pytest.raises(errors.InvalidRequestError, match="not a caller name"):
        usage.check_caller("x\n")


# --- windows ---------------------------------------------------------------------------------------------------------


def test_windows_are_fixed_utc_minutes_and_days() -> None:
    assert usage.window_key(usage.MINUTE, T0) == "window#m#2027-01-15T08:00"
    assert usage.window_key(usage.DAY, T0) == "window#d#2027-01-15"
    assert usage.window_end(usage.MINUTE, T0) == T0 + 30
    assert usage.window_end(usage.DAY, T0) == T0 - 30 - 8 * 3600 + 86_400


# --- admission -------------------------------------------------------------------------------------------------------


def test_admit_reserves_in_both_windows_and_settle_gives_back_the_difference(dynamodb) -> None:
    led = ledger(dynamodb, tpm=1000, tpd=10_000)
    r = led.admit("team-a", "llm", 300, version="2")
    assert (led.window_tokens("team-a", usage.MINUTE), led.window_tokens("team-a", usage.DAY)) == (300, 300)
    assert r.settle(120) == -180
    assert (led.window_tokens("team-a", usage.MINUTE), led.window_tokens("team-a", usage.DAY)) == (120, 120)
    assert r.settle(50) == 0  # settled once only
    assert led.window_tokens("team-a", usage.DAY) == 120
    ttl = {sk: int(i["expires_at"]["N"]) for (_, sk), i in items(dynamodb).items()}
    assert ttl["window#m#2027-01-15T08:00"] == T0 + 30 + usage.WINDOW_GRACE_S


def test_over_the_minute_budget_is_a_429_until_the_minute_ends_and_the_day_is_given_back(dynamodb) -> None:
    clock = Clock(T0)
    led = ledger(dynamodb, tpm=1000, tpd=10_000, clock=clock)
    led.admit("team-a", "llm", 700)
    with pytest.raises(errors.TooManyRequestsError) as caught:
        led.admit("team-a", "llm", 400)
    assert caught.value.retry_after_s == 30 and "1,000 tokens per minute" in caught.value.message
    assert led.window_tokens("team-a", usage.DAY) == 700  # the day's reservation was given back
    answer = render_error(caught.value, "openai")
    assert answer.status == 429 and answer.headers["retry-after"] == "30"
    assert answer.document["error"]["code"] == "rate_limit_exceeded"
    assert answer.document["error"]["type"] in ("requests", "rate_limit_error", "tokens", "invalid_request_error")
    # another caller is served meanwhile; the same caller again in the next minute
    led.admit("team-b", "llm", 400)
    clock.t += 30
    led.admit("team-a", "llm", 400)
    assert led.window_tokens("team-a", usage.MINUTE) == 400 and led.window_tokens("team-a", usage.DAY) == 1100


def test_over_the_day_budget_is_a_429_until_the_utc_day_ends(dynamodb) -> None:
    led = ledger(dynamodb, tpm=0, tpd=1000)
    led.admit("team-a", "llm", 900)
    with pytest.raises(errors.TooManyRequestsError, match="per day") as caught:
        led.admit("team-a", "llm", 101)
    assert caught.value.retry_after_s == 16 * 3600 - 30
    led.admit("team-a", "llm", 100)  # exactly to the limit is allowed


def test_a_request_larger_than_a_whole_window_is_a_400_naming_max_tokens(dynamodb) -> None:
    led = ledger(dynamodb, tpm=500, tpd=10_000)
    with pytest.raises(errors.InvalidParameterError) as caught:
        led.admit("team-a", "llm", 501)
    assert caught.value.param == "max_tokens" and "whole budget of 500 tokens per minute" in caught.value.message
    assert items(dynamodb) == {}


def test_an_override_in_the_table_replaces_the_default_and_can_be_cleared(dynamodb) -> None:
    led = ledger(dynamodb, tpm=100, tpd=1000)
    assert led.set_budget("big", tokens_per_minute=5000) == usage.Budget(5000, 1000, "override")
    assert led.set_budget("big", tokens_per_day=0) == usage.Budget(5000, 0, "override")  # 0: no limit per day
    led.admit("big", "llm", 4000)
    with pytest.raises(errors.InvalidParameterError):
        led.admit("small", "llm", 4000)
    assert led.clear_budget("big") == usage.Budget(100, 1000)
    with pytest.raises(errors.InvalidParameterError):
        led.admit("big", "llm", 4000)


def test_an_override_is_cached_per_router_for_its_ttl(dynamodb) -> None:
    led = usage.Ledger(TABLE, usage.Budget(100, 0), client=dynamodb, override_ttl_s=60)
    assert led.budget("c").tokens_per_minute == 100
    usage.Ledger(TABLE, client=dynamodb).set_budget("c", tokens_per_minute=7)  # another process
    assert led.budget("c").tokens_per_minute == 100
    assert led.budget("c", fresh=True).tokens_per_minute == 7


def test_without_limits_or_table_nothing_is_reserved(dynamodb) -> None:
    r = ledger(dynamodb).admit("team-a", "llm", 300)
    assert r.windows == () and items(dynamodb) == {}
    r = usage.Ledger("", usage.Budget(10, 10)).admit("team-a", "llm", 300)  # no table: nothing enforced
    assert r.windows == () and r.settle(5) == -295


def test_negative_budgets_are_a_configuration_error() -> None:
    with pytest.raises(errors.ConfigurationError, match="0 for no limit"):
        usage.Ledger("t", usage.Budget(-1, 0))


# --- usage -----------------------------------------------------------------------------------------------------------


def test_record_adds_to_the_days_counter_per_model_version_and_tier(dynamodb, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TIERSERVE_METRICS", "true")
    led = ledger(dynamodb)
    led.record("team-a", "llm", "2", "cpu", 10, 5)
    led.record("team-a", "llm", "2", "cpu", 7, 3)
    led.record("team-a", "llm", "2", "gpu", 1, 1)
    rows = led.usage("team-a", "2027-01-01")
    assert [(r.tier, r.prompt_tokens, r.completion_tokens, r.requests) for r in rows] == [("cpu", 17, 8, 2),
                                                                                       ("gpu", 1, 1, 1)]
    assert rows[0].day == "2027-01-15" and led.usage(None, "2027-01-16") == []
    emf = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(d["caller"], d["CallerPromptTokens"], d["CallerCompletionTokens"]) for d in emf][:1] == [("team-a", 10, 5)]
    assert emf[0]["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["service", "caller"]]


def _events(n: int, served_by: str = "cpu", fail_after: int | None = None) -> Iterator[GenerationEvent]:
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise errors.InferenceError("the tier broke")
        last = i == n - 1
        yield GenerationEvent("x", (i,), finish_reason="length" if last else None,
                              usage=Usage(4, n) if last else None, served_by=served_by)


def test_metered_settles_with_the_final_usage_a_disconnect_or_an_error(dynamodb) -> None:
    led = ledger(dynamodb, tpm=1000)
    r = led.admit("team-a", "llm", 100, version="1")
    assert len(list(usage.metered(_events(6), r))) == 6
    assert led.window_tokens("team-a", usage.MINUTE) == 10  # 4 prompt + 6 completion
    # the client goes away after 2 events: charged 4 + 2
    r = led.admit("team-a", "llm", 100, version="1")
    stream = usage.metered(_events(6), r, prompt_tokens=4)
    next(stream), next(stream)
    stream.close()
    assert led.window_tokens("team-a", usage.MINUTE) == 16
    # an error mid-stream: charged what came out
    r = led.admit("team-a", "llm", 100, version="1")
    with pytest.raises(errors.InferenceError):
        list(usage.metered(_events(6, fail_after=3), r, prompt_tokens=4))
    assert led.window_tokens("team-a", usage.MINUTE) == 23
    # an error before the first event: charged nothing, nothing recorded
    r = led.admit("team-a", "llm", 100, version="1")
    with pytest.raises(errors.InferenceError):
        list(usage.metered(_events(6, fail_after=0), r, prompt_tokens=4))
    assert led.window_tokens("team-a", usage.MINUTE) == 23
    rows = led.usage("team-a")
    assert [(r.prompt_tokens, r.completion_tokens, r.requests) for r in rows] == [(12, 11, 3)]


class Upstream:
    """A generation's stream as the data plane has it: events, and ``close`` (its own release)."""

    def __init__(self, n: int) -> None:
        self._events = _events(n)
        self.closed = False

    def __iter__(self) -> Upstream:
        return self

    def __next__(self) -> GenerationEvent:
        return next(self._events)

    def close(self) -> None:
        self.closed = True

    fallback = "gpu-unavailable"


def _request(caller: str, prompt: int, max_tokens: int) -> Any:
    from tierserve.generation.requests import GenerationRequest, SamplingParams

    return GenerationRequest("llm", "1", "completion", SamplingParams(max_tokens=max_tokens),
                             prompt_ids=tuple(range(prompt)), caller=caller)


class Model:
    name, version = "llm", "1"


def test_run_metered_admits_before_starting_and_settles_at_the_end(dynamodb, monkeypatch) -> None:
    led = ledger(dynamodb, tpm=100)
    monkeypatch.setattr(usage, "ledger", lambda: led)
    started: list[Upstream] = []

    def start(n: int = 6) -> Upstream:
        started.append(Upstream(n))
        return started[-1]

    stream = usage.run_metered(_request("team-a", 4, 60), Model(), start)  # reserves 64
    assert led.window_tokens("team-a", usage.MINUTE) == 64
    assert stream.fallback == "gpu-unavailable"  # what the stream says of itself shows through
    assert len(list(stream)) == 6 and led.window_tokens("team-a", usage.MINUTE) == 10
    # over budget: a 429 and the generation never starts
    usage.run_metered(_request("team-a", 4, 60), Model(), start)
    with pytest.raises(errors.TooManyRequestsError):
        usage.run_metered(_request("team-a", 4, 60), Model(), start)
    assert len(started) == 2 and led.window_tokens("team-a", usage.MINUTE) == 74
    # closing the stream (the client went away) closes the generation and settles what came out
    stream = usage.run_metered(_request("team-b", 4, 60), Model(), start)
    next(stream)
    stream.close()
    assert started[-1].closed and led.window_tokens("team-b", usage.MINUTE) == 5

    # start raising: the reservation is given back whole
    def broken() -> Upstream:
        raise errors.BackendUnavailableError("no tier")

    with pytest.raises(errors.BackendUnavailableError):
        usage.run_metered(_request("team-c", 4, 60), Model(), broken)
    assert led.window_tokens("team-c", usage.MINUTE) == 0


def test_run_metered_without_a_table_is_the_generation_as_it_is(monkeypatch) -> None:
    monkeypatch.setattr(usage, "ledger", lambda: usage.Ledger("", usage.Budget(1, 1)))
    upstream = Upstream(3)
    assert usage.run_metered(_request("team-a", 4, 60), Model(), lambda: upstream) is upstream


def test_the_process_ledger_follows_the_settings(monkeypatch) -> None:
    from tierserve.settings import reset_settings

    monkeypatch.setenv("USAGE_TABLE", "t1")
    monkeypatch.setenv("TOKENS_PER_MINUTE", "123")
    monkeypatch.setenv("TOKENS_PER_DAY", "4567")
    reset_settings()
    usage.reset()
    try:
        led = usage.ledger()
        assert (led.table, led.default.tokens_per_minute, led.default.tokens_per_day) == ("t1", 123, 4567)
        assert usage.ledger() is led
    finally:
        monkeypatch.delenv("USAGE_TABLE")
        reset_settings()
        usage.reset()


# --- concurrent routers: 20 threads against moto_server over HTTP --------------------------------------------------


@pytest.fixture(scope="module")
def moto_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


def _http_client(url: str) -> Any:
    return boto3.client("dynamodb", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=__import__("botocore.config").config.Config(max_pool_connections=32))


def test_twenty_concurrent_callers_usage_adds_up_exactly(moto_http, monkeypatch) -> None:
    monkeypatch.setenv("TIERSERVE_METRICS", "false")
    table = "usage-concurrent"
    create_table(_http_client(moto_http), table)
    callers, rounds = 20, 5
    start = threading.Barrier(callers)

    def caller(i: int) -> tuple[int, int]:
        led = usage.Ledger(table, usage.Budget(1_000_000, 10_000_000), client=_http_client(moto_http), clock=Clock(T0))
        start.wait()
        sent = 0
        for k in range(rounds):
            # each thread is a router serving its own caller and, every round, the shared caller "team"
            for who in (f"c{i:02d}", "team"):
                r = led.admit(who, "llm", 500, version="1")
                prompt, completion = 3 + i % 5, 1 + (i + k) % 7
                r.finish(prompt, completion, "cpu" if k % 2 else "gpu")
                sent += prompt + completion
        return i, sent

    with ThreadPoolExecutor(callers) as pool:
        sent = dict(pool.map(caller, range(callers)))
    led = usage.Ledger(table, client=_http_client(moto_http), clock=Clock(T0))
    rows = led.usage()
    counted = {c: sum(r.total_tokens for r in rows if r.caller == c) for c in {r.caller for r in rows}}
    for i in range(callers):
        assert counted[f"c{i:02d}"] == sent[i] // 2
        assert led.window_tokens(f"c{i:02d}", usage.DAY) == sent[i] // 2  # reservations settled exactly
    expected_team = sum(sent.values()) // 2
    assert counted["team"] == expected_team and led.window_tokens("team", usage.DAY) == expected_team
    assert sum(r.requests for r in rows if r.caller == "team") == callers * rounds
    print(f"20 concurrent callers: expected {sum(sent.values())} tokens, counted {sum(counted.values())}")


def test_a_shared_budget_admits_exactly_what_fits_under_concurrency(moto_http, monkeypatch) -> None:
    monkeypatch.setenv("TIERSERVE_METRICS", "false")
    table = "usage-budget-race"
    create_table(_http_client(moto_http), table)
    start = threading.Barrier(20)

    def attempt(_: int) -> str:
        led = usage.Ledger(table, usage.Budget(1000, 0), client=_http_client(moto_http), clock=Clock(T0))
        start.wait()
        try:
            led.admit("hot", "llm", 100)
        except errors.TooManyRequestsError as exc:
            assert exc.retry_after_s == 30
            return "429"
        return "ok"

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(attempt, range(20)))
    led = usage.Ledger(table, client=_http_client(moto_http), clock=Clock(T0))
    assert outcomes.count("ok") == 10 and outcomes.count("429") == 10
    assert led.window_tokens("hot", usage.MINUTE) == 1000
    # the other caller is served while "hot" is refused
    cold = usage.Ledger(table, usage.Budget(1000, 0), client=_http_client(moto_http), clock=Clock(T0))
    cold.admit("cold", "llm", 100)


# --- through the streaming REST API, once DataPlane.generate calls usage.run_metered -----------------------------


def _rest_event(caller: str, body: dict) -> dict:
    path = "/v1/completions"
    return {"resource": path, "path": path, "httpMethod": "POST", "headers": {"content-type": "application/json"},
            "multiValueHeaders": {}, "queryStringParameters": None, "pathParameters": None,
            "requestContext": {"requestId": f"r-{caller}", "stage": "api", "path": f"/api{path}",
                               "authorizer": {"caller": caller, "key_id": "0123456789abcdef"}},
            "body": json.dumps(body), "isBase64Encoded": False}


def test_a_caller_over_budget_gets_429_with_retry_after_while_another_is_served(runtime_env, dynamodb, tmp_path,
                                                                                 monkeypatch) -> None:
    import inspect

    from tests.support.genai_models import export
    from tests.support.genai_serving import write_serving_store
    from tierserve import api
    from tierserve.app import build_runtime
    from tierserve.generation import engine
    from tierserve.protocol.dataplane import DataPlane
    from tierserve.protocol.http_api import decode_body
    from tierserve.settings import Settings, reset_settings

    if "run_metered" not in inspect.getsource(DataPlane.generate):
        pytest.skip("DataPlane.generate does not call usage.run_metered yet (issue 18: the hook R3's report gives)")
    monkeypatch.delenv("TIERSERVE_STREAMING_RUNTIME", raising=False)
    for var, value in (("USAGE_TABLE", TABLE), ("TOKENS_PER_MINUTE", "100"), ("TOKENS_PER_DAY", "0")):
        monkeypatch.setenv(var, value)
    reset_settings()
    usage.reset()
    root = write_serving_store(tmp_path / "store", export(tmp_path / "lm", "llama"))
    rt = build_runtime(Settings(model_store_uri=str(root), model_cache_dir=str(tmp_path / "cache"), ort_threads=1))
    body = {"model": "tiny", "prompt": "The with statement", "max_tokens": 60, "temperature": 0}
    try:
        used: list[dict[str, int]] = []
        for _ in range(10):  # each reserves its prompt + 60 of 100 tokens a minute; what it used stays charged
            answer = api.handle_rest(_rest_event("team-a", body), None, rt)
            if answer["statusCode"] != 200:
                break
            used.append(json.loads(decode_body(answer))["usage"])
        assert used and answer["statusCode"] == 429, decode_body(answer)
        assert 1 <= int(answer["headers"]["retry-after"]) <= 60
        assert json.loads(decode_body(answer))["error"]["code"] == "rate_limit_exceeded"
        assert api.handle_rest(_rest_event("team-b", body), None, rt)["statusCode"] == 200
        rows = usage.Ledger(TABLE, client=dynamodb).usage("team-a")
        assert [(r.prompt_tokens, r.completion_tokens, r.requests) for r in rows] == [
            (sum(u["prompt_tokens"] for u in used), sum(u["completion_tokens"] for u in used), len(used))]
    finally:
        engine.clear()
        usage.reset()
        monkeypatch.delenv("USAGE_TABLE")
        reset_settings()


def test_an_iam_principal_is_the_caller_on_both_apis() -> None:
    # Given events signed with SigV4 (no API key, no JWT): the HTTP API's and the REST API's shapes
    from tierserve.api import _caller

    arn = "arn:aws:sts::123456789012:assumed-role/app/alice"
    http_event = {"version": "2.0", "requestContext": {"authorizer": {"iam": {"userArn": arn}}}}
    rest_event = {"httpMethod": "POST", "requestContext": {"identity": {"userArn": arn}}}
    # Then the principal is the caller usage and budgets count against; an unsigned request has none
    assert _caller(http_event) == _caller(rest_event) == arn
    assert _caller({"requestContext": {}}) == ""
