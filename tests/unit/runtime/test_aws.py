"""aws.py: the process's one cache of boto3 clients, per service, per Config, per AWS environment.

No call reaches AWS: boto3 clients connect lazily, and only their configuration is looked at.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tierserve import aws


@pytest.fixture(autouse=True)
def region(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    aws.clear()
    yield
    aws.clear()


def test_a_client_is_built_once_per_service_and_config() -> None:
    # When the same service and Config are asked for twice, Then the client is reused
    s3 = aws.client("s3")
    assert aws.client("s3") is s3
    # And another service, or another Config, gets a client of its own, built with that Config
    assert aws.client("sqs") is not s3
    quick = aws.client("s3", read_timeout=1.0, retries={"total_max_attempts": 1, "mode": "standard"})
    assert quick is not s3 and quick.meta.config.read_timeout == 1.0
    assert aws.client("s3", retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=1.0) is quick
    assert hasattr(aws.resource("dynamodb"), "Table") and aws.resource("dynamodb") is aws.resource("dynamodb")


def test_a_client_built_for_one_endpoint_is_never_handed_out_for_another(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a client built while AWS_ENDPOINT_URL_S3 named one endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:5001")
    first = aws.client("s3")
    assert first.meta.endpoint_url == "http://127.0.0.1:5001"
    # When the environment names another (the local emulator, a test's moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:5002")
    # Then another client is built for it, and the first one still serves its own environment
    assert aws.client("s3").meta.endpoint_url == "http://127.0.0.1:5002"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:5001")
    assert aws.client("s3") is first


def test_clear_forgets_every_client() -> None:
    s3 = aws.client("s3")
    aws.clear()
    assert aws.client("s3") is not s3


def test_threads_asking_at_once_share_one_client() -> None:
    # Given 8 threads that ask for the same client at the same moment
    barrier = threading.Barrier(8)
    got: list[object] = []

    def ask() -> None:
        barrier.wait(5)
        got.append(aws.client("lambda", read_timeout=2.0))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # Then one client was built and every thread got it
    assert len(got) == 8 and all(c is got[0] for c in got)
