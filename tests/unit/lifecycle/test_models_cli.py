"""`tierserve models` against a folder store: every command, as a user types it."""

from __future__ import annotations

import json

import pytest

from tests.support.lifecycle import compiled
from tierserve.store import ModelStore
from tierserve_tools.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["models", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def build(tmp_path):
    """The compiler's folder with m v1 and m v2 (other weights)."""
    root = tmp_path / "build"
    compiled(root, "m", "1", seed=1)
    compiled(root, "m", "2", seed=2)
    return root


def test_every_command_against_a_folder(build, tmp_path, capsys):
    store = str(tmp_path / "store")
    s = ("--store", store, "--by", "alice")
    # publish v1: uploaded content-addressed, and the default (the model's first version)
    code, out, _ = run(capsys, *s, "publish", str(build / "m" / "1"), "--why", "first")
    assert code == 0 and "uploaded 1 object(s), 0 already there" in out and "default v1" in out
    # publish v2 with a canary
    code, out, _ = run(capsys, *s, "publish", str(build / "m" / "2"), "--canary", "10")
    assert code == 0 and "canary v2 at 10%" in out
    # list and show: default, canary with percent, targets, size, variants, when and who
    code, out, _ = run(capsys, *s, "list")
    lines = [line.split() for line in out.splitlines()]
    assert lines[0][:5] == ["MODEL", "VERSION", "SERVES", "TARGETS", "SIZE"]
    assert lines[1][:4] == ["m", "1", "default", "(90%)"] and "alice" in lines[1]
    assert lines[2][:4] == ["m", "2", "canary", "10%"] and "fp32*" in lines[2]
    code, out, _ = run(capsys, *s, "show", "m")
    assert code == 0 and out.startswith("m: default v1, canary v2 at 10%") and "inputs x FP32 [-1, 4]" in out
    # canary, promote, rollback (drops nothing: no canary -> previous default), rollback --to, retire
    assert run(capsys, *s, "canary", "m", "2", "--percent", "50")[0] == 0
    assert "default v2" in run(capsys, *s, "promote", "m", "2", "--why", "looks good")[1]
    assert "default v1" in run(capsys, *s, "rollback", "m", "--why", "p99 regressed")[1]
    assert "default v2" in run(capsys, *s, "rollback", "m", "--to", "2")[1]
    code, out, _ = run(capsys, *s, "retire", "m", "1", "--why", "superseded")
    assert code == 0 and "retire" in out
    # history: who, when, from, to, why, in order
    code, out, _ = run(capsys, *s, "history", "m")
    rows = out.splitlines()
    assert [r.split()[3].rstrip(":") for r in rows] == ["publish", "publish", "canary", "promote", "rollback",
                                                        "rollback", "retire"]
    assert "why: looks good" in rows[3] and "alice" in rows[3]
    assert "default v1, canary v2 at 50% -> default v2" in rows[3]
    code, out, _ = run(capsys, *s, "history", "m", "--json")
    assert [json.loads(line)["revision"] for line in out.splitlines()] == list(range(1, 8))
    # and the store serves what the manifest says: v2, fetched and verified from its content address
    served = ModelStore(store, tmp_path / "cache")
    mv = served.manifest().resolve("m")
    assert mv.version == "2" and mv.cpu_artifact.path.startswith("_objects/")
    assert served.fetch(mv.cpu_artifact).is_file()


def test_republishing_uploads_nothing_and_other_content_is_refused(build, tmp_path, capsys):
    store = str(tmp_path / "store")
    run(capsys, "--store", store, "publish", str(build / "m" / "1"))
    code, out, _ = run(capsys, "--store", store, "publish", str(build / "m" / "1"))
    assert code == 0 and "uploaded 0 object(s), 1 already there" in out and "nothing to change" in out
    # Given another build whose v1 has other weights
    other = tmp_path / "other"
    compiled(other, "m", "1", seed=9)
    code, _, err = run(capsys, "--store", store, "publish", str(other / "m" / "1"))
    assert code == 2 and "already published" in err and "different content" in err


def test_refusals_are_clear_errors(build, tmp_path, capsys):
    store = str(tmp_path / "store")
    run(capsys, "--store", store, "publish", str(build / "m" / "1"))
    for args, message in [(("promote", "m", "7"), "no published version 7"),
                          (("retire", "m", "1"), "is the default"),
                          (("show", "nope"), "no model 'nope'"),
                          (("publish", str(tmp_path)), "is not a compiled version")]:
        code, _, err = run(capsys, "--store", store, *args)
        assert code == 2 and message in err, err


def test_publishing_into_the_compilers_own_folder_copies_nothing(build, capsys):
    code, out, _ = run(capsys, "--store", str(build), "publish", str(build / "m" / "2"), "--promote")
    assert code == 0 and "already in place" in out and "default v2" in out
    assert not (build / "_objects").exists()


def test_list_and_show_json_are_machine_readable_with_stable_keys(build, tmp_path, capsys):
    store = str(tmp_path / "store")
    run(capsys, "--store", store, "--by", "alice", "publish", str(build / "m" / "1"))
    run(capsys, "--store", store, "publish", str(build / "m" / "2"), "--canary", "10")
    # When the models are listed as JSON
    code, out, _ = run(capsys, "--store", store, "list", "--json")
    doc = json.loads(out)
    # Then one document, with the same keys for every version, whatever its state
    assert code == 0 and set(doc) == {"models", "invalid"} and doc["invalid"] == []
    [model] = doc["models"]
    assert model["name"] == "m" and model["default_version"] == "1"
    assert model["canary"] == {"version": "2", "percent": 10.0}
    v1, v2 = model["versions"]
    assert set(v1) == set(v2) == {"version", "serves", "targets", "size_bytes", "variants", "cpu_variant",
                                  "published_at", "published_by", "retired_at"}
    assert (v1["version"], v1["serves"], v1["published_by"], v2["serves"]) == ("1", "default", "alice", "canary")
    assert isinstance(v1["size_bytes"], int) and v2["cpu_variant"] in v2["variants"]
    # And `show --json`: the same, with each version's signature and artifacts
    code, out, _ = run(capsys, "--store", store, "show", "m", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["name"] == "m" and isinstance(shown["manifest_revision"], int)
    assert {"previous_default", "canary", "default_version"} <= set(shown)
    detail = shown["versions"][0]
    assert detail["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert {"outputs", "max_batch_size", "created_at", "artifacts"} <= set(detail)
    assert all(set(a) == {"size_bytes", "sha256"} for a in detail["artifacts"].values())
