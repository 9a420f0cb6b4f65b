"""Roofline perf model against hand-computed figures."""

import math

import pytest

from duopool.core.perfmodel import (
    Efficiency,
    HardwareSpec,
    ModelConfig,
    PerfModel,
    ProfileSample,
    builtin_names,
    fit_efficiency,
    mape,
)

pytestmark = pytest.mark.unit

ONE = Efficiency(gemm_compute=1.0, attn_compute=1.0, gemm_bw=1.0, attn_bw=1.0, net=1.0, step_overhead_s=0.0)


def tiny(tp=1, kv_heads=2):
    hw = HardwareSpec("toy", peak_flops=1e12, mem_bw=1e11, mem_bytes=1e10, tp_link_bw=1e10, kv_link_bw=1e9)
    m = ModelConfig("toy", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=kv_heads, vocab_size=100, head_dim=16, dtype_bytes=2)
    return PerfModel(hw, m, tp=tp, eff=ONE, activation_reserve_bytes=0)


def test_builtin_data_files_load():
    assert {"A100-80G", "H100-SXM", "H200", "L40S"} <= set(builtin_names("hardware"))
    assert {"llama-3.1-8b", "qwen2.5-7b", "qwen2.5-14b", "llama-2-7b", "llama-2-70b"} <= set(builtin_names("models"))
    for hw in builtin_names("hardware"):
        for m in builtin_names("models"):
            tp = 4 if "70b" in m else 1
            if "70b" in m and hw == "L40S":
                tp = 8
            pm = PerfModel.load(hw, m, tp=tp)
            assert pm.step_time_s([], [100]) > 0


def test_param_count_and_kv_bytes_llama31_8b():
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    assert pm.model.param_count() == pytest.approx(8.03e9, rel=0.01)
    # 2 (K,V) × 32 layers × 8 kv heads × 128 head dim × 2 bytes
    assert pm.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert PerfModel.load("H100-SXM", "llama-2-7b").kv_bytes_per_token == 2 * 32 * 32 * 128 * 2  # no GQA
    # 70B on tp=4: 8 kv heads split over 4 GPUs
    assert PerfModel.load("H100-SXM", "llama-2-70b", tp=4).kv_bytes_per_token == 2 * 80 * 2 * 128 * 2


def test_linear_decode_is_memory_bound_hand_computed():
    pm = tiny()
    h, i = 64, 128
    lin = [(h, 64 + 2 * 32), (64, h), (h, 2 * i), (i, h)]  # q_dim 64, kv_dim 32
    t = 1
    want = 0.0
    for a, b in lin:
        flops = 2 * a * b * t
        nbytes = 2 * (t * a + a * b + t * b)
        want += max(flops / 1e12, nbytes / 1e11)
    assert pm.linear_time(1) == pytest.approx(want * 2)  # 2 layers
    # decode at batch 1 is bandwidth-bound: weights dominate
    assert pm.linear_time(1) == pytest.approx(2 * sum(2 * (a + a * b + b) for a, b in lin) / 1e11)


def test_prefill_attention_hand_computed():
    pm = tiny()
    L = 1000
    flops = 4 * 64 * L * L
    nbytes = 2 * (2 * L * 64 + 2 * L * 32)
    want = max(flops / 1e12, nbytes / 1e11) * 2
    assert pm.attention_time(L * L, L, L) == pytest.approx(want)
    # a whole prompt is causal: L·(L + 1)/2 (query, key) pairs
    pairs = L * (L + 1) / 2
    want_causal = max(4 * 64 * pairs / 1e12, nbytes / 1e11) * 2
    parts = pm.step_parts([(L, L)], 0, 0)
    assert parts.attn_prefill == pytest.approx(want_causal)
    assert parts.attn_decode == 0
    assert parts.total == pytest.approx(pm.step_time_s([L], []))


def test_prefill_attention_flops_do_not_depend_on_chunking():
    """Causal pairs add up the same whether a prompt runs whole or in chunks (the bytes differ: each chunk
    reads the cache again)."""
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    L = 16000
    m = pm.model
    whole = [(L, L)]
    chunks = [(1000, k + 1000) for k in range(0, L, 1000)]
    pairs = [sum(q * (kv - q) + q * (q + 1) / 2 for q, kv in c) for c in (whole, chunks)]
    assert pairs[0] == pytest.approx(pairs[1]) == pytest.approx(L * (L + 1) / 2)
    flops_s = [4 * m.q_dim * p * m.num_hidden_layers / (pm.hardware.peak_flops * pm.eff.attn_compute) for p in pairs]
    assert pm.step_parts(whole, 0, 0).attn_prefill == pytest.approx(flops_s[0])  # compute-bound
    assert pm.step_parts(chunks, 0, 0).attn_prefill >= flops_s[1] - 1e-12


def test_gqa_reduces_decode_attention_bytes():
    mha, gqa = tiny(kv_heads=4), tiny(kv_heads=1)
    assert gqa.step_parts([], 64, 64 * 4000).attn_decode < mha.step_parts([], 64, 64 * 4000).attn_decode


def test_tensor_parallel_all_reduce_and_split():
    pm1, pm2 = tiny(tp=1), tiny(tp=2)
    assert pm1.allreduce_time(100) == 0
    # ring all-reduce: 2 per layer, 2·(tp−1)/tp · T · hidden · dtype bytes each, over 1e10 B/s
    assert pm2.allreduce_time(100) == pytest.approx(2 * 2 * (2 * 1 / 2 * 100 * 64 * 2) / 1e10)
    assert pm2.linear_time(4096) < pm1.linear_time(4096)


def test_efficiency_scales_compute_bound_time():
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b", eff=ONE)
    slow = pm.with_efficiency(Efficiency(gemm_compute=0.5, attn_compute=1, gemm_bw=1, attn_bw=1, net=1,
                                         step_overhead_s=0))
    assert slow.linear_time(8192) == pytest.approx(2 * pm.linear_time(8192), rel=1e-9)


def test_monotone_and_saturation():
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    assert pm.step_time_s([2000], []) > pm.step_time_s([1000], [])
    assert pm.step_time_s([], [2000] * 64) > pm.step_time_s([], [1000] * 64)
    sat = pm.saturation_batch()
    # H100: ridge ≈ dtype·peak·e_c / (2·bw·e_b) ≈ 2·989e12·0.68 / (2·3.35e12·0.58) ≈ 346 plus the activation bytes
    assert 300 < sat < 500
    # below saturation the linear layers cost about the same as at batch 1 (weights read once)
    assert pm.linear_time(sat // 4) < 1.3 * pm.linear_time(1)


def test_decode_run_times_match_step_by_step():
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    n, ctx = 37, 37 * 1500
    run = pm.decode_run_times(n, ctx, 5)
    for j in range(5):
        assert run[j] == pytest.approx(pm.chunked_step_time_s((), n, ctx + j * n))


def test_decode_ctx_budget_inverts_step_time():
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    for n in (1, 50, 200):
        c = pm.decode_ctx_budget(n, 0.05)
        assert pm.chunked_step_time_s((), n, c) == pytest.approx(0.05, rel=1e-6)
    assert pm.decode_ctx_budget(10, 1e-4) < 0


def test_kv_capacity_and_transfer():
    pm = PerfModel.load("H100-SXM", "llama-3.1-8b")
    cap = pm.kv_capacity_tokens()
    assert cap == int((80e9 * 0.9 - pm.weight_bytes_per_gpu - 2e9) // 131072)
    assert pm.kv_transfer_s(1000) == pytest.approx(1000 * 131072 / (50e9 * pm.eff.net))
    with pytest.raises(ValueError, match="does not fit"):
        PerfModel.load("L40S", "llama-2-70b", tp=1).kv_capacity_tokens()


def test_validation_names_field():
    with pytest.raises(ValueError, match="peak_flops"):
        HardwareSpec("bad", peak_flops=0, mem_bw=1, mem_bytes=1, tp_link_bw=1, kv_link_bw=1)
    with pytest.raises(ValueError, match="unknown hardware"):
        PerfModel.load("B300", "llama-3.1-8b")


def test_fit_efficiency_recovers_factors():
    truth = PerfModel.load("H100-SXM", "llama-3.1-8b",
                           eff=Efficiency(gemm_compute=0.5, gemm_bw=0.7, attn_compute=0.6, attn_bw=0.3,
                                          step_overhead_s=0.002))
    batches = [((( p, p),), ()) for p in (64, 512, 2048, 4096)] + [((), tuple([c] * n)) for n, c in
                                                                    ((1, 500), (32, 2000), (128, 1000), (256, 3000))]
    samples = [ProfileSample(ch, d, truth.chunked_step_time_s(ch, len(d), sum(d)) * 1e3) for ch, d in batches]
    start = PerfModel.load("H100-SXM", "llama-3.1-8b")
    before = mape(start, samples)
    eff = fit_efficiency(start, samples)
    after = mape(start.with_efficiency(eff), samples)
    assert before > 0.05
    assert after < 0.02 and after < before
    assert math.isclose(eff.gemm_compute, 0.5, rel_tol=0.1)
