"""Quantized CPU weights (forge.quant): exact GGUF block decoding, the kernel layouts against their
dequantized float reference, and the default model on the fast (quantization="auto") path."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from forge import LLM, SamplingParams, native
from forge.quant import Int4Weight, Int8Weight, Q32Weight, keeps_gguf_quantized, quantize_groups
from forge.quant.gguf import decode_blocks
from forge.quant.layouts import GroupQuantized

ROWS, COLS = 80, 512  # 80 rows: not a multiple of the int4 layout's 64-row blocks (padded)


def _k_quant_blocks(qtype: Q, rng) -> np.ndarray:
    """Random K-quant blocks (gguf cannot quantize to them) with sane float16 d / dmin fields."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ROWS * COLS // 256, type_size), dtype=np.uint8)
    f16 = lambda: np.frombuffer(rng.uniform(0.001, 0.05, len(raw)).astype(np.float16).tobytes(), np.uint8).reshape(-1, 2)  # noqa: E731
    if qtype == Q.Q6_K:
        raw[:, -2:] = f16()
    else:  # Q4_K, Q5_K: d, dmin first
        raw[:, 0:2], raw[:, 2:4] = f16(), f16()
    return raw.reshape(ROWS, -1)


def _blocks(qtype: Q, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return _k_quant_blocks(qtype, rng)
    return quantize(rng.standard_normal((ROWS, COLS)).astype(np.float32), qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K])
def test_gguf_blocks_decode_exactly(qtype):
    """GGUF block -> codes + per-32 scale/offset -> float equals the gguf package's dequantization, bit for bit."""
    data = _blocks(qtype)
    g = decode_blocks(qtype, data, (ROWS, COLS))
    ref = torch.from_numpy(dequantize(data, qtype).reshape(ROWS, COLS))
    assert g.codes.dtype == torch.uint8 and int(g.codes.max()) < 2**g.bits
    assert torch.equal(g.dequantize(), ref)


def test_q6_k_requantized_to_8_bits_within_half_a_step():
    """Q6_K (scales per 16 weights) -> 8-bit codes per 32: each weight moves by <= range / 510."""
    data = _blocks(Q.Q6_K)
    ref = torch.from_numpy(dequantize(data, Q.Q6_K).reshape(ROWS, COLS))
    g = decode_blocks(Q.Q6_K, data, (ROWS, COLS))
    groups = ref.view(ROWS, -1, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 255
    err = (g.dequantize() - ref).view(ROWS, -1, 32).abs()
    float32_rounding = 2**-20 * groups.abs().amax(-1)  # of min + scale * q, a few ulps of the group's values
    assert g.bits == 8 and torch.all(err <= (step / 2 + float32_rounding)[..., None])


def _kernel_reference(g: GroupQuantized) -> torch.Tensor:
    """The weight the int4 kernel computes with, from the unpacked codes: (q - 8) * s + z per plane,
    with the (scale, zero) rounded to bfloat16 as the layout stores them."""
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    q, s, o = g.codes.long(), g.scale.repeat_interleave(32, 1), g.offset.repeat_interleave(32, 1)
    if g.bits <= 4:
        return (q - 8) * bf(s) + bf(o + 8 * s)
    hi, lo = q >> 4, q & 15
    return ((hi - 8) * bf(16 * s) + bf(o + 128 * s)) + ((lo - 8) * bf(s) + bf(8 * s))


@pytest.mark.parametrize("bits", [4, 8])
def test_int4_layout_holds_the_codes_and_matmul_matches_its_dequantized_weight(bits):
    g = quantize_groups(torch.randn(ROWS, COLS), bits)
    w = Int4Weight.from_groups(g)
    assert w.planes == (1 if bits == 4 else 2) and w.shape == (ROWS, COLS)
    dq = w.dequantize()
    assert torch.equal(dq, _kernel_reference(g))  # reads the codes back out of torch's packed layout
    assert (dq - g.dequantize()).abs().max() <= 2**-8 * g.dequantize().abs().max()  # bfloat16 scales
    ids = torch.tensor([0, 31, 32, 63, 64, ROWS - 1, 5, 5])
    assert torch.equal(w.rows(ids), dq[ids])  # the embedding gather: those rows only
    _check_matmul(w, dq)


def test_int8_layout_matmul_and_rows():
    weight = torch.randn(ROWS, COLS)
    w = Int8Weight.quantize(weight)
    dq = w.dequantize()
    assert torch.all((dq - weight).abs() <= w.scales.float()[:, None] / 2 * (1 + 1e-6))
    ids = torch.tensor([3, 0, ROWS - 1])
    assert torch.equal(w.rows(ids), dq[ids])
    _check_matmul(w, dq)


def _check_matmul(w, dq: torch.Tensor) -> None:
    """Kernel output vs bfloat16 activations @ the dequantized weight in float64. The kernels take
    bfloat16 activations (exactly representable: no error), accumulate in float32 and round the
    output to bfloat16: |error| <= 2^-9 |y| from the rounding plus float32 accumulation (K * 2^-24 *
    sum |x w|); 2^-8 |y| + 1e-5 sum |x w| leaves a factor of two."""
    x = torch.randn(7, dq.shape[1]).to(torch.bfloat16)
    y = w.matmul(x.float())
    assert y.shape == (7, dq.shape[0]) and y.dtype == torch.bfloat16
    ref = x.double() @ dq.double().t()
    bound = 2**-8 * ref.abs() + 1e-5 * (x.double().abs() @ dq.double().abs().t())
    assert torch.all((y.double() - ref).abs() <= bound)
    assert torch.equal(w.matmul(x[2:3].float()), y[2:3])  # a row's result does not depend on the batch


def test_which_gguf_blocks_stay_quantized():
    from gguf import GGMLQuantizationType as Q

    assert keeps_gguf_quantized("auto", "cpu", sharded=False) is True  # every block format
    assert not keeps_gguf_quantized("none", "cpu", sharded=False)
    assert keeps_gguf_quantized("auto", "cuda", sharded=False) == {Q.Q4_0, Q.Q4_1, Q.Q4_K}  # exact 4-bit repacks
    assert keeps_gguf_quantized("int4", "cuda", sharded=False) == {Q.Q4_0, Q.Q4_1, Q.Q4_K}
    assert not keeps_gguf_quantized("fp8", "cuda", sharded=False)
    assert not keeps_gguf_quantized("auto", "cpu", sharded=True)
    assert not keeps_gguf_quantized("auto", "cuda", sharded=True)


# -- the default model on the fast path ----------------------------------------------------------

@pytest.fixture(scope="module")
def fast_llm():
    return LLM(max_model_len=1024, num_kv_blocks=256)  # quantization="auto" is the default


@pytest.fixture(scope="module")
def gguf_tensors(default_model_path) -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(default_model_path).tensors}


def test_default_model_stays_quantized(fast_llm, gguf_tensors):
    model = fast_llm.llm_engine.runner.model
    layer = model.layers[0]
    matrices = (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
    if native.library() is not None:  # forge's own kernel: Q4_1 as 4-bit codes, Q8_0 as 8-bit
        assert all(isinstance(w, Q32Weight) and w.bits == 4 for w in matrices)
        assert isinstance(model.embed_tokens, Q32Weight) and model.embed_tokens.bits == 8
        assert model.ops.name == "cpu-native"
    else:  # torch's int4 kernel: Q8_0 as two 4-bit planes
        assert all(isinstance(w, Int4Weight) and w.planes == 1 for w in matrices)
        assert isinstance(model.embed_tokens, Int4Weight) and model.embed_tokens.planes == 2
    assert model.lm_head is model.embed_tokens
    float_bytes = sum(int(t.n_elements) * 4 for t in gguf_tensors.values())
    assert model.weight_bytes() < 0.2 * float_bytes  # 102 MB vs 538 MB


def test_quantized_embedding_gather_is_the_q8_0_rows(fast_llm, gguf_tensors):
    model = fast_llm.llm_engine.runner.model
    ids = torch.tensor([0, 1, 63, 64, 4096, 49151, 1])
    rows = model.ops.embedding(ids, model.embed_tokens)
    table = gguf_tensors["token_embd.weight"]
    exact = torch.from_numpy(dequantize(table.data[ids.numpy()], Q.Q8_0).reshape(len(ids), -1))
    assert (rows - exact).abs().max() <= 2**-8 * exact.abs().max()  # bfloat16 scales only


def test_fast_path_generation_smoke(fast_llm):
    out = fast_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def test_fast_path_first_step_logprobs_near_the_exact_reference(fast_llm, reference_cases):
    """HF fp32's top-5 first-step logprobs, seen on the quantized path: within 0.15 nats (measured
    max 0.09), so a greedy pick can only differ on a near-tie ("code": 0.07 nats apart in HF)."""
    outs = fast_llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in reference_cases],
                             SamplingParams(temperature=0, max_tokens=1, logprobs=20), use_tqdm=False)
    for case, out in zip(reference_cases, outs):
        got = out.outputs[0].logprobs[0]
        for token, ref_logprob in case["top5_logprobs"][0]:
            assert abs(got[token].logprob - ref_logprob) < 0.15, (case["name"], token)


def test_fast_path_batch_equals_sequential(fast_llm):
    prompts = ["The capital of France is", "def fib(n):", "Three colors: red,", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [fast_llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in fast_llm.generate(prompts, params, use_tqdm=False)]
    assert alone == together


def test_decode_attention_row_is_bit_identical_alone_and_in_a_batch():
    """What batch == sequential rests on besides the row-independent kernels: a sequence's decode
    attention does not change, not even in the last bit, with the other contexts in its batch (near
    ties in greedy or top-p picks flip on 1e-7)."""
    from forge.ops.cpu import CpuOps
    from forge.ops.metadata import AttentionMetadata

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, bs = 9, 3, 64, 16
    lens = [7, 300, 33, 16, 129, 1]
    width = max(-(-n // bs) for n in lens)
    k_cache = torch.randn(len(lens) * width + 1, bs, kv_heads, d, generator=g)
    v_cache = torch.randn(len(lens) * width + 1, bs, kv_heads, d, generator=g)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, n in enumerate(lens):
        tables[i, : -(-n // bs)] = torch.arange(-(-n // bs)) + 1 + i * width
    q = torch.randn(len(lens), heads, d, generator=g)

    def meta(rows):
        ctx = [lens[i] for i in rows]
        return AttentionMetadata(
            positions=torch.tensor([n - 1 for n in ctx]), slot_mapping=torch.zeros(len(rows), dtype=torch.long),
            query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32), context_lens=torch.tensor(ctx, dtype=torch.int32),
            block_tables=tables[rows][:, : max(-(-n // bs) for n in ctx)], max_query_len=1, max_context_len=max(ctx),
            query_lens_cpu=[1] * len(rows), context_lens_cpu=ctx)

    together = CpuOps().attention(q, k_cache, v_cache, meta(list(range(len(lens)))), 0.125)
    for i, n in enumerate(lens):
        assert torch.equal(CpuOps().attention(q[i : i + 1], k_cache, v_cache, meta([i]), 0.125), together[i : i + 1])
        # ... nor in a step that also holds a prefill (the per-sequence path)
        blocks = tables[i, : -(-n // bs)].long()
        k, v = k_cache[blocks].flatten(0, 1)[:n], v_cache[blocks].flatten(0, 1)[:n]
        assert torch.equal(CpuOps._causal_attention(q[i : i + 1], k, v, heads // kv_heads, 0.125), together[i : i + 1])


# -- float checkpoints quantized at load, KV-cache size, threads, CLI --------------------------------

@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_float_checkpoint_quantized_at_load(tiny_model_dir, mode):
    """An HF float32 directory with --quantization int8/int4: the matrices get a quantized layout
    (int4: the decoder's; the embedding / lm_head int8) and the logits stay near the float model's."""
    from tests.util import forward_logits

    ids = list(range(100, 140))
    ref = forward_logits(LLM(str(tiny_model_dir), num_kv_blocks=16).llm_engine.runner, ids)
    llm = LLM(str(tiny_model_dir), num_kv_blocks=16, quantization=mode)
    model = llm.llm_engine.runner.model
    if native.library() is not None:  # forge's kernel: 8 or 4 bits per 32 inputs, the embedding 8 bits
        bits = 8 if mode == "int8" else 4
        assert all(isinstance(w, Q32Weight) and w.bits == bits for w in (model.layers[0].gate_up_proj, model.layers[1].qkv_proj))
        assert all(isinstance(w, Q32Weight) and w.bits == 8 for w in (model.embed_tokens, model.lm_head))
    else:
        layout = Int8Weight if mode == "int8" else Int4Weight
        assert isinstance(model.layers[0].gate_up_proj, layout) and isinstance(model.layers[1].qkv_proj, layout)
        assert isinstance(model.embed_tokens, Int8Weight) and isinstance(model.lm_head, Int8Weight)
    got = forward_logits(llm.llm_engine.runner, ids)
    # int8: a step of max|row| / 127; int4: (max - min) / 15 per 32 inputs (measured: 0.9% / 4% of the logits' spread)
    tolerance = {"int8": 0.03, "int4": 0.12}[mode] * (ref.max() - ref.min())
    assert (got - ref).abs().max() < tolerance
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_kv_cache_memory_sizes_the_cpu_cache(tiny_model_dir):
    runner = LLM(str(tiny_model_dir), kv_cache_memory="1MiB").llm_engine.runner
    assert runner.num_kv_blocks == 2**20 // runner.kv_block_bytes
    runner = LLM(str(tiny_model_dir), max_model_len=256, max_num_seqs=3).llm_engine.runner  # the default:
    assert runner.num_kv_blocks == 256 * 3 // runner.block_size  # max_model_len x min(max_num_seqs, 4) tokens
    runner = LLM(str(tiny_model_dir), max_model_len=256).llm_engine.runner
    assert runner.num_kv_blocks == 256 * 4 // runner.block_size


def test_cpu_kv_cache_pages_are_resident_only_once_used(tiny_model_dir):
    """2 GiB of KV cache costs no resident memory until sequences write into it."""
    def rss_mb() -> float:
        line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    before = rss_mb()
    llm = LLM(str(tiny_model_dir), kv_cache_memory="2GiB", max_model_len=2048, max_num_seqs=4096)
    assert llm.llm_engine.runner.num_kv_blocks * llm.llm_engine.runner.kv_block_bytes > 2**30
    assert rss_mb() - before < 300  # the tiny model is 13 MB; the cache would be 2048 MB
    out = llm.generate([{"prompt_token_ids": list(range(100, 130))}] * 3, SamplingParams(max_tokens=8, temperature=0),
                       use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)


def test_threads_option_sets_torch_threads(tiny_model_dir):
    before = torch.get_num_threads()
    try:
        LLM(str(tiny_model_dir), num_kv_blocks=16, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cli_quantization_threads_and_kv_cache_memory_flags():
    from forge.cli import build_parser, engine_config

    args = build_parser().parse_args(["generate", "hi", "--quantization", "none", "--threads", "1",
                                      "--kv-cache-memory", "512MiB"])
    config = engine_config(args)
    assert (config.quantization, config.threads, config.kv_cache_memory) == ("none", 1, 512 * 2**20)
    assert engine_config(build_parser().parse_args(["generate", "hi"])).quantization == "auto"


def test_step_values_follow_refilled_input_buffers():
    """CpuOps computes a step's RoPE rows and fresh blocks once for all layers; the model runner refills
    the same input buffers every step, so a refilled buffer must give the new values, not the memo."""
    from forge.ops.cpu import CpuOps

    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d, bs = 4, 2, 16, 16
    cos_sin = torch.randn(64, d, generator=g)
    qkv = torch.randn(2, (heads + 2 * kv_heads) * d, generator=g)
    positions, slots = torch.tensor([3, 4]), torch.tensor([3, 4])
    ops = CpuOps()

    def run(ops):
        caches = torch.ones(4, bs, kv_heads, d), torch.ones(4, bs, kv_heads, d)
        q = ops.qkv_rope_cache(qkv, positions, cos_sin, *caches, slots, heads, kv_heads, d)
        return q, caches

    run(ops)
    positions[:] = torch.tensor([16, 17])  # the next step, in the same buffers: block 1 starts at slot 16
    slots[:] = torch.tensor([16, 17])
    (q, (k, v)), (q_ref, (k_ref, v_ref)) = run(ops), run(CpuOps())
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert torch.all(k[1, 2:] == 0)  # block 1 was zeroed before its first write


def test_int8_quantization_of_a_matrix_whose_inputs_are_not_a_multiple_of_32():
    """int8 takes any width: 32-input groups (the native kernel) where they fit, else one scale per
    row (Int8Weight), not an error."""
    from forge.quant import runtime_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    q = runtime_weight([w], "int8", torch.device("cpu"), torch.float32)
    x = torch.randn(3, 48, generator=g)
    # per-row int8: each weight within amax / 254 (~0.013 here), a 48-term dot within ~0.1; bfloat16 output
    torch.testing.assert_close(q.matmul(x).float(), x @ w.T, rtol=0.02, atol=0.15)
