"""The manifest: schema, allowlists (names, versions, paths; no trailing newline), per-model isolation
of bad entries, and the external-data records (issue 8, defects 6 and 7)."""

from __future__ import annotations

import json

import pytest

from tierserve import errors
from tierserve.manifest import Manifest, check_artifact_path, check_model_name, check_version


def _manifest(**overrides) -> dict:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
            "variants": {"fp32": {"path": "m/1/model.onnx", "sha256": "a" * 64, "size_bytes": 10}},
            "selected_variant": "fp32", "targets": ["cpu"]}
    body.update(overrides)
    return {"schema_version": 1, "models": {"m": {"default_version": "1", "versions": {"1": body}}}}


def test_manifest_round_trips_and_resolves_default_version():
    m = Manifest.from_json(_manifest())
    assert Manifest.loads(m.dumps()).to_json() == m.to_json()
    assert m.resolve("m").version == "1"


@pytest.mark.parametrize("bad", [
    {"variants": {"fp32": {"path": "../../etc/passwd", "sha256": "a" * 64, "size_bytes": 1}}},
    {"variants": {"fp32": {"path": "m/1/model.onnx", "sha256": "nothex", "size_bytes": 1}}},
    {"selected_variant": "int8_dynamic"},
    {"targets": ["tpu"]},
    {"allow_non_finite": "yes"},
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4], "dim_names": ["batch"]}]},
    {"inputs": [{"name": "x", "datatype": "INT64", "shape": [-1, 4], "value_range": [5, 1]}]},
    {"inputs": [{"name": "x", "datatype": "INT64", "shape": [-1, 4], "value_range": ["0", 1]}]},
])
def test_manifest_refuses_unsafe_or_inconsistent_entries(bad):
    with pytest.raises(errors.ManifestError):
        Manifest.from_json(_manifest(**bad)).resolve("m")


def test_unknown_model_and_version_are_not_found_with_the_alternatives():
    m = Manifest.from_json(_manifest())
    with pytest.raises(errors.ModelNotFoundError, match="models served here: m"):
        m.resolve("other")
    with pytest.raises(errors.ModelNotFoundError, match="versions: 1"):
        m.resolve("m", "2")


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 65, "-lead", "a b"])
def test_model_names_outside_the_allowlist_are_refused(name):
    with pytest.raises(errors.InvalidNameError):
        check_model_name(name)


@pytest.mark.parametrize("version", ["0", "01", "v1", "1.0", "../1"])
def test_versions_must_be_positive_integers(version):
    with pytest.raises(errors.InvalidNameError):
        check_version(version)


@pytest.mark.parametrize(("check", "value"), [
    (check_model_name, "nl\n"), (check_version, "1\n"), (check_artifact_path, "m/1/model.onnx\n"),
    (check_model_name, "ok\n\n"), (check_artifact_path, "m/1/model.onnx\nx"),
])
def test_a_trailing_newline_is_never_accepted(check, value):
    with pytest.raises((errors.InvalidNameError, errors.ManifestError)):
        check(value)


def test_one_bad_entry_takes_down_only_that_model():
    # Given a manifest with a good model, a model whose variant has a bad sha256, and a name with a newline
    raw = _manifest()
    good = raw["models"]["m"]
    raw["models"]["bad"] = json.loads(json.dumps(good).replace("m/1/", "bad/1/").replace("a" * 64, "nothex"))
    raw["models"]["nl\n"] = json.loads(json.dumps(good).replace("m/1/", "nl/1/"))
    # When it is loaded
    m = Manifest.from_json(raw)
    # Then the good model still resolves
    assert m.resolve("m").version == "1"
    # And the bad one answers a clear manifest error naming itself and the problem
    with pytest.raises(errors.ManifestError, match=r"model 'bad' cannot be served.*invalid sha256.*recompile"):
        m.resolve("bad")
    # And the one with an invalid name cannot even be asked for, and takes nothing else down
    with pytest.raises(errors.InvalidNameError):
        m.resolve("nl\n")
    assert set(m.models) == {"m"} and set(m.broken) == {"bad", "nl\n"}
    # And writing the manifest back (the compiler adds a model) keeps the bad entries as they were
    assert Manifest.loads(m.dumps()).to_json()["models"]["bad"] == raw["models"]["bad"]


def test_external_data_records_round_trip_and_are_optional():
    # Given a variant with one external-data file, and one without the field (older manifests)
    ext = [{"path": "m/1/weights.bin", "sha256": "b" * 64, "size_bytes": 48}]
    with_ext = _manifest(variants={"fp32": {"path": "m/1/model.onnx", "sha256": "a" * 64, "size_bytes": 10,
                                            "external_data": ext}})
    # When loaded and written back
    m = Manifest.from_json(with_ext)
    v = m.resolve("m").cpu_artifact
    # Then the record survives, and a variant without it has none and writes none
    assert [(e.path, e.sha256, e.size_bytes) for e in v.external_data] == [("m/1/weights.bin", "b" * 64, 48)]
    assert Manifest.loads(m.dumps()).to_json() == m.to_json()
    plain = Manifest.from_json(_manifest())
    assert plain.resolve("m").cpu_artifact.external_data == ()
    assert "external_data" not in plain.to_json()["models"]["m"]["versions"]["1"]["variants"]["fp32"]


@pytest.mark.parametrize("ext", [
    {"path": "other/1/weights.bin", "sha256": "b" * 64, "size_bytes": 1},   # outside the variant's folder
    {"path": "m/1/../../w.bin", "sha256": "b" * 64, "size_bytes": 1},
    {"path": "m/1/weights.bin", "sha256": "B" * 64, "size_bytes": 1},
    {"path": "m/1/weights.bin", "sha256": "b" * 64},
])
def test_bad_external_data_records_take_down_their_model(ext):
    raw = _manifest(variants={"fp32": {"path": "m/1/model.onnx", "sha256": "a" * 64, "size_bytes": 10,
                                       "external_data": [ext]}})
    with pytest.raises(errors.ManifestError, match="model 'm' cannot be served"):
        Manifest.from_json(raw).resolve("m")


# --- the edge: a target beside the cloud's, and the variant a device serves -------------------------------


def test_the_edge_variant_round_trips_and_defaults_to_the_cpu_tiers():
    int8 = {"path": "m/1/int8.onnx", "sha256": "b" * 64, "size_bytes": 5}
    fp32 = {"path": "m/1/model.onnx", "sha256": "a" * 64, "size_bytes": 10}
    m = Manifest.from_json(_manifest(variants={"fp32": fp32, "int8": int8}, targets=["edge", "cpu"],
                                     edge_variant="int8"))
    mv = m.resolve("m")
    assert mv.serves_edge and mv.cloud_targets == ("cpu",) and mv.edge_artifact.path == "m/1/int8.onnx"
    assert Manifest.loads(m.dumps()).resolve("m").edge_variant == "int8"
    plain = Manifest.from_json(_manifest(targets=["edge", "cpu"])).resolve("m")
    assert plain.edge_artifact == plain.cpu_artifact and "edge_variant" not in plain.to_json()


@pytest.mark.parametrize(("bad", "reason"), [
    ({"targets": ["edge", "cpu"], "edge_variant": "int8"}, "edge variant 'int8' is not listed"),
    ({"targets": ["edge"]}, "name no cloud tier"),
])
def test_an_edge_entry_without_its_variant_or_without_a_cloud_tier_is_refused(bad, reason):
    with pytest.raises(errors.ManifestError, match=reason):
        Manifest.from_json(_manifest(**bad)).resolve("m")


def test_input_checks_and_the_non_finite_policy_round_trip_and_default_off():
    # Given an entry whose input names its dims and bounds its values, and one that says nothing
    checked = _manifest(allow_non_finite=True, inputs=[
        {"name": "x", "datatype": "INT64", "shape": [-1, -1], "dim_names": ["batch", "seq"], "value_range": [0, 9]}])
    plain = Manifest.from_json(_manifest()).resolve("m")
    mv = Manifest.from_json(checked).resolve("m")
    # Then the checks are read, written back as they were, and absent ones stay absent (NaN refused by default)
    assert (mv.inputs[0].dim_names, mv.inputs[0].value_range, mv.allow_non_finite) == (("batch", "seq"), (0, 9), True)
    assert Manifest.from_json(checked).to_json()["models"]["m"]["versions"]["1"]["inputs"] == checked["models"]["m"][
        "versions"]["1"]["inputs"]
    assert (plain.inputs[0].dim_names, plain.inputs[0].value_range, plain.allow_non_finite) == ((), None, False)
    assert "allow_non_finite" not in Manifest.from_json(_manifest()).to_json()["models"]["m"]["versions"]["1"]


def _generative(**generation) -> dict:
    files = ["model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"]
    version = {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}],
        "variants": {"int4": {"path": "lm/1/int4/model.onnx", "sha256": "a" * 64, "size_bytes": 1,
                              "external_data": [{"path": f"lm/1/int4/{f}", "sha256": "b" * 64, "size_bytes": 1}
                                                for f in files]}},
        "selected_variant": "int4", "targets": ["cpu"], "task": "text-generation",
        "generation": {"context_length": 1024, "eos_token_ids": [2], "chat_template": True, **generation},
    }
    return {"schema_version": 1, "models": {"lm": {"default_version": "1", "versions": {"1": version}}}}


def test_a_generation_entry_round_trips_with_its_tier_figures():
    doc = _generative(tiers={"cpu": {"ttft_ms": {"16": 10.0, "128": 40.0, "512": 160.0}, "tokens_per_s": 80.0,
                                     "source": "measured"}})
    mv = Manifest.from_json(doc).resolve("lm", None)
    assert mv.generative and mv.generation is not None
    g = mv.generation
    assert (g.context_length, g.eos_token_ids, g.chat_template) == (1024, (2,), True)
    cpu = mv.generation.tiers["cpu"]
    assert (cpu.ttft_at(16), cpu.ttft_at(72), cpu.ttft_at(1024)) == (10.0, 25.0, 320.0)
    assert Manifest.from_json(json.loads(json.dumps(Manifest.from_json(doc).to_json()))).resolve("lm", None) == mv


def test_a_generation_entrys_slos_and_token_calibration_round_trip_and_are_checked():
    # issue 18: what token-aware routing and the prompt-token estimate read; absent ones stay absent
    extra = {"slo_ttft_ms": 800.0, "slo_tokens_per_s": 20.0, "slo_total_ms": 30000.0, "chars_per_token": 3.9,
             "tokens_per_nonascii_byte": 0.4, "token_estimate_error": 0.12}
    doc = _generative(**extra)
    g = Manifest.from_json(doc).resolve("lm", None).generation
    assert g is not None and {k: getattr(g, k) for k in extra} == extra
    assert {k: v for k, v in g.to_json().items() if k in extra} == extra
    assert not set(extra) & set(Manifest.from_json(_generative()).resolve("lm", None).generation.to_json())
    for bad in ({"slo_ttft_ms": 0}, {"chars_per_token": -1.0}, {"slo_total_ms": "fast"}):
        with pytest.raises(errors.ManifestError):
            Manifest.from_json(_generative(**bad)).resolve("lm", None)


@pytest.mark.parametrize(("change", "reason"), [
    (lambda v: v.pop("generation"), "needs a 'generation' entry"),
    (lambda v: v["generation"].update(eos_token_ids=[]), "eos_token_ids"),
    (lambda v: v["generation"].update(default_max_tokens=9000), "default_max_tokens"),
    (lambda v: v["generation"].update(tiers={"tpu": {"tokens_per_s": 1}}), "tiers"),
    (lambda v: v["variants"]["int4"]["external_data"].append(
        {"path": "lm/1/int4/run.sh", "sha256": "c" * 64, "size_bytes": 1}), "onnxruntime-genai folder"),
    (lambda v: v["variants"]["int4"]["external_data"].pop(1), "genai_config.json"),
    (lambda v: v.update(task="summarise"), "task"),
], ids=["no-generation", "no-eos", "default-over-cap", "unknown-tier", "foreign-file", "no-genai-config", "task"])
def test_a_bad_generation_entry_takes_down_its_model_with_the_reason(change, reason):
    doc = _generative()
    change(doc["models"]["lm"]["versions"]["1"])
    with pytest.raises(errors.ManifestError, match=reason):
        Manifest.from_json(doc).resolve("lm", None)


def test_a_variants_digest_covers_every_file_and_is_its_sha256_when_it_has_one():
    # issue 17: a variant's identity (cache folder, published prefix, sessions) is all of its files
    import hashlib

    from tierserve.manifest import ExternalFile, Variant

    a, b, c = "a" * 64, "b" * 64, "c" * 64
    plain = Variant("m/1/model.onnx", a, 10)
    assert plain.digest == a  # caches and stores of plain models from before the digest stay valid
    v = Variant("m/1/fp32/model.onnx", a, 10, (ExternalFile("m/1/fp32/tokenizer.json", b, 5),
                                                 ExternalFile("m/1/fp32/sub/model.onnx.data", c, 7)))
    listing = json.dumps({"model.onnx": a, "sub/model.onnx.data": c, "tokenizer.json": b}, sort_keys=True,
                         separators=(",", ":"))
    assert v.digest == hashlib.sha256(listing.encode()).hexdigest() != a
    # the same files elsewhere (another version, a published prefix), listed in another order: the same digest
    moved = Variant("_objects/x/model.onnx", a, 10, (ExternalFile("_objects/x/sub/model.onnx.data", c, 7),
                                                     ExternalFile("_objects/x/tokenizer.json", b, 5)))
    assert moved.digest == v.digest
    # one file's content, or its location, changed: another digest
    other = Variant("m/1/fp32/model.onnx", a, 10, (ExternalFile("m/1/fp32/tokenizer.json", c, 5),
                                                     ExternalFile("m/1/fp32/sub/model.onnx.data", c, 7)))
    renamed = Variant("m/1/fp32/model.onnx", a, 10, (ExternalFile("m/1/fp32/tokenizer.json", b, 5),
                                                       ExternalFile("m/1/fp32/model.onnx.data", c, 7)))
    assert len({v.digest, other.digest, renamed.digest}) == 3
