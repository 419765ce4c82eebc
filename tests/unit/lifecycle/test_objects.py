"""The folder store's conditional writes: the same contract as S3's If-Match / If-None-Match."""

from __future__ import annotations

import hashlib
import threading

import pytest

from tierserve.errors import ConflictError, InvalidNameError
from tierserve.lifecycle.objects import FolderObjects, etag_of, open_objects


def test_if_match_writes_only_over_the_etag_that_was_read(tmp_path):
    # Given an object and its ETag
    store = FolderObjects(tmp_path)
    first = store.put("manifest.json", b"one")
    assert store.get("manifest.json") == (b"one", first) and first == etag_of(b"one")
    # When one writer replaces it with that ETag
    second = store.put("manifest.json", b"two", if_match=first)
    # Then a second writer holding the old ETag is refused, and the object is the first writer's
    with pytest.raises(ConflictError, match="changed since it was read"):
        store.put("manifest.json", b"three", if_match=first)
    assert store.get("manifest.json") == (b"two", second)


def test_if_none_match_creates_once_and_if_match_needs_an_object(tmp_path):
    store = FolderObjects(tmp_path)
    store.put("_history/m/1.json", b"a", if_none_match=True)
    with pytest.raises(ConflictError, match="already exists"):
        store.put("_history/m/1.json", b"b", if_none_match=True)
    with pytest.raises(ConflictError):
        store.put("missing.json", b"x", if_match=etag_of(b"x"))
    assert store.get("_history/m/1.json")[0] == b"a" and store.get("nope") is None


def test_racing_conditional_writers_have_exactly_one_winner(tmp_path):
    # Given 20 threads holding the same ETag
    store = FolderObjects(tmp_path)
    etag = store.put("k", b"0")
    barrier, wins = threading.Barrier(20), []

    def write(i: int) -> None:
        barrier.wait()
        try:
            store.put("k", f"w{i}".encode(), if_match=etag)  # never the same bytes: an ETag is a content hash
            wins.append(i)
        except ConflictError:
            pass

    threads = [threading.Thread(target=write, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then one write won, and the object is that writer's
    assert len(wins) == 1 and store.get("k")[0] == f"w{wins[0]}".encode()


def test_files_are_copied_with_their_sha256_and_listed(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    store = FolderObjects(tmp_path / "store")
    assert store.sha256("_objects/a/model.onnx") is None
    store.put_file("_objects/a/model.onnx", src, sha)
    assert store.sha256("_objects/a/model.onnx") == sha
    assert (tmp_path / "store" / "_objects" / "a" / "model.onnx").stat().st_nlink == 1  # a copy, not a link
    store.put("_history/m/2.json", b"{}")
    assert store.list("_history/m") == ["_history/m/2.json"]
    assert store.list("_nothing") == []


def test_keys_outside_the_store_are_refused(tmp_path):
    with pytest.raises(InvalidNameError):
        FolderObjects(tmp_path).put("../escape", b"x")


def test_open_objects_needs_a_uri():
    from tierserve.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="--store"):
        open_objects("")
    assert open_objects("s3://bucket-name/models").uri == "s3://bucket-name/models"
