"""Placement on the edge: the device profile, the variant a device serves, and --target edge end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierserve_compiler.config import load_prices, make_config
from tierserve_compiler.edge import PROFILES, Candidate, load_profile, place_edge
from tierserve_compiler.errors import ConfigError
from tierserve_compiler.placement import place

MB = 1024 * 1024


def profile(p95_ms: float, per_row: float = 0.05, rss_mb: float = 0.0) -> dict:
    batches = {str(b): {"p50_ms": p95_ms / 1.2 + per_row * (b - 1), "p95_ms": p95_ms + per_row * (b - 1)}
               for b in (1, 8, 32)}
    return {"threads": {"1": {"batches": batches}}, "peak_rss_mb": rss_mb}


def cloud(**kw):
    cfg = make_config("x.onnx", "m", preset="test", **kw)
    return place(size_bytes=5 * MB, profile=profile(2.0), row_bytes=256, cfg=cfg, prices=load_prices())


def rules(p):
    return {r.rule: r for r in p.reasons}


def test_the_smallest_variant_within_budget_goes_to_the_edge_with_its_reasons() -> None:
    # Given fp32 and int8 within their budgets (the int8 a quarter of the size), on a Raspberry Pi 4
    candidates = [Candidate("fp32", 8 * MB, profile(2.0)), Candidate("int8_dynamic", 2 * MB, profile(1.5))]
    p, variant = place_edge(cloud(), candidates, PROFILES["rpi4"], target="edge", explicit_profile=False, slo_ms=None)
    # Then the int8 is the edge variant, edge comes first in the targets with the cloud CPU beside it
    assert variant == "int8_dynamic" and p.targets == ["edge", "cpu"]
    r = rules(p)
    assert {"edge_variant", "edge_memory", "edge_latency", "edge_max_rows", "edge_decision"} <= set(r)
    # And the device's latency is the measured one scaled to its cores and speed: 1.5 ms / 0.3 (Amdahl, 4 cores)
    assert p.edge["p95_ms_estimate"] == pytest.approx(1.5 * (0.5 + 0.5 / 4) / 0.3, rel=1e-3)
    assert p.routing["edge_max_rows"] == p.edge["max_rows"] >= 1 and "gpu_min_rows" in p.routing
    # And the largest batch is capped at the model's max_batch_size (the cloud splits bigger ones)
    capped, _ = place_edge(cloud(), candidates, PROFILES["rpi4"], target="edge", explicit_profile=False,
                           slo_ms=None, max_batch_size=16)
    assert capped.routing["edge_max_rows"] == 16 and "capped at the model's max_batch_size 16" in \
        rules(capped)["edge_max_rows"].detail


def test_auto_places_on_the_edge_only_with_a_profile_and_only_what_fits() -> None:
    fits = [Candidate("fp32", 1 * MB, profile(1.0))]
    p, variant = place_edge(cloud(), fits, PROFILES["rpi5"], target="auto", explicit_profile=True, slo_ms=None)
    assert variant == "fp32" and p.targets[0] == "edge"
    # Without a profile given, auto never chooses the edge
    p, variant = place_edge(cloud(), fits, PROFILES["rpi4"], target="auto", explicit_profile=False, slo_ms=None)
    assert variant is None and "edge" not in p.targets and "no --edge-profile" in rules(p)["edge_decision"].detail
    # Too slow for the SLO on the device: not on the edge under auto, forced (and noted) under --target edge
    slow = [Candidate("fp32", 1 * MB, profile(40.0))]
    p, variant = place_edge(cloud(), slow, PROFILES["rpi4"], target="auto", explicit_profile=True, slo_ms=10)
    assert variant is None and not rules(p)["edge_latency"].ok
    p, variant = place_edge(cloud(), slow, PROFILES["rpi4"], target="edge", explicit_profile=True, slo_ms=10)
    assert variant == "fp32" and "overridden: edge_latency" in rules(p)["edge_decision"].detail
    # Over the device's memory: refused under auto
    big = [Candidate("fp32", 600 * MB, profile(1.0))]
    p, variant = place_edge(cloud(), big, PROFILES["rpi4"], target="auto", explicit_profile=True, slo_ms=None)
    assert variant is None and not rules(p)["edge_memory"].ok


def test_a_profile_file_and_its_errors(tmp_path: Path) -> None:
    f = tmp_path / "jetson.json"
    f.write_text(json.dumps({"memory_mb": 3072, "cores": 6, "speed": 0.8}))
    assert load_profile(str(f)).to_json() == {"name": "jetson", "memory_mb": 3072, "cores": 6, "speed": 0.8}
    assert load_profile(None) == PROFILES["rpi4"]
    with pytest.raises(ConfigError, match="neither a built-in profile"):
        load_profile("toaster")
    f.write_text(json.dumps({"memory_mb": 3072, "cores": 6}))
    with pytest.raises(ConfigError, match="needs memory_mb, cores and speed"):
        load_profile(str(f))


def test_target_edge_end_to_end_writes_the_edge_variant_to_the_manifest(mlp_onnx, mlp_data, cfg_for) -> None:
    from tierserve.manifest import Manifest
    from tierserve_compiler.pipeline import compile_model

    val, cal = mlp_data
    res = compile_model(cfg_for(mlp_onnx, "mlp", validation=val, calibration=cal, target="edge",
                                edge_profile="x86-small"))
    mv = Manifest.loads((res.out_dir / "manifest.json").read_text()).resolve("mlp")
    # Then the manifest places it on the edge beside a cloud tier, names the smallest in-budget variant for it,
    # and tells the runtime the largest batch the device takes
    assert mv.targets[0] == "edge" and mv.cloud_targets and mv.edge_variant in mv.variants
    from tierserve_compiler.variants import serves

    sizes = {k: v["size_bytes"] for k, v in res.report["variants"].items()
             if v.get("size_bytes") and serves(k, "cpu") and (k == "fp32" or v.get("within_budget", True))}
    assert mv.edge_artifact.size_bytes == min(sizes.values())
    assert mv.routing["edge_max_rows"] >= 1
    assert res.report["placement"]["edge"]["profile"]["name"] == "x86-small"
    assert "edge_decision" in {r["rule"] for r in res.report["placement"]["reasons"]}
    assert "edge:" in (res.version_dir / "report.md").read_text()


def test_bad_edge_options_are_refused_before_any_work() -> None:
    with pytest.raises(ConfigError, match="--edge-profile"):
        make_config("x.onnx", "m", preset="test", edge_profile="toaster").validate()
