"""The float8 (e4m3) KV cache on CUDA (kv_cache_dtype fp8): the cache-write kernel against the CPU's
quantize_kv bit for bit, the paged decode kernel and the prefill path against CpuOps over the dequantized
cache, and the engine against its bf16-cache run (run on the GPU machine: pytest -m cuda)."""

import pytest
import torch

from forge.ops.cpu import FP8_KV, CpuOps, quantize_kv
from tests.cuda.test_kernels import (
    DECODE_CASES,
    PREFILL_CASES,
    ROPE_SHAPES,
    TOL,
    WINDOW_CASES,
    cos_sin_cache,
    cuda_ops,
    gen,
    make_meta,
    make_paged,
    poison_allocator,
    rel_err,
)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CPU = CpuOps()
SCALES = [(1.0, 1.0), (0.0371, 3.7)]  # (k_scale, v_scale); in the write test 0.0371 saturates the larger keys at +-448


def fp8_paged(lens, hkv, d, bs, k_scale, v_scale, seed):
    """A random paged cache in float8 (its values / scale) and the float32 values it stands for."""
    k, v, tables = make_paged(lens, hkv, d, bs, torch.float32, seed=seed)
    k8, v8 = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
    return k8, v8, k8.float() * k_scale, v8.float() * v_scale, tables


# ---- cache write -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("shape", ROPE_SHAPES)
@pytest.mark.parametrize("scales", SCALES)
def test_qkv_rope_cache_fp8_write_is_exact(dtype, t, shape, scales):
    """The fp8 cache holds quantize_kv(k, k_scale) of the k the same kernel writes to a cache of qkv's
    dtype (k rotated in float32, rounded to qkv's dtype, then / k_scale, rounded to nearest even and
    saturated), and quantize_kv(v, v_scale): bit for bit. q is unchanged; slots < 0 and unwritten
    slots are untouched."""
    h, hkv, d = shape
    k_scale, v_scale = scales
    g = gen(t * 7 + d)
    num_blocks, bs = 8, 16
    qkv = (torch.randn(t, (h + 2 * hkv) * d, generator=g) * 8).to(dtype)  # (|k| up to ~30: some saturate)
    positions = torch.randint(0, 4000, (t,), generator=g)
    cs = cos_sin_cache(4096, d).cuda()
    slots = torch.randperm(num_blocks * bs, generator=g)[:t]
    if t > 2:
        slots[1] = -1
    before = quantize_kv(torch.randn(num_blocks, bs, hkv, d, generator=g), 1.0)
    args = (qkv.cuda(), positions.cuda(), cs)
    k_ref, v_ref = torch.zeros(num_blocks, bs, hkv, d, dtype=dtype, device="cuda"), torch.zeros(
        num_blocks, bs, hkv, d, dtype=dtype, device="cuda")
    q_ref = cuda_ops().qkv_rope_cache(*args, k_ref, v_ref, slots.cuda(), h, hkv, d)
    k8, v8 = before.clone().cuda(), before.clone().cuda()
    poison_allocator()
    q = cuda_ops().qkv_rope_cache(*args, k8, v8, slots.cuda(), h, hkv, d, k_scale=k_scale, v_scale=v_scale)
    assert q.dtype == dtype and torch.equal(q, q_ref)
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    rows = lambda c: c.cpu().view(torch.uint8).view(-1, hkv, d)  # noqa: E731
    want_k = quantize_kv(k_ref.cpu(), k_scale)
    want_v = quantize_kv(v_ref.cpu(), v_scale)
    assert torch.equal(rows(k8)[written], rows(want_k)[written])
    assert torch.equal(rows(v8)[written], rows(want_v)[written])
    # (v is copied exactly into v_ref, so want_v is quantize_kv of qkv's own v)
    assert torch.equal(rows(k8)[~written], rows(before)[~written]) and torch.equal(rows(v8)[~written], rows(before)[~written])
    if k_scale != 1.0 and t > 7:
        assert (k8.float().abs() == 448).any()  # (saturated, not NaN)
    assert not torch.isnan(k8.float()).any() and not torch.isnan(v8.float()).any()


# ---- decode ----------------------------------------------------------------------------------
# Tolerance: the reference (CpuOps in float32) attends over exactly the values the fp8 cache holds
# (value x scale), with the same q (rounded to q's dtype), so what is left is float32 summation order,
# the kernel's exp2 with the scale folded into q, and the output's rounding to q's dtype: the same
# TOL as the bf16/fp16 caches' tests. (Against the unquantized float cache the output is ~3-4% off:
# fp8 keeps 3 mantissa bits; tests/test_kv_fp8.py.)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"H{c[0]}kv{c[1]}D{c[2]}bs{c[3]}")
@pytest.mark.parametrize("num_splits", [None, 1, 3, 40])
@pytest.mark.parametrize("scales", SCALES)
def test_paged_decode_attention_fp8(dtype, case, num_splits, scales):
    from forge.kernels.paged_attention import paged_decode_attention

    h, hkv, d, bs, lens = case
    k_scale, v_scale = scales
    k8, v8, kf, vf, tables = fp8_paged(lens, hkv, d, bs, k_scale, v_scale, seed=d + bs)
    q = torch.randn(len(lens), h, d, generator=gen(5)).to(dtype)
    scale = d ** -0.5
    ref = CPU.attention(q.float(), kf, vf, make_meta([1] * len(lens), lens, tables), scale)
    poison_allocator()
    out = paged_decode_attention(q.cuda(), k8.cuda(), v8.cuda(), tables.cuda(), torch.tensor(lens, dtype=torch.int32).cuda(),
                                 scale, num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    zero_rows = [i for i, c in enumerate(lens) if c == 0]
    if zero_rows:
        assert torch.all(out[zero_rows] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"D{c[2]}w{c[5]}cap{c[6]}")
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_paged_decode_attention_fp8_window_and_soft_cap(dtype, case, num_splits):
    from forge.kernels.paged_attention import paged_decode_attention

    h, hkv, d, bs, lens, window, cap = case
    k_scale, v_scale = 0.25, 0.5
    k8, v8, kf, vf, tables = fp8_paged(lens, hkv, d, bs, k_scale, v_scale, seed=d + bs)
    q = (torch.randn(len(lens), h, d, generator=gen(5)) * 3).to(dtype)
    scale = d ** -0.5
    ref = CPU.attention(q.float(), kf, vf, make_meta([1] * len(lens), lens, tables), scale, window=window, soft_cap=cap)
    poison_allocator()
    out = paged_decode_attention(q.cuda(), k8.cuda(), v8.cuda(), tables.cuda(), torch.tensor(lens, dtype=torch.int32).cuda(),
                                 scale, num_splits=num_splits, window=window, soft_cap=cap, k_scale=k_scale, v_scale=v_scale)
    assert rel_err(out, ref) < TOL[dtype]


# ---- CudaOps: decode and prefill / mixed steps ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"H{c[0]}kv{c[1]}D{c[2]}")
@pytest.mark.parametrize("scales", SCALES)
def test_cuda_ops_attention_prefill_fp8(dtype, case, scales):
    """Cached prefixes, a decode row and full prefills: the gathered fp8 K/V dequantized to q's dtype."""
    h, hkv, d, bs, qlens, lens = case
    k_scale, v_scale = scales
    k8, v8, kf, vf, tables = fp8_paged(lens, hkv, d, bs, k_scale, v_scale, seed=d + len(lens))
    q = torch.randn(sum(qlens), h, d, generator=gen(13)).to(dtype)
    scale = d ** -0.5
    ref = CPU.attention(q.float(), kf, vf, make_meta(qlens, lens, tables), scale)
    ops = cuda_ops()
    poison_allocator()
    out = ops.attention(q.cuda(), k8.cuda(), v8.cuda(), make_meta(qlens, lens, tables, "cuda"), scale,
                        k_scale=k_scale, v_scale=v_scale)
    assert out.shape == q.shape and out.dtype == dtype
    # (q's dtype: the dequantized K/V are rounded to it too, one more rounding than the decode kernel)
    assert rel_err(out, ref) < TOL[dtype] * 2


@pytest.mark.parametrize("window,cap", [(7, None), (None, 4.0)])
def test_cuda_ops_attention_prefill_fp8_window_and_soft_cap(window, cap):
    h, hkv, d, bs, qlens, lens = 8, 2, 64, 16, [5, 1, 40, 70], [20, 9, 40, 300]
    k8, v8, kf, vf, tables = fp8_paged(lens, hkv, d, bs, 0.25, 2.0, seed=7)
    q = (torch.randn(sum(qlens), h, d, generator=gen(13)) * 3).to(torch.bfloat16)
    ref = CPU.attention(q.float(), kf, vf, make_meta(qlens, lens, tables), 0.125, window=window, soft_cap=cap)
    out = cuda_ops().attention(q.cuda(), k8.cuda(), v8.cuda(), make_meta(qlens, lens, tables, "cuda"), 0.125,
                               window=window, soft_cap=cap, k_scale=0.25, v_scale=2.0)
    assert rel_err(out, ref) < TOL[torch.bfloat16] * 2


def test_cuda_ops_decode_fp8_matches_cpu_ops_fp8():
    """CudaOps and CpuOps on the same fp8 cache and scales (the ops interface end to end)."""
    h, hkv, d, bs, lens = 12, 4, 64, 16, [7, 70, 1, 300]
    k8, v8, _, _, tables = fp8_paged(lens, hkv, d, bs, 0.5, 0.125, seed=11)
    q = torch.randn(len(lens), h, d, generator=gen(12)).to(torch.bfloat16)
    ref = CPU.attention(q, k8, v8, make_meta([1] * len(lens), lens, tables), 0.125, k_scale=0.5, v_scale=0.125)
    out = cuda_ops().attention(q.cuda(), k8.cuda(), v8.cuda(), make_meta([1] * len(lens), lens, tables, "cuda"), 0.125,
                               k_scale=0.5, v_scale=0.125)
    assert rel_err(out, ref) < TOL[torch.bfloat16] * 2


# ---- engine ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Random weights, Llama-8B's attention shape cut small: head_dim 128, GQA 4, 4 layers."""
    from forge.loader.safetensors import save_hf_dir
    from tests.util import default_tokenizer, random_weights, tiny_config

    tok = default_tokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size, hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8,
                      num_kv_heads=2, head_dim=128)
    path = tmp_path_factory.mktemp("fp8kv")
    save_hf_dir(path, cfg, random_weights(cfg, seed=1), tok)
    return path, tok


def _prompts(tok):
    texts = ["Once upon a time", "The capital of France is", "def fib(n):", "1, 2, 3, 4,", "Hello"]
    return [{"prompt_token_ids": tok.encode(t * (i + 1))} for i, t in enumerate(texts)]


def test_engine_fp8_kv_cache(model_dir):
    """kv_cache_dtype fp8: float8 caches, half the bytes a block (the planner's budget // kv_block_bytes:
    twice the blocks); greedy tokens close to the
    bf16 cache's; CUDA graphs == eager; batch == one at a time."""
    from forge import LLM, SamplingParams
    from tests.util import forward_logits

    path, tok = model_dir
    ps = _prompts(tok)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    common = dict(device="cuda", dtype="bfloat16", max_num_seqs=8, quantization="none")
    ref_llm = LLM(str(path), num_kv_blocks=128, **common)
    ref = [o.outputs[0].token_ids for o in ref_llm.generate(ps, greedy, use_tqdm=False)]
    fp8 = LLM(str(path), num_kv_blocks=128, kv_cache_dtype="fp8", **common)
    runner = fp8.llm_engine.runner
    assert runner.kv_dtype == FP8_KV and runner.kv_caches[0][0].dtype == FP8_KV and runner.graphs is not None
    assert runner.kv_block_bytes * 2 == ref_llm.llm_engine.runner.kv_block_bytes
    got = [o.outputs[0].token_ids for o in fp8.generate(ps, greedy, use_tqdm=False)]

    # Greedy picks: a random model's logits have near-ties, where fp8's noise may pick the other token and
    # the texts part ways; so each fp8 pick is scored under the bf16-cache model on the fp8 run's own prefix.
    # Measured with CpuOps' fp8 reference on this shape: 74/80 picks are the bf16 argmax, the worst
    # is 0.75 below it with a logit std of 11 (0.07 std); raw token agreement 0.59.
    agree, worst = 0, 0.0
    for p, g in zip(ps, got):
        ids = p["prompt_token_ids"] + g
        logits = forward_logits(ref_llm.llm_engine.runner, ids).float().cpu()[len(p["prompt_token_ids"]) - 1:-1]
        chosen = logits.gather(-1, torch.tensor(g)[:, None])[:, 0]
        agree += int((logits.argmax(-1) == torch.tensor(g)).sum())
        worst = max(worst, ((logits.max(-1).values - chosen) / logits.std()).max().item())
    total = sum(len(g) for g in got)
    same = sum(a == b for x, y in zip(got, ref) for a, b in zip(x, y)) / total
    print(f"fp8 KV: {agree}/{total} picks are the bf16 cache's argmax, worst {worst:.3f} logit std below; "
          f"raw token agreement {same:.2f}")
    assert agree >= 0.85 * total and worst < 0.2

    # CUDA graphs == eager, batch == one at a time (sampled, seeded)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=12 + i, ignore_eos=True) for i in range(len(ps))]
    together = [o.outputs[0].token_ids for o in fp8.generate(ps, params, use_tqdm=False)]
    alone = [fp8.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(ps, params)]
    assert together == alone
    eager = LLM(str(path), num_kv_blocks=128, kv_cache_dtype="fp8", enforce_eager=True, **common)
    assert [o.outputs[0].token_ids for o in eager.generate(ps, params, use_tqdm=False)] == together
