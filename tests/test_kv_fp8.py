"""The float8 (e4m3) KV cache's reference semantics on the CPU: CpuOps writes k / k_scale and v / v_scale
rounded to nearest even and saturated to +-448, and attends over the cache's values times the scales;
per-layer scales come from a checkpoint's self_attn.k_scale / v_scale (the CUDA kernels: tests/cuda/test_kv_fp8.py)."""

import pytest
import torch

from forge.models.decoder import kv_cache_scales
from forge.ops.cpu import FP8_KV, CpuOps, dequantize_kv, quantize_kv
from tests.util import single_sequence_metadata


def test_quantize_kv_rounds_to_nearest_even_and_saturates():
    x = torch.tensor([0.0, 1.0, 1.0625, 1.1875, 448.0, 464.0, 1e6, -1e6, float("inf"), 2.0**-10, 3 * 2.0**-10, -0.3])
    got = quantize_kv(x, 1.0).float()
    # 1.0625 is halfway between 1 and 1.125 (even: 1), 1.1875 between 1.125 and 1.25 (even: 1.25);
    # 2^-10 halfway between 0 and the smallest subnormal 2^-9 (even: 0), 3 * 2^-10 between 2^-9 and 2^-8 (even: 2^-8)
    want = torch.tensor([0.0, 1.0, 1.0, 1.25, 448.0, 448.0, 448.0, -448.0, 448.0, 0.0, 2.0**-8, -0.3125])
    assert torch.equal(got, want)
    assert torch.isnan(quantize_kv(torch.tensor([float("nan")]), 1.0).float()).all()
    # the scale divides (x / 0.5 = 2x), and dequantize_kv multiplies it back
    assert torch.equal(quantize_kv(x[:4], 0.5).float(), x[:4].mul(2).to(FP8_KV).float())
    assert torch.equal(dequantize_kv(quantize_kv(x[:4], 0.5), 0.5, torch.float32), quantize_kv(x[:4], 0.5).float() * 0.5)
    assert dequantize_kv(x, 3.0, torch.float32) is x  # a float cache ignores the scale


def _caches(dtype, blocks=4, bs=16, hkv=2, d=32):
    return torch.zeros(blocks, bs, hkv, d, dtype=dtype), torch.zeros(blocks, bs, hkv, d, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_qkv_rope_cache_writes_fp8(dtype):
    """The fp8 cache holds quantize_kv of exactly what a float cache of qkv's dtype would hold."""
    h, hkv, d, t = 4, 2, 32, 21
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(t, (h + 2 * hkv) * d, generator=g) * 4).to(dtype)
    cos_sin = torch.cat([torch.rand(64, d // 2, generator=g), torch.rand(64, d // 2, generator=g)], -1)
    positions, slots = torch.arange(t) + 3, torch.arange(t) + 5
    ops = CpuOps()
    kf, vf = _caches(dtype)
    q_ref = ops.qkv_rope_cache(qkv, positions, cos_sin, kf, vf, slots, h, hkv, d, k_scale=0.01, v_scale=7.0)
    k8, v8 = _caches(FP8_KV)
    q = CpuOps().qkv_rope_cache(qkv, positions, cos_sin, k8, v8, slots, h, hkv, d, k_scale=0.01, v_scale=7.0)
    assert q.dtype == dtype and torch.equal(q, q_ref)
    assert torch.equal(k8.view(torch.uint8), quantize_kv(kf, 0.01).view(torch.uint8))  # (k / 0.01 saturates at times)
    assert torch.equal(v8.view(torch.uint8), quantize_kv(vf, 7.0).view(torch.uint8))
    assert (k8.float().abs() == 448).any()


def test_cpu_attention_over_fp8_cache_is_attention_over_its_dequantized_values():
    """Prefill with a cached prefix and decode rows: the fp8 cache read as value x scale, and close
    (fp8 keeps 3 mantissa bits) to attention over the unquantized cache."""
    from tests.cuda.test_kernels import make_meta, make_paged

    h, hkv, d, bs = 8, 2, 64, 16
    lens, qlens = [40, 9, 70], [5, 1, 70]
    k, v, tables = make_paged(lens, hkv, d, bs, torch.float32, seed=3)
    k8, v8 = quantize_kv(k, 0.02), quantize_kv(v, 0.5)
    q = torch.randn(sum(qlens), h, d, generator=torch.Generator().manual_seed(4))
    for ql in (qlens, [1, 1, 1]):
        qq = q[: sum(ql)]
        meta = make_meta(ql, lens, tables)
        out = CpuOps().attention(qq, k8, v8, meta, 0.125, k_scale=0.02, v_scale=0.5)
        ref = CpuOps().attention(qq, k8.float() * 0.02, v8.float() * 0.5, meta, 0.125)
        assert torch.equal(out, ref)
        exact = CpuOps().attention(qq, k, v, meta, 0.125)
        err = ((out - exact).norm() / exact.norm()).item()
        assert 1e-3 < err < 0.06, err  # (measured 0.032 prefill, 0.036 decode rows)


def test_kv_cache_scales_from_checkpoint_names():
    weights = {"model.layers.0.self_attn.k_scale": torch.tensor(0.25), "model.layers.0.self_attn.v_scale": torch.tensor([2.0]),
               "model.layers.1.self_attn.k_scale": torch.full((4,), 0.5), "other": torch.zeros(1)}
    assert kv_cache_scales(weights, 0) == {"k_scale": 0.25, "v_scale": 2.0}
    assert kv_cache_scales(weights, 1) == {"k_scale": 0.5, "v_scale": 1.0}  # (no v_scale: 1.0, vLLM's default)
    assert kv_cache_scales(weights, 2) == {"k_scale": 1.0, "v_scale": 1.0}
    assert list(weights) == ["other"]  # taken out of the loader's dict
    with pytest.raises(ValueError, match="per-head"):
        kv_cache_scales({"model.layers.0.self_attn.v_scale": torch.tensor([1.0, 2.0])}, 0)
    with pytest.raises(ValueError, match="positive"):
        kv_cache_scales({"model.layers.0.self_attn.k_scale": torch.tensor(0.0)}, 0)


def test_decoder_uses_fp8_cache_with_checkpoint_scales():
    """A model whose weights carry k_scale / v_scale writes its fp8 cache with them (CpuOps, the reference)."""
    from forge.models.decoder import DecoderModel
    from tests.util import random_weights, tiny_config

    cfg = tiny_config(vocab_size=300, num_layers=2, head_dim=32)
    weights = random_weights(cfg, seed=2)
    weights["model.layers.1.self_attn.k_scale"] = torch.tensor(2.0**-7)
    weights["model.layers.1.self_attn.v_scale"] = torch.tensor(2.0**-6)
    model = DecoderModel(cfg, weights, CpuOps(), "cpu", torch.float32, 64)
    assert model.kv_scales == [{"k_scale": 1.0, "v_scale": 1.0}, {"k_scale": 2.0**-7, "v_scale": 2.0**-6}]
    n = 20
    meta = single_sequence_metadata(n, 16)
    float_caches = [_caches(torch.float32, 2, 16, cfg.num_kv_heads, 32) for _ in range(2)]
    fp8_caches = [_caches(FP8_KV, 2, 16, cfg.num_kv_heads, 32) for _ in range(2)]
    ids = torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(1))
    ref = model.forward(ids, meta, float_caches)
    out = model.forward(ids, meta, fp8_caches)
    (k0, v0), (k1, v1) = fp8_caches
    assert torch.equal(k0.view(torch.uint8), quantize_kv(float_caches[0][0], 1.0).view(torch.uint8))
    # layer 1's input differs a little (layer 0 attended over fp8 values), so its cache is compared loosely
    assert ((k1.float() * 2.0**-7 - float_caches[1][0]).norm() / float_caches[1][0].norm()).item() < 0.08
    assert ((v1.float() * 2.0**-6 - float_caches[1][1]).norm() / float_caches[1][1].norm()).item() < 0.08
    assert (k1.float().abs().max() > 20)  # stored as k * 128: far from k's own range
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
