"""Lifecycle changes against a real moto_server over HTTP: S3 conditional writes, and 20 writers at once."""

from __future__ import annotations

import boto3
import botocore.exceptions
import pytest

from tests.support.lifecycle import check_history_agrees, concurrent_writers, version
from tests.support.moto_server import running_moto_server
from tierserve.errors import ConflictError
from tierserve.lifecycle.objects import S3Objects
from tierserve.lifecycle.registry import Registry

pytestmark = pytest.mark.integration
BUCKET = "tierserve-lifecycle-test"


@pytest.fixture(scope="module")
def moto_url():
    with running_moto_server() as url:
        yield url


def s3(url: str):
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


@pytest.fixture
def bucket(moto_url, request):
    name = f"{BUCKET}-{request.node.name.replace('_', '-')[:30].lower().rstrip('-')}"
    s3(moto_url).create_bucket(Bucket=name)
    return name


def test_moto_server_honours_if_match_and_if_none_match_on_put_object(moto_url, bucket):
    # Given an object written once
    client = s3(moto_url)
    etag = client.put_object(Bucket=bucket, Key="m.json", Body=b"1", IfNoneMatch="*")["ETag"]
    # When it is created again, or overwritten with a stale ETag, Then S3 answers 412 PreconditionFailed
    for kwargs in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123456789abcdef0123456789abcdef"'}):
        with pytest.raises(botocore.exceptions.ClientError) as err:
            client.put_object(Bucket=bucket, Key="m.json", Body=b"2", **kwargs)
        assert err.value.response["Error"]["Code"] == "PreconditionFailed"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    # And the current ETag is accepted
    client.put_object(Bucket=bucket, Key="m.json", Body=b"3", IfMatch=etag)
    assert client.get_object(Bucket=bucket, Key="m.json")["Body"].read() == b"3"


def test_s3_objects_turn_412_into_a_conflict(moto_url, bucket):
    store = S3Objects(f"s3://{bucket}/models", s3(moto_url))
    etag = store.put("manifest.json", b"a", if_none_match=True)
    store.put("manifest.json", b"b", if_match=etag)
    with pytest.raises(ConflictError):
        store.put("manifest.json", b"c", if_match=etag)
    with pytest.raises(ConflictError):
        store.put("manifest.json", b"c", if_none_match=True)
    assert store.get("manifest.json")[0] == b"b" and store.list("") == ["manifest.json"]


def test_every_change_against_s3(moto_url, bucket):
    reg = Registry(S3Objects(f"s3://{bucket}/models", s3(moto_url)), actor="ci")
    for v in ("1", "2", "3"):
        reg.publish(version("m", v))
    reg.canary("m", "2", 10)
    reg.promote("m", "2")
    reg.rollback("m")
    reg.rollback("m", to="3")
    reg.retire("m", "1")
    entry = reg.entry("m")
    assert (entry.default_version, entry.canary, sorted(entry.listed())) == ("3", None, ["2", "3"])
    assert [h["action"] for h in reg.history("m")] == ["publish"] * 3 + ["canary", "promote", "rollback", "rollback",
                                                                         "retire"]
    assert s3(moto_url).head_object(Bucket=bucket, Key="models/_history/m/0000000008.json")


def test_twenty_concurrent_writers_against_moto_server_lose_no_update(moto_url, bucket):
    # Given 20 writers, each with its own S3 client and Registry, on one bucket of a real moto_server
    clients = [s3(moto_url) for _ in range(21)]
    outcome = concurrent_writers(lambda i: Registry(S3Objects(f"s3://{bucket}/models", clients[i]), actor=f"w{i}"))
    # Then the history agrees with the final manifest: gap-free, each change from the last one's state
    check_history_agrees(outcome)
    print(f"\nconcurrent writers: {len(outcome['done'])} changed, {len(outcome['refused'])} refused "
          f"(the version was already the default by then), {outcome['attempts']} conditional writes for them "
          f"({outcome['attempts'] - len(outcome['done'])} lost a race and retried); final {outcome['state']}")
