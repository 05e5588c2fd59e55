"""Programmatic dependent launch (issue 18, FORGE_PDL=1): every kernel's output with PDL equals its output
without, bit for bit, on chains of dependent launches (ours back to back, and cuBLAS / torch kernels between
them), eagerly and replayed from CUDA graphs; a small random Llama decodes the same tokens and logprobs."""

import pytest
import torch

from forge import LLM, SamplingParams
from forge.kernels import compiler
from tests.util import default_tokenizer, make_random_model_dir

pytestmark = pytest.mark.cuda


@pytest.fixture
def pdl():
    """compiler.set_pdl, restored afterwards; skips where PDL cannot run (below sm_90)."""
    before = compiler.pdl_enabled()
    if not compiler.set_pdl(True):
        compiler.set_pdl(before)
        pytest.skip("PDL needs sm_90+ and a CUDA 12.3+ driver")
    yield compiler.set_pdl
    compiler.set_pdl(before)


def replayed(step):
    """step()'s outputs from a CUDA graph of it (captured after a warm-up run, then replayed twice)."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    return outs


def off_and_on(set_pdl, make_step, graph: bool) -> list[list[torch.Tensor]]:
    """The outputs of make_step()'s step (fresh inputs each time) with PDL off, then on."""
    results = []
    for on in (False, True):
        assert set_pdl(on) == on
        step = make_step()
        outs = replayed(step) if graph else step()
        torch.cuda.synchronize()
        assert compiler.pdl_enabled() == on, "a PDL launch was refused and fell back (the log says why)"
        results.append([t.clone() for t in outs])
    return results


def assert_bitwise(results):
    off, on = results
    assert len(off) == len(on)
    for i, (a, b) in enumerate(zip(off, on)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), (i, a, b)


def layer_chain_step(dtype, cache_dtype, steps=12):
    """A decoder layer's kernels, dependent launch after dependent launch: add_rms_norm -> qkv_rope_cache
    (the norm's output is the qkv row) -> paged decode attention (split-K, so + combine) -> silu_mul -> a
    cuBLAS GEMM -> the next step's add_rms_norm; plus rms_norm and gelu_tanh_mul. The cache slots
    written at a step are read by that step's attention."""
    from forge.kernels.activation import gelu_tanh_mul, silu_mul
    from forge.kernels.norm import add_rms_norm, rms_norm
    from forge.kernels.paged_attention import paged_decode_attention
    from forge.kernels.rope_cache import qkv_rope_cache

    h, hkv, d, bs, t = 8, 2, 64, 16, 4
    hidden = (h + 2 * hkv) * d
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    x = torch.randn(t, hidden, generator=g, device=dev).to(dtype)
    res = torch.randn(t, hidden, generator=g, device=dev).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(hidden, generator=g, device=dev)).to(dtype)
    proj = (torch.randn(h * d // 2, hidden, generator=g, device=dev) * 0.05).to(dtype)
    blocks_per_seq = 8
    k_cache = torch.randn(t * blocks_per_seq, bs, hkv, d, generator=g, device=dev).to(cache_dtype)
    v_cache = torch.randn(t * blocks_per_seq, bs, hkv, d, generator=g, device=dev).to(cache_dtype)
    tables = torch.randperm(t * blocks_per_seq, generator=g, device=dev).view(t, blocks_per_seq).to(torch.int32)
    start = torch.tensor([3, 40, 77, 100], device=dev)
    pos = torch.arange(max(4096, blocks_per_seq * bs), device=dev, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float64) / d))
    freqs = pos[:, None] * inv[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()
    # per step: positions, their cache slots, the context lengths after the write
    positions = [start + i for i in range(steps)]
    slots = [tables.gather(1, (p // bs)[:, None]).squeeze(1).long() * bs + p % bs for p in positions]
    ctx = [(p + 1).to(torch.int32) for p in positions]

    def step():
        xs, r = x, res
        outs = []
        for i in range(steps):
            n, r = add_rms_norm(xs, r, norm_w, 1e-6)
            q = qkv_rope_cache(n, positions[i], cos_sin, k_cache, v_cache, slots[i], h, hkv, d)
            o = paged_decode_attention(q, k_cache, v_cache, tables, ctx[i], d ** -0.5, max_context_len=256,
                                       num_splits=4)
            a = silu_mul(o.view(t, h * d)) if i % 2 == 0 else gelu_tanh_mul(o.view(t, h * d))
            xs = rms_norm(a @ proj, norm_w, 1e-6)  # cuBLAS between ours
            outs += [n, q, o, a]
        return [*outs, xs, r, k_cache, v_cache]

    return step


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.float32, torch.float32), (torch.bfloat16, torch.float8_e4m3fn)])
def test_layer_kernels_chain_same_with_pdl(pdl, dtype, cache_dtype, graph):
    assert_bitwise(off_and_on(pdl, lambda: layer_chain_step(dtype, cache_dtype), graph))


def quant_chain_step(kind):
    """quant_gemm back to back with rms_norm (a square weight, so out feeds the next GEMM), the fused
    residual add + RMSNorm + GEMM (rms_norm_linear, with and without the gated epilogue), int4_dequantize and
    fp8_quantize_rows."""
    from forge.kernels import quant_gemm
    from forge.kernels.norm import rms_norm
    from tests.cuda.test_quant_gemm import fp8_layout, int4_layout

    k = 512
    layout = int4_layout(k, k, 128, seed=2) if kind == "int4" else fp8_layout(k, k, 0, seed=2)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(3, k, generator=g, device="cuda").to(torch.bfloat16)
    norm_w = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    square = (torch.randn(k, k, generator=g, device="cuda") * k ** -0.5).to(torch.bfloat16)
    gate_up = (torch.randn(2 * k, k, generator=g, device="cuda") * k ** -0.5).to(torch.bfloat16)
    for weight, act in ((square, None), (gate_up, "silu"), (layout, None)):
        assert quant_gemm.norm_gemm_fits(x, x, norm_w, weight, act)

    def step():
        outs, y, r = [], x, x
        for _ in range(6):
            y = quant_gemm.gemm(y, layout)
            outs.append(y)
            y = rms_norm(y, norm_w, 1e-6)
            y = quant_gemm.gemm(y, layout)
            y, r = quant_gemm.rms_norm_linear(y, r, norm_w, 1e-6, square)
            y, r = quant_gemm.rms_norm_linear(y, r, norm_w, 1e-6, gate_up, act="silu")
            y, r = quant_gemm.rms_norm_linear(y, r, norm_w, 1e-6, layout)
            outs += [y, r]
        codes, scale = quant_gemm.fp8_quantize_rows(y)
        outs += [codes, scale]
        if kind == "int4":
            outs.append(quant_gemm.int4_dequantize(layout, torch.bfloat16))
        return outs

    return step


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_quant_gemm_chain_same_with_pdl(pdl, kind, graph):
    assert_bitwise(off_and_on(pdl, lambda: quant_chain_step(kind), graph))


def sampling_chain_step():
    """The lm_head's logits (cuBLAS), the grammar bitmask, then the seeded draw, twice in a row."""
    from forge.kernels.sampling import sample
    from forge.kernels.token_bitmask import apply_token_bitmask

    b, v = 4, 5000
    g = torch.Generator(device="cuda").manual_seed(3)
    hidden = torch.randn(b, 64, generator=g, device="cuda")
    head = torch.randn(v, 64, generator=g, device="cuda")
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, (v + 31) // 32), generator=g, device="cuda",
                            dtype=torch.int64).to(torch.int32)
    rows = torch.tensor([0, 2], dtype=torch.int32, device="cuda")
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3], device="cuda")
    zeros = torch.zeros(b, device="cuda")
    seeds = torch.arange(b, device="cuda") + 11
    steps = torch.arange(b, device="cuda") * 3

    def step():
        outs = []
        for i in range(2):
            logits = hidden @ head.T
            apply_token_bitmask(logits, bitmask, rows)
            tokens, chosen, _, _ = sample(logits, temperature, torch.zeros(b, dtype=torch.int64, device="cuda"),
                                          zeros + 1, zeros, seeds, steps + i, use_top_k_p=False, use_min_p=False)
            outs += [logits, tokens, chosen]
        return outs

    return step


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_bitmask_and_sampling_same_with_pdl(pdl, graph):
    assert_bitwise(off_and_on(pdl, sampling_chain_step, graph))


def long_producer_step():
    """Dependents of a long kernel: with PDL they launch once every block of the producer has started (its
    trigger follows its wait), i.e. while its last wave still runs; a read before the wait, or through a stale
    non-coherent cache line, would see the previous values. add_rms_norm over 32768 x 4096 rows -> silu_mul and
    the fused norm + GEMM on the rows written last; a D2D copy (a memcpy, not a kernel: a plain edge in the
    graph) between two PDL kernels. The two inputs differ, so stale reads show."""
    from forge.kernels import quant_gemm
    from forge.kernels.activation import silu_mul
    from forge.kernels.norm import add_rms_norm, rms_norm

    t, h = 32768, 4096
    g = torch.Generator(device="cuda").manual_seed(6)
    xs = [torch.randn(t, h, generator=g, device="cuda").to(torch.bfloat16) for _ in range(2)]
    res = torch.randn(t, h, generator=g, device="cuda").to(torch.bfloat16)
    norm_w = (1 + 0.1 * torch.randn(h, generator=g, device="cuda")).to(torch.bfloat16)
    proj = (torch.randn(64, h, generator=g, device="cuda") * h ** -0.5).to(torch.bfloat16)
    copy = torch.empty(t, h, device="cuda", dtype=torch.bfloat16)

    def step():
        outs = []
        for x in xs:
            n, r = add_rms_norm(x, res, norm_w, 1e-6)
            a = silu_mul(n)
            y, r2 = quant_gemm.rms_norm_linear(n[-4:], r[-4:], norm_w, 1e-6, proj)  # rows written last
            copy.copy_(r)
            m = rms_norm(copy, norm_w, 1e-6)
            outs += [a, y, r2, m]
        return outs

    return step


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_dependents_of_a_long_kernel_same_with_pdl(pdl, graph):
    assert_bitwise(off_and_on(pdl, long_producer_step, graph))


def moe_chain_step(num_tokens):
    """route -> align -> gate_up -> down -> sum (moe.cu's five kernels back to back), twice."""
    from forge.kernels import moe

    g = torch.Generator(device="cuda").manual_seed(4)
    hidden, inter, experts, top_k = 256, 128, 16, 4
    x = torch.randn(num_tokens, hidden, generator=g, device="cuda").to(torch.bfloat16)
    router = (torch.randn(experts, hidden, generator=g, device="cuda") * hidden ** -0.5).to(torch.bfloat16)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g, device="cuda") * hidden ** -0.5).to(torch.bfloat16)
    down = (torch.randn(experts, hidden, inter, generator=g, device="cuda") * inter ** -0.5).to(torch.bfloat16)

    def step():
        outs, y = [], x
        for _ in range(2):
            weights, ids = moe.route(y @ router.T, top_k, True)
            y = moe.experts(y, weights, ids, gate_up, down)
            outs += [weights, ids, y]
        return outs

    return step


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("num_tokens", [1, 8])
def test_moe_kernels_same_with_pdl(pdl, num_tokens, graph):
    assert_bitwise(off_and_on(pdl, lambda: moe_chain_step(num_tokens), graph))


# ---- the model ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # SmolLM2-135M's layer shape (GQA 3, head_dim 64), 4 layers
    return make_random_model_dir(tmp_path_factory.mktemp("pdl"), default_tokenizer(), seed=5, hidden_size=576,
                                 intermediate_size=1536, num_layers=4, num_heads=9, num_kv_heads=3, head_dim=64,
                                 tie_word_embeddings=True)


def prompts():
    tok = default_tokenizer()
    texts = ["Once upon a time", "The capital of France is", "def fib(n):", "1, 2, 3, 4,"]
    return [{"prompt_token_ids": tok.encode(t * (i + 1))} for i, t in enumerate(texts)]


def decode(model_dir, **engine_kwargs) -> list[tuple[list[int], list[list[tuple[int, float]]]]]:
    """Greedy tokens and each token's top-5 logprobs (the logits, through log_softmax) of every prompt."""
    llm = LLM(str(model_dir), device="cuda", num_kv_blocks=128, max_num_seqs=8, **engine_kwargs)
    assert (llm.llm_engine.runner.graphs is None) == engine_kwargs.get("enforce_eager", False)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    out = []
    for o in llm.generate(prompts(), params):
        c = o.outputs[0]
        out.append((list(c.token_ids), [sorted((t, lp.logprob) for t, lp in step.items()) for step in c.logprobs]))
    del llm
    torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("quantization", [None, "fp8", "int4"])
def test_model_decodes_the_same_with_pdl(pdl, model_dir, quantization):
    """CUDA graphs, bf16 (quantized: quant_gemm on the decode path): identical tokens and logprobs."""
    kwargs = dict(dtype="bfloat16", quantization=quantization) if quantization else dict(dtype="bfloat16")
    pdl(False)
    off = decode(model_dir, **kwargs)
    pdl(True)
    on = decode(model_dir, **kwargs)
    assert compiler.pdl_enabled(), "a PDL launch was refused and fell back (the log says why)"
    assert on == off


def test_model_with_the_fused_norm_gemm_decodes_the_same_with_pdl(pdl, model_dir, monkeypatch):
    """FORGE_FUSED_NORM_GEMM=1 (rms_norm_linear's kernel after attention's o_proj / the MLP's down GEMM and
    before rope_cache / the down GEMM): identical tokens and logprobs with PDL off and on."""
    from forge.ops.cuda import FUSED_NORM_GEMM_ENV

    monkeypatch.setenv(FUSED_NORM_GEMM_ENV, "1")
    pdl(False)
    off = decode(model_dir, dtype="bfloat16")
    pdl(True)
    on = decode(model_dir, dtype="bfloat16")
    assert compiler.pdl_enabled(), "a PDL launch was refused and fell back (the log says why)"
    assert on == off


def test_model_graphs_equal_eager_with_pdl(pdl, model_dir):
    """With PDL on, decode replayed from graphs == eager decode (float32, as tests/cuda/test_model.py)."""
    pdl(True)
    graphs = decode(model_dir, dtype="float32")
    eager = decode(model_dir, dtype="float32", enforce_eager=True)
    assert compiler.pdl_enabled(), "a PDL launch was refused and fell back (the log says why)"
    assert [tokens for tokens, _ in graphs] == [tokens for tokens, _ in eager]
