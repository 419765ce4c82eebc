"""CPU memory classes: which class a model lands in, and which function the router invokes for it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tests.support.fakes import FakeLambdaClient, json_call, model_version
from tierserve.backends.lambda_invoke import LambdaInvokeBackend
from tierserve.errors import BackendUnavailableError, ConfigurationError
from tierserve.memory_classes import CLASSES_MB, class_for, function_for, parse_functions
from tierserve.settings import parse_settings

FUNCTIONS = {1769: "cpu-1769", 3538: "cpu-3538", 10240: "cpu-10240"}


def _model(memory_mb=None):
    mv = model_version("m", ("cpu",))
    return replace(mv, cpu={"memory_mb": memory_mb, "threads": 1} if memory_mb else {})


@pytest.mark.parametrize(("memory", "cls"), [(None, 1769), (512, 1769), (1769, 1769), (1770, 3538), (3538, 3538),
                                             (5000, 5307), (7076, 10240), (10240, 10240)])
def test_a_recommendation_lands_in_the_smallest_class_that_holds_it(memory, cls):
    assert class_for(memory) == cls


def test_more_than_the_largest_class_is_refused():
    with pytest.raises(ValueError, match="largest CPU class"):
        class_for(10241)


@pytest.mark.parametrize(("memory", "function"), [(1769, "cpu-1769"), (2500, "cpu-3538"), (3538, "cpu-3538"),
                                                  (5307, "cpu-10240"), (8845, "cpu-10240")])
def test_the_router_picks_the_smallest_deployed_class_that_holds_the_model(memory, function):
    # 5,307 MB is not deployed here: its models go to the next deployed class up, never down
    assert function_for(_model(memory), FUNCTIONS) == function


def test_a_class_above_every_deployed_one_says_what_to_do():
    with pytest.raises(BackendUnavailableError, match="tierserve deploy-config"):
        function_for(_model(5307), {1769: "cpu-1769", 3538: "cpu-3538"})


def test_cpu_functions_setting_is_parsed_and_checked():
    assert parse_functions("1769=a, 3538=b,") == {1769: "a", 3538: "b"}
    for bad in ("1769", "2048=a", "x=a", "1769="):
        with pytest.raises(ConfigurationError, match="CLASS=FUNCTION_NAME"):
            parse_functions(bad)
    with pytest.raises(ConfigurationError, match="CPU_FUNCTIONS"):
        parse_settings({"CPU_FUNCTIONS": "4096=a"})
    assert set(CLASSES_MB) == {1769, 3538, 5307, 10240}


def test_the_router_invokes_the_models_class_function():
    # Given the router's Lambda backend with three classes deployed
    client = FakeLambdaClient(reply={"statusCode": 200, "headers": {}, "body": "{}", "isBase64Encoded": False})
    backend = LambdaInvokeBackend("cpu-1769", client=client, functions=FUNCTIONS)
    # When a 1,769 MB model and a 3,538 MB model are invoked
    backend.infer(_model(1769), json_call(1), timeout_s=5)
    backend.infer(_model(3538), json_call(1), timeout_s=5)
    # Then each went to its own class's function, with the same payload format
    assert [i["FunctionName"] for i in client.invocations] == ["cpu-1769", "cpu-3538"]
    assert all(json.loads(i["Payload"])["model_name"] == "m" for i in client.invocations)
    # And without CPU_FUNCTIONS every model goes to CPU_FUNCTION_NAME, as before classes
    single = LambdaInvokeBackend("cpu-only", client=FakeLambdaClient(reply={"statusCode": 200, "body": "{}"}))
    single.infer(_model(10240), json_call(1), timeout_s=5)
    assert single._client.invocations[0]["FunctionName"] == "cpu-only"
