"""Lifecycle changes on a folder store: each one atomic, refused when it makes no sense, and recorded."""

from __future__ import annotations

import json

import pytest

from tests.support.lifecycle import check_history_agrees, concurrent_writers, version
from tierserve.errors import LifecycleError, ModelNotFoundError
from tierserve.lifecycle.objects import FolderObjects
from tierserve.lifecycle.registry import Registry, history_key
from tierserve.manifest import RETIRE_GRACE_S, Manifest, TensorSpec


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(FolderObjects(tmp_path / "store"), actor="alice@test")


def test_the_first_publish_is_the_default_and_a_later_one_changes_nothing_served(reg):
    # Given v1 published
    first = reg.publish(version("m", "1"), why="first")
    # When v2 is published without --promote or --canary
    second = reg.publish(version("m", "2"))
    # Then v1 is still the default, v2 is listed, and both changes are in the history with who and why
    entry = reg.entry("m")
    assert entry.default_version == "1" and entry.canary is None and sorted(entry.listed()) == ["1", "2"]
    assert entry.versions["2"].published_by == "alice@test" and entry.versions["2"].published_at.endswith("Z")
    assert first["from"] is None and first["to"] == {"default": "1", "canary": None, "listed": ["1"]}
    assert second["to"] == {"default": "1", "canary": None, "listed": ["1", "2"]}
    assert [h["action"] for h in reg.history("m")] == ["publish", "publish"]
    assert reg.history("m")[0]["why"] == "first" and reg.history("m")[0]["by"] == "alice@test"


def test_publish_with_promote_or_canary_changes_what_is_served(reg):
    reg.publish(version("m", "1"))
    reg.publish(version("m", "2"), canary=10)
    assert reg.entry("m").canary == {"version": "2", "percent": 10}
    reg.publish(version("m", "3"), promote=True)
    entry = reg.entry("m")
    assert entry.default_version == "3" and entry.previous_default == "1" and entry.canary == {"version": "2",
                                                                                               "percent": 10}


def test_the_same_content_again_is_a_noop_and_other_content_is_refused(reg):
    reg.publish(version("m", "1"))
    again = reg.publish(version("m", "1"))
    assert again["noop"] is True and len(reg.history("m")) == 1
    with pytest.raises(LifecycleError, match="different content; versions are immutable"):
        reg.publish(version("m", "1", content="other"))


def test_canary_promote_rollback_and_retire(reg):
    for v in ("1", "2", "3"):
        reg.publish(version("m", v))
    reg.canary("m", "2", 25, why="try v2")
    assert reg.entry("m").canary == {"version": "2", "percent": 25}
    # promoting the canary makes it the default and ends the canary
    reg.promote("m", "2", why="good")
    e = reg.entry("m")
    assert (e.default_version, e.canary, e.previous_default) == ("2", None, "1")
    # rollback without a canary returns to the previous default
    reg.rollback("m", why="bad after all")
    assert reg.entry("m").default_version == "1"
    # rollback with a canary drops the canary only
    reg.canary("m", "3", 5)
    reg.rollback("m")
    e = reg.entry("m")
    assert (e.default_version, e.canary) == ("1", None)
    # rollback --to names the version
    reg.rollback("m", to="3")
    assert reg.entry("m").default_version == "3"
    # retire: refused for the default and the canary, accepted otherwise; a tombstone stays
    reg.canary("m", "2", 5)
    with pytest.raises(LifecycleError, match="is the default"):
        reg.retire("m", "3")
    with pytest.raises(LifecycleError, match="is the canary"):
        reg.retire("m", "2")
    reg.retire("m", "1", why="old")
    e = reg.entry("m")
    assert sorted(e.listed()) == ["2", "3"] and e.versions["1"].retired_at
    actions = [h["action"] for h in reg.history("m")]
    assert actions == ["publish"] * 3 + ["canary", "promote", "rollback", "canary", "rollback", "rollback", "canary",
                                         "retire"]


@pytest.mark.parametrize(("op", "message"), [
    (lambda r: r.canary("m", "1", 10), "already the default"),
    (lambda r: r.canary("m", "9", 10), "no published version 9"),
    (lambda r: r.canary("m", "2", 0), "percent must be in"),
    (lambda r: r.promote("m", "1"), "already the default"),
    (lambda r: r.rollback("m"), "no canary and no previous default"),
    (lambda r: r.retire("m", "1"), "is the default"),
])
def test_changes_that_make_no_sense_are_refused_with_what_to_do(reg, op, message):
    reg.publish(version("m", "1"))
    reg.publish(version("m", "2"))
    before = reg.read()
    with pytest.raises(LifecycleError, match=message):
        op(reg)
    assert reg.read() == before  # nothing was written


def test_an_unknown_model_is_a_clear_error(reg):
    with pytest.raises(ModelNotFoundError, match="publish it first"):
        reg.promote("nope", "1")


def test_retired_versions_and_a_retired_publish(reg):
    reg.publish(version("m", "1"))
    reg.publish(version("m", "2"), promote=True)
    reg.retire("m", "1")
    with pytest.raises(LifecycleError, match="was retired"):
        reg.publish(version("m", "1"))
    with pytest.raises(LifecycleError, match="no published version 1"):
        reg.canary("m", "1", 5)


def test_a_retired_version_answers_pinned_requests_only_within_the_grace(reg, monkeypatch):
    # Given v1 retired just now
    reg.publish(version("m", "1"))
    reg.publish(version("m", "2"), promote=True)
    reg.retire("m", "1")
    manifest = reg.manifest()
    # Then a request pinned to it still resolves (a stale router may send it), but not after the grace
    assert manifest.resolve("m", "1").version == "1"
    import time as time_module

    real = time_module.time
    monkeypatch.setattr("tierserve.manifest.time.time", lambda: real() + RETIRE_GRACE_S + 1)
    with pytest.raises(ModelNotFoundError, match="versions: 2"):
        manifest.resolve("m", "1")


def test_gpu_versions_with_another_signature_are_refused_while_both_would_be_listed(reg):
    reg.publish(version("g", "1", targets=("gpu",), max_batch_size=8))
    other = version("g", "2", targets=("gpu",), inputs=(TensorSpec("x", "FP32", (-1, 8)),), max_batch_size=8)
    with pytest.raises(LifecycleError, match="one Triton config"):
        reg.publish(other)
    # the same signature is fine
    reg.publish(version("g", "3", targets=("gpu",), max_batch_size=8))


def test_a_writer_that_died_after_its_commit_leaves_its_record_in_the_manifest(reg, tmp_path):
    # Given a change committed whose history object was never written (the writer died in between)
    reg.publish(version("m", "1"))
    record = reg.publish(version("m", "2"), canary=10)
    (tmp_path / "store" / history_key("m", record["revision"])).unlink()
    # Then the history still shows it (from the manifest), and the next change writes it back
    assert [h["revision"] for h in reg.history("m")] == [1, 2]
    reg.promote("m", "2")
    assert json.loads((tmp_path / "store" / history_key("m", 2)).read_text()) == record


def test_the_compiler_keeps_revision_and_change_when_it_adds_a_version(reg, tmp_path):
    reg.publish(version("m", "1"))
    manifest = Manifest.loads((tmp_path / "store" / "manifest.json").read_text())
    again = Manifest.loads(manifest.with_version(version("m", "2"), make_default=False).dumps())
    assert again.revision == 1 and again.change == manifest.change and again.models["m"].default_version == "1"


def test_twenty_concurrent_writers_lose_no_update(tmp_path):
    # Given 20 writers, each with its own Registry on the same folder store
    outcome = concurrent_writers(lambda i: Registry(FolderObjects(tmp_path / "store"), actor=f"writer-{i}"))
    # Then the history agrees with the final manifest, change by change
    check_history_agrees(outcome)
    assert outcome["done"], "some writers must have succeeded"
