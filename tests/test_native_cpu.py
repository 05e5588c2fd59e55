"""forge's own CPU kernels (forge/native): the Q32 weight layout and its VNNI matmul against the
dequantized float reference, and the native per-layer ops against CpuOps (the reference)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from forge import native
from forge.ops.cpu import CpuOps
from forge.ops.metadata import AttentionMetadata
from forge.quant import GroupQuantized, Int4Weight, Q32Weight, pack, quantize_groups
from forge.quant.gguf import decode_blocks

lib = native.library()
pytestmark = pytest.mark.skipif(lib is None, reason=f"native CPU kernels unavailable: {native.why_unavailable()}")

ROWS, COLS = 72, 576  # 72 rows: not a multiple of the 16-row tile; 576 = 18 groups


def _f16_scales(g: GroupQuantized) -> GroupQuantized:
    """g with its scales and offsets rounded to float16, as Q32Weight stores them."""
    return GroupQuantized(g.codes, g.scale.half().float(), g.offset.half().float(), g.bits)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_gguf_block_to_q32_to_float_equals_gguf_dequantization(qtype):
    """The exact formats (float16 scales already): GGUF block -> Q32 layout -> float is the gguf
    package's dequantization, bit for bit, for whole tensors and for gathered rows."""
    data = quantize(np.random.default_rng(0).standard_normal((ROWS, COLS)).astype(np.float32), qtype)
    w = pack(decode_blocks(qtype, data, (ROWS, COLS)))
    assert isinstance(w, Q32Weight) and w.bits == (4 if qtype in (Q.Q4_0, Q.Q4_1) else 8)
    ref = torch.from_numpy(dequantize(data, qtype).reshape(ROWS, COLS))
    assert torch.equal(w.dequantize(), ref)
    ids = torch.tensor([0, 15, 16, ROWS - 1, 3, 3])
    assert torch.equal(w.rows(ids), ref[ids])
    with pytest.raises(IndexError):
        w.rows(torch.tensor([ROWS]))


def _activation_bound(x: torch.Tensor, g: GroupQuantized) -> torch.Tensor:
    """|kernel - x @ W.T| bound [M, N]. The kernel rounds x to int8 per 32 inputs (step dx = max|x| /
    127, error <= dx / 2 each) and uses x's exact group sums for the offsets, so the error is at most
    sum over groups of |scale| * dx / 2 * sum |q|, plus float32 rounding (1e-5 of sum |w x|)."""
    m, k = x.shape
    xg = x.double().view(m, -1, 32)
    dx = xg.abs().amax(-1) / 127  # [M, G]
    qsum = g.codes.double().view(g.shape[0], -1, 32).sum(-1)  # [N, G]
    quant = (dx / 508) @ (g.scale.double().abs() * qsum).t()
    w = g.dequantize().double()
    return quant + 1e-5 * (x.double().abs() @ w.abs().t()) + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 5, 16, 37])
def test_q32_matmul_within_the_int8_activation_bound(bits, m):
    g = _f16_scales(quantize_groups(torch.randn(ROWS, COLS), bits))
    w = pack(g)
    assert isinstance(w, Q32Weight) and w.shape == (ROWS, COLS)
    x = torch.randn(m, COLS) * torch.rand(m, 1) * 4
    y = w.matmul(x)
    assert y.shape == (m, ROWS) and y.dtype == torch.float32
    ref = x.double() @ g.dequantize().double().t()
    err = (y.double() - ref).abs()
    assert torch.all(err <= _activation_bound(x, g))
    assert err.max() > 0  # the activations really are quantized (else the bound tests nothing)
    for i in (0, m - 1):  # a row's result does not depend on its batch
        assert torch.equal(w.matmul(x[i : i + 1]), y[i : i + 1])


def test_q32_matmul_threads_give_identical_results():
    g = _f16_scales(quantize_groups(torch.randn(256, 1536), 4))
    w, x = pack(g), torch.randn(3, 1536)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = w.matmul(x)
        torch.set_num_threads(2)
        two = w.matmul(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_fallback_to_torch_kernels_without_the_library(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    assert isinstance(pack(quantize_groups(torch.randn(64, 64), 4)), Int4Weight)


def test_library_unavailable_says_why(tmp_path):
    """No compiler (here: one that fails) -> no library, a reason, and forge still runs (torch kernels)."""
    env = {**os.environ, "FORGE_CACHE_DIR": str(tmp_path), "CXX": "false"}
    code = ("from forge import native; from forge.quant import pack, quantize_groups; import torch; "
            "print(native.library() is None, native.why_unavailable(), "
            "type(pack(quantize_groups(torch.randn(64, 64), 4))).__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("True false failed") and out.strip().endswith("Int4Weight")
    env = {**os.environ, "FORGE_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "FORGE_NATIVE=0" in out


# -- the per-layer ops against CpuOps ------------------------------------------------------------

@pytest.fixture
def ops():
    from forge.ops.cpu_native import NativeCpuOps

    return NativeCpuOps(lib), CpuOps()


def test_norms_and_silu_mul_match_the_reference(ops):
    fast, ref = ops
    x, r, w = torch.randn(5, 200), torch.randn(5, 200), torch.randn(200)  # 200: not a multiple of 16
    torch.testing.assert_close(fast.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    for got, want in zip(fast.add_rms_norm(x, r, w, 1e-6), ref.add_rms_norm(x, r, w, 1e-6)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    gate_up = torch.randn(3, 2 * 72) * 6
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -88.5])  # exp's clamps
    torch.testing.assert_close(fast.silu_mul(gate_up), ref.silu_mul(gate_up), rtol=1e-5, atol=1e-6)


def _cache(blocks=12, bs=16, kv_heads=2, d=64):
    return torch.randn(blocks, bs, kv_heads, d), torch.randn(blocks, bs, kv_heads, d)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_qkv_rope_cache_matches_the_reference(ops, cache_dtype):
    """q in float32; k and v in their cache slots, rounded to the cache's dtype (float16: the
    fast path's cache, NativeCpuOps.kv_cache_dtype); blocks whose first slot is written are zeroed."""
    fast, ref = ops
    heads, kv_heads, d, bs = 6, 2, 64, 16
    qkv = torch.randn(4, (heads + 2 * kv_heads) * d)
    positions = torch.tensor([0, 17, 31, 5])
    slots = torch.tensor([16, 33, 47, 64])  # slot 16 and 64 start blocks: zeroed first
    angles = torch.arange(64)[:, None] * torch.rand(d // 2)
    cos_sin = torch.cat([angles.cos(), angles.sin()], -1)
    k_cache, v_cache = (c.to(cache_dtype) for c in _cache(bs=bs, kv_heads=kv_heads, d=d))
    caches = [(k_cache, v_cache), (k_cache.clone(), v_cache.clone())]
    q_fast = fast.qkv_rope_cache(qkv, positions, cos_sin, *caches[0], slots, heads, kv_heads, d)
    q_ref = ref.qkv_rope_cache(qkv, positions, cos_sin, *caches[1], slots, heads, kv_heads, d)
    assert q_fast.dtype == torch.float32
    torch.testing.assert_close(q_fast, q_ref.float(), **(dict(rtol=1e-5, atol=1e-6) if cache_dtype == torch.float32
                                                         else dict(rtol=1e-3, atol=1e-3)))  # (q_ref: float16)
    for got, want in zip(caches[0], caches[1]):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5 if cache_dtype == torch.float32 else 1e-3,
                                   atol=1e-6 if cache_dtype == torch.float32 else 1e-3)
    assert torch.equal(caches[0][0][1, 1:], torch.zeros_like(caches[0][0][1, 1:]))  # block 1 zeroed, then slot 16 written


def _meta(query_lens, context_lens, tables):
    return AttentionMetadata(
        positions=torch.zeros(sum(query_lens), dtype=torch.long), slot_mapping=torch.zeros(sum(query_lens), dtype=torch.long),
        query_start_loc=torch.tensor([0, *np.cumsum(query_lens)], dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32), block_tables=tables, max_query_len=max(query_lens),
        max_context_len=max(context_lens), query_lens_cpu=list(query_lens), context_lens_cpu=list(context_lens))


@pytest.mark.parametrize("d, heads, kv_heads", [(64, 9, 3), (128, 4, 4), (80, 8, 2), (64, 20, 2)])
@pytest.mark.parametrize("window, soft_cap", [(None, None), (20, None), (None, 30.0)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_decode_attention_matches_the_reference(ops, d, heads, kv_heads, window, soft_cap, cache_dtype):
    fast, ref = ops
    bs, lens = 16, [1, 40, 16, 77, 0]
    k_cache, v_cache = (c.to(cache_dtype) for c in _cache(blocks=30, kv_heads=kv_heads, d=d))
    k_cache[0], v_cache[0] = 0, 0  # block 0: the runner's zeroed padding block
    tables = torch.zeros(len(lens), 5, dtype=torch.int32)
    for i, n in enumerate(lens):
        tables[i, : -(-n // bs)] = torch.arange(1, 1 + -(-n // bs)) + 5 * i
    q = torch.randn(len(lens), heads, d)
    args = (k_cache, v_cache, _meta([1] * len(lens), lens, tables), d**-0.5, window, soft_cap)
    got, want = fast.attention(q, *args), ref.attention(q, *args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    assert torch.equal(got[4], torch.zeros(heads, d))  # no context: attends to nothing


def test_mixed_step_decode_rows_equal_a_decode_only_step(ops):
    """A decode row gives the same bits whether its step also holds a prefill (batch == sequential)."""
    fast, ref = ops
    k_cache, v_cache = _cache(blocks=20)
    tables = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0]], dtype=torch.int32)
    q = torch.randn(1 + 7 + 1, 6, 64)
    mixed = fast.attention(q, k_cache, v_cache, _meta([1, 7, 1], [40, 20, 9], tables), 0.125)
    alone = fast.attention(q[[0, 8]], k_cache, v_cache, _meta([1, 1], [40, 9], tables[[0, 2]]), 0.125)
    assert torch.equal(mixed[[0, 8]], alone)
    torch.testing.assert_close(mixed, ref.attention(q, k_cache, v_cache, _meta([1, 7, 1], [40, 20, 9], tables), 0.125),
                               rtol=1e-5, atol=2e-6)


# -- every model family on the fast path ---------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral-window", "qwen2", "qwen3", "gemma2", "gemma3", "phi3-long"])
def test_families_run_the_native_ops_like_the_reference_ops(family, tmp_path, monkeypatch):
    """Each family's quantized model (int8 at load) decodes the same with NativeCpuOps as with CpuOps
    on the same weights: biases, q/k norms, windows, soft-caps, GeGLU, LongRoPE pass through the
    native ops or their fallbacks. (A float32 KV cache here; the float16 cache is checked op by op
    above.) The two differ by float32 rounding, which can move an activation's int8 code across a
    rounding boundary in the next matmul (a step of dx / 508): measured up to 8e-4 nats; a missing
    window or soft-cap moves these logits by 6-11."""
    import forge.engine.model_runner as model_runner
    from forge import SamplingParams
    from forge.ops import get_ops
    from tests.test_families import Case
    from tests.util import default_tokenizer

    case = Case(family, tmp_path, default_tokenizer())
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    prompt = [{"prompt_token_ids": case.prompt}]

    def run():
        out = case.engine(quantization="int8").generate(prompt, params, use_tqdm=False)[0].outputs[0]
        return out.token_ids, [{t: lp.logprob for t, lp in step.items()} for step in out.logprobs]

    from forge.ops.cpu_native import NativeCpuOps

    monkeypatch.setattr(NativeCpuOps, "kv_cache_dtype", torch.float32)
    fast_tokens, fast_logprobs = run()
    monkeypatch.setattr(model_runner, "get_ops", lambda device, quantized=False: get_ops(device))
    ref_tokens, ref_logprobs = run()
    assert fast_tokens == ref_tokens
    for fast, ref in zip(fast_logprobs, ref_logprobs):
        assert fast.keys() == ref.keys(), (fast, ref)
        assert max(abs(fast[t] - ref[t]) for t in ref) < 5e-3


def test_thread_budget_takes_every_core_only_while_the_machine_is_idle(monkeypatch):
    """--threads fixes the count; by default the native kernels use every physical core while other
    processes take less than a quarter core, one fewer as soon as they take more (a parallel region
    waits for a descheduled thread: 2 threads ran 2-2.5x slower than 1 next to one busy process)."""
    from forge.native import threads

    clock = {"now": 100.0, "machine": 50.0, "own": 10.0}
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(threads.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(threads, "_machine_busy_seconds", lambda: clock["machine"])
    assert threads.ThreadBudget(3, cores=2).threads() == 3
    budget = threads.ThreadBudget(None, cores=2)
    assert budget.threads() == 1  # not measured yet: as if busy

    def tick(own: float, others: float) -> int:
        clock["now"] += 1.0
        clock["own"] += own
        clock["machine"] += own + others
        return budget.threads()

    assert tick(own=1.0, others=0.05) == 2  # only this process works: every core
    assert tick(own=1.9, others=0.9) == 1  # another process took most of a core
    assert tick(own=1.0, others=0.1) == 2
    assert threads.ThreadBudget(None, cores=1).threads() == 1
