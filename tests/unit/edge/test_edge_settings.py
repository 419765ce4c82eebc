"""EdgeSettings: flags over environment variables, and a clear error naming both."""

from __future__ import annotations

import pytest

from tierserve.edge.settings import EdgeSettings, parse_edge_settings
from tierserve.errors import ConfigurationError


def test_a_flag_wins_over_its_variable_and_defaults_fill_the_rest() -> None:
    env = {"EDGE_PORT": "9000", "EDGE_SYNC_INTERVAL_S": "5", "EDGE_MODELS": "digits, minilm"}
    s = parse_edge_settings({"port": "9100", "models": None}, env)
    assert (s.port, s.sync_interval_s, s.models) == (9100, 5.0, ("digits", "minilm"))
    assert s.grpc_port == EdgeSettings().grpc_port and s.concurrency >= 1 and 1 <= s.intra_op_threads <= 4


@pytest.mark.parametrize(("flags", "env", "match"), [
    ({"port": "eighty"}, {}, r"--port \(EDGE_PORT\) = 'eighty' is invalid"),
    ({}, {"EDGE_SYNC_INTERVAL_S": "0"}, r"--sync-interval \(EDGE_SYNC_INTERVAL_S\) = '0' must be positive"),
    ({"cloud_auth": "password"}, {}, r"--cloud-auth .* expected one of none, iam, jwt"),
    ({"models": "ok,../etc"}, {}, r"--models \(EDGE_MODELS\) .* invalid model name"),
    ({"cloud_url": "gateway:443"}, {}, r"must start with http"),
    ({"cloud_url": "https://gw", "cloud_auth": "jwt"}, {}, r"--cloud-token-file"),
    ({"max_rows": "-1"}, {}, r"--max-rows \(EDGE_MAX_ROWS\) = '-1' must be 0 or more"),
])
def test_a_bad_value_names_the_flag_and_its_variable(flags, env, match) -> None:
    with pytest.raises(ConfigurationError, match=match):
        parse_edge_settings(flags, env)


def test_the_edge_parses_choices_and_booleans_with_the_clouds_parsers() -> None:
    # One definition each: a device and the cloud accept and refuse the same spellings
    import tierserve.settings as cloud
    from tierserve.edge import settings as edge

    assert (edge.choice, edge.boolean) == (cloud.choice, cloud.boolean)
    assert parse_edge_settings({"log_requests": "ON", "log_level": "debug"}, {}).log_requests is True
    with pytest.raises(ConfigurationError, match=r"--log-requests \(EDGE_LOG_REQUESTS\) = 'maybe' is invalid: "
                                                 r"expected true or false"):
        parse_edge_settings({"log_requests": "maybe"}, {})
