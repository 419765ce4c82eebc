"""Placement rules, on synthetic profiles (no big files) and end to end with small limits."""

from __future__ import annotations

import pytest

from tierserve_compiler.config import LambdaLimits, load_prices, make_config
from tierserve_compiler.pipeline import compile_model
from tierserve_compiler.placement import place

GB = 1024**3


def fake_profile(p50_ms: float = 2.0, rss_mb: float = 200.0, per_row: float = 0.5) -> dict:
    batches = {
        str(b): {"p50_ms": p50_ms + per_row * (b - 1), "p95_ms": 1.2 * (p50_ms + per_row * (b - 1))} for b in (1, 8, 32)
    }
    return {"threads": {"1": {"load_s": 0.1, "batches": batches}}, "peak_rss_mb": rss_mb, "load_s": 0.1}


def cfg(**kw):
    return make_config("x.onnx", "m", preset="test", **kw)


def rules(p):
    return {r.rule: r for r in p.reasons}


def test_small_model_lands_on_cpu_with_every_reason():
    # Given a small, fast model / When placed
    p = place(size_bytes=5 * 2**20, profile=fake_profile(), row_bytes=256, cfg=cfg(), prices=load_prices())
    # Then it serves on CPU at 1,769 MB (1 vCPU, 1 thread), and every rule has a recorded reason
    assert p.targets == ["cpu"] and p.cpu == {"memory_mb": 1769, "threads": 1}
    assert {
        "lambda_package",
        "lambda_tmp",
        "lambda_memory",
        "lambda_payload",
        "lambda_timeout",
        "slo",
        "cost",
        "decision",
    } <= set(rules(p))
    assert p.deployment == "zip"


def test_too_large_for_lambda_lands_on_gpu_naming_the_limit():
    # Given an 11 GB model with the deployed functions' limits
    p = place(size_bytes=11 * GB, profile=fake_profile(rss_mb=12000), row_bytes=256, cfg=cfg(), prices=load_prices())
    # Then it goes to the GPU, and the reasons name /tmp and the largest memory class
    assert p.targets == ["gpu"]
    r = rules(p)
    assert not r["lambda_tmp"].ok and "10,240 MB, the CPU functions' /tmp" in r["lambda_tmp"].detail
    assert not r["lambda_memory"].ok and "largest CPU memory class, 10,240 MB" in r["lambda_memory"].detail
    assert r["lambda_package"].ok  # the model is never packaged
    assert "does not fit the CPU tier's functions" in r["decision"].detail


def test_a_300_mb_model_is_a_zip_function_with_the_model_on_tmp_never_a_container_image():
    # Given a 300 MB model (over the 250 MB zip package, were it packaged)
    p = place(size_bytes=300 * 2**20, profile=fake_profile(rss_mb=900), row_bytes=256, cfg=cfg(), prices=load_prices())
    # Then it serves on the CPU from the zip function, its files on /tmp with room to verify them
    assert p.targets == ["cpu"] and p.deployment == "zip"
    r = rules(p)
    assert "not packaged" in r["lambda_package"].detail and "~375 MB of /tmp" in r["lambda_tmp"].detail


def test_a_model_slower_than_a_synchronous_request_goes_to_gpu():
    # Given a model whose p95 at batch 32 is ~45 s on one vCPU: within the functions' 900 s (kept for streamed
    # generation), not API Gateway's 29 s for a synchronous inference
    p = place(size_bytes=2**20, profile=fake_profile(p50_ms=1000.0, per_row=1200.0), row_bytes=64, cfg=cfg(),
              prices=load_prices())
    # Then the CPU tier is ruled out by the synchronous request's bound
    r = rules(p)
    assert p.targets == ["gpu"] and not r["lambda_timeout"].ok
    assert "29 s for a synchronous request" in r["lambda_timeout"].detail


def test_memory_is_recommended_as_one_of_the_templates_classes():
    # Given models needing ~2,000 MB and ~6,000 MB
    for rss, want in ((2000.0, 3538), (6000.0, 10240)):
        p = place(size_bytes=2**20, profile=fake_profile(rss_mb=rss), row_bytes=64, cfg=cfg(), prices=load_prices())
        # Then each gets the smallest memory class that holds it (no 2,048 or 7,076 MB function exists)
        assert p.cpu["memory_mb"] == want and p.targets == ["cpu"]


def test_payload_over_6_mb_goes_to_gpu():
    p = place(size_bytes=2**20, profile=fake_profile(), row_bytes=4 * 2**20, cfg=cfg(), prices=load_prices())
    assert p.targets == ["gpu"] and "6 MB" in rules(p)["lambda_payload"].detail


def test_slo_picks_more_memory_then_gpu_when_unreachable():
    # Given a 30 ms model with 10 % serial work (measured at 1 and 2 threads)
    prof = fake_profile(p50_ms=30.0)
    prof["threads"]["2"] = {
        "load_s": 0.1,
        "batches": {b: {k: v * 0.55 for k, v in d.items()} for b, d in prof["threads"]["1"]["batches"].items()},
    }
    # When the SLO needs ~2+ vCPUs / Then a larger memory size with more threads is recommended
    p = place(size_bytes=2**20, profile=prof, row_bytes=64, cfg=cfg(slo_ms=25.0), prices=load_prices())
    assert p.targets == ["cpu"] and p.cpu["memory_mb"] > 1769 and p.cpu["threads"] >= 2
    # When the SLO is unreachable even at 10,240 MB / Then the GPU serves it
    p = place(size_bytes=2**20, profile=prof, row_bytes=64, cfg=cfg(slo_ms=1.0), prices=load_prices())
    assert p.targets == ["gpu"] and not rules(p)["slo"].ok


def test_high_volume_makes_gpu_cheaper_with_cpu_fallback():
    # Given a slow-ish model at 2 billion requests a month
    prices = {**load_prices(), "expected_requests_per_month": 2e9}
    p = place(size_bytes=2**20, profile=fake_profile(p50_ms=40.0), row_bytes=64, cfg=cfg(), prices=prices)
    # Then GPU is primary with CPU fallback, with the costs recorded
    assert p.targets == ["gpu", "cpu"]
    assert p.costs["gpu_usd_per_month"] < p.costs["lambda_usd_per_month"]


@pytest.mark.parametrize(("target", "expected"), [("cpu", ["cpu"]), ("gpu", ["gpu"]), ("both", ["gpu", "cpu"])])
def test_target_forces_and_says_so(target, expected):
    p = place(size_bytes=11 * GB, profile=fake_profile(), row_bytes=64, cfg=cfg(target=target), prices=load_prices())
    assert p.targets == expected and p.forced
    assert f"--target {target}" in rules(p)["forced"].detail


def test_routing_thresholds_from_profile():
    # Given 0.5 ms per extra row and a 100 ms budget (no SLO)
    p = place(
        size_bytes=2**20, profile=fake_profile(p50_ms=2.0, per_row=0.5), row_bytes=100, cfg=cfg(), prices=load_prices()
    )
    # Then the GPU is preferred from ~100 / (17.5 / 32) rows on, and bytes = rows x row size
    assert 150 <= p.routing["gpu_min_rows"] <= 200
    assert p.routing["gpu_min_bytes"] == p.routing["gpu_min_rows"] * 100


def test_end_to_end_too_large_for_small_limits_writes_triton_repo(mlp_onnx, tmp_path):
    # Given limits so small that the tiny MLP exceeds them (the real ones are the defaults)
    limits = LambdaLimits(tmp_mb=0.001)
    c = make_config(str(mlp_onnx), "big", preset="test", out_dir=tmp_path / "models", limits=limits, quantize="none")
    # When compiled
    res = compile_model(c)
    # Then it lands on gpu, the limit is named in report.json and report.md, and Triton gets the model
    assert list(res.model_version.targets) == ["gpu"] and res.model_version.cpu_variant is None
    reasons = res.report["placement"]["reasons"]
    assert any(r["rule"] == "lambda_tmp" and not r["ok"] and "CpuEphemeralStorageMb" in r["detail"] for r in reasons)
    assert "CpuEphemeralStorageMb" in (res.version_dir / "report.md").read_text()
    assert (tmp_path / "models" / "triton" / "big" / "1" / "model.onnx").is_file()



# --- causal LMs (issue 17) ---------------------------------------------------------------------------------


def gen_profile(step_ms: float = 20.0, ttft_ms: float = 100.0, size_mb: float = 80.0, peak_mb: float = 300.0,
                kv_per_token: int = 36_864, context: int = 2048) -> dict:
    """A causal LM's profile as profile.profile_generative writes it (1 and 2 threads; 2 threads 1.6x faster)."""
    def th(f: float) -> dict:
        return {"load_s": 0.1, "ttft_ms": {"16": ttft_ms / 8 * f, "128": ttft_ms * f, "512": ttft_ms * 4 * f},
                "batches": {"1": {"p50_ms": step_ms * f, "p95_ms": step_ms * f, "mean_ms": step_ms * f,
                                  "tokens_per_s": 1000 / (step_ms * f)},
                            "8": {"p50_ms": 3 * step_ms * f, "p95_ms": 3 * step_ms * f, "mean_ms": 3 * step_ms * f,
                                  "tokens_per_s": 8000 / (3 * step_ms * f)}}}
    return {"kind": "text-generation", "threads": {"1": th(1.0), "2": th(1 / 1.6)}, "peak_rss_mb": peak_mb,
            "size_bytes": int(size_mb * 2**20), "load_s": 0.1,
            "kv": {"context": 256, "measured_bytes": kv_per_token * 256, "measured_bytes_per_token": kv_per_token,
                   "computed_bytes_per_token": kv_per_token, "full_context": context,
                   "full_context_bytes": kv_per_token * context, "matches": True}}


def gen_source(context: int = 2048, parameters: int = 135_000_000):
    from types import SimpleNamespace

    return SimpleNamespace(context_length=context, kv_bytes_per_token=36_864, parameters=parameters)


def test_a_small_causal_lm_lands_on_cpu_in_the_smallest_class_with_its_kv_cache():
    from tierserve_compiler.placement import place_generation

    cfg = make_config("m.onnx", "m", slo_tokens_per_s=40.0)
    placement, figures = place_generation(gen_source(), gen_profile(), cfg, load_prices())
    assert placement.targets == ["cpu"] and placement.cpu["memory_mb"] == 1769
    rules = {r.rule: r for r in placement.reasons}
    assert rules["lambda_tmp"].ok and "within SnapStart's 512 MB" in rules["lambda_tmp"].detail
    assert "KV cache at the full context 2,048 tokens 72.0 MB" in rules["lambda_memory"].detail
    # 1 vCPU: 20 ms/token = 50 tokens/s >= 40; the cpu figures are the estimate at that class
    assert figures["cpu"].tokens_per_s == pytest.approx(50.0) and figures["cpu"].cost_per_1m_tokens > 0
    assert figures["gpu"].tokens_per_s > figures["cpu"].tokens_per_s


def test_a_tokens_per_s_slo_buys_vcpus_then_goes_to_gpu():
    from tierserve_compiler.placement import place_generation

    # 2 threads run 1.6x faster: serial fraction 0.25; at 2 vCPUs ~80 tokens/s
    cfg = make_config("m.onnx", "m", slo_tokens_per_s=75.0)
    placement, _ = place_generation(gen_source(), gen_profile(), cfg, load_prices())
    assert placement.targets == ["cpu"] and placement.cpu["memory_mb"] == 3538
    cfg = make_config("m.onnx", "m", slo_tokens_per_s=500.0)
    placement, _ = place_generation(gen_source(), gen_profile(), cfg, load_prices())
    assert placement.targets == ["gpu"] and "no CPU memory class meets --slo-tokens-per-s 500" in \
        placement.reasons[-1].detail


def test_a_causal_lm_whose_kv_cache_does_not_fit_goes_to_gpu_and_large_files_lose_snapstart():
    from tierserve_compiler.placement import place_generation

    prof = gen_profile(size_mb=2000.0, peak_mb=2300.0, context=131_072, kv_per_token=131_072)
    placement, _ = place_generation(gen_source(context=131_072), prof, make_config("m.onnx", "m"), load_prices())
    rules = {r.rule: r for r in placement.reasons}
    assert not rules["lambda_memory"].ok and placement.targets == ["gpu"]
    assert "over SnapStart's 512 MB /tmp" in rules["lambda_tmp"].detail
    assert "does not fit the CPU tier" in rules["decision"].detail
