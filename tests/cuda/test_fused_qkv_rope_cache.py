"""quant_gemm.cu's ROPE_HEAD_DIM variant: ops.rms_norm_qkv_rope_cache in one launch (residual add + RMSNorm, the qkv
GEMM, neox RoPE, the KV-cache write).

Bit for bit against the two launches it replaces: quant_gemm.rms_norm_linear (the same per-row sums: a row's MMAs
do not depend on the tile shape) and rope_cache.qkv_rope_cache on that output (the same rotation and roundings):
q, residual_out and every byte of both caches (a slot of -1 writes nothing; other slots are left as they were);
GQA shapes of the 135M / 1B / 8B models at 1..8 tokens, bf16 / fp16, caches of x's dtype and float8 with scales,
int4 / fp8 weight layouts, a CUDA graph. Against CpuOps' qkv_rope_cache of the same qkv: rope_cache's tolerance
(test_kernels.py), v exactly. The decoder with FORGE_FUSED_NORM_GEMM=1: the same logprobs as with only
rms_norm_linear fused (rope_cache_fits refused), and the same greedy tokens as the default path."""

import functools

import pytest
import torch

from forge import LLM, SamplingParams
from forge.kernels import quant_gemm, rope_cache
from forge.ops.cpu import FP8_KV, CpuOps
from forge.ops.cuda import FUSED_NORM_GEMM_ENV, CudaOps
from forge.quant.cuda import Fp8CudaWeight, Int4CudaWeight
from tests.cuda.test_fused_norm_gemm import assert_same_greedy
from tests.cuda.test_kernels import TOL, cos_sin_cache, rel_err
from tests.util import default_tokenizer, make_random_model_dir

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")
EPS = 1e-5
SHAPES = {"135M": (576, 9, 3, 64), "1B": (2048, 32, 8, 64), "8B": (4096, 32, 8, 128)}  # hidden, H, Hkv, D
BLOCKS, BLOCK_SIZE = 16, 16


@functools.cache
def cos_sin(d: int) -> torch.Tensor:
    return cos_sin_cache(4096, d).to(DEV)


def operands(m, shape, dtype, cache_dtype, seed=0, residual=True):
    hidden_size, heads, kv_heads, d = shape
    g = torch.Generator(device=DEV).manual_seed(seed)
    hidden = torch.randn(m, hidden_size, generator=g, device=DEV).to(dtype)
    res = (torch.randn(m, hidden_size, generator=g, device=DEV) * 4).to(dtype) if residual else None
    norm_weight = (1 + 0.2 * torch.randn(hidden_size, generator=g, device=DEV)).to(dtype)
    weight = (torch.randn((heads + 2 * kv_heads) * d, hidden_size, generator=g, device=DEV)
              * hidden_size ** -0.5).to(dtype)
    positions = torch.randint(0, 4000, (m,), generator=g, device=DEV)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=g, device=DEV)[:m]
    if m > 1:
        slots[1] = -1  # a padded token of a captured batch: rotated into q, written nowhere
    k_cache = torch.randn(BLOCKS, BLOCK_SIZE, kv_heads, d, generator=g, device=DEV).to(cache_dtype)
    v_cache = torch.randn(BLOCKS, BLOCK_SIZE, kv_heads, d, generator=g, device=DEV).to(cache_dtype)
    return dict(hidden=hidden, residual=res, norm_weight=norm_weight, weight=weight, positions=positions,
                cos_sin=cos_sin(d), slots=slots, k_cache=k_cache, v_cache=v_cache, heads=heads,
                kv_heads=kv_heads, d=d)


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_KV else t


def fused(o, scales=(1.0, 1.0), weight=None, **config):
    return quant_gemm.rms_norm_qkv_rope_cache(
        o["hidden"], o["residual"], o["norm_weight"], EPS, o["weight"] if weight is None else weight,
        o["positions"], o["cos_sin"], o["k_cache"], o["v_cache"], o["slots"], o["heads"], o["kv_heads"], o["d"],
        *scales, **config)


def two_launches(o, k_cache, v_cache, scales=(1.0, 1.0), weight=None):
    """What the fused kernel replaces: rms_norm_linear's qkv, then rope_cache.cu -> (q, residual_out, qkv)."""
    qkv, res = quant_gemm.rms_norm_linear(o["hidden"], o["residual"], o["norm_weight"], EPS,
                                          o["weight"] if weight is None else weight)
    q = rope_cache.qkv_rope_cache(qkv, o["positions"], o["cos_sin"], k_cache, v_cache, o["slots"], o["heads"],
                                  o["kv_heads"], o["d"], *scales)
    return q, res, qkv


def assert_same_as_two_launches(o, scales=(1.0, 1.0), weight=None):
    k_before, v_before = o["k_cache"].clone(), o["v_cache"].clone()
    k_ref, v_ref = o["k_cache"].clone(), o["v_cache"].clone()
    q, res = fused(o, scales, weight)
    q_ref, res_ref, _ = two_launches(o, k_ref, v_ref, scales, weight)
    assert q.shape == (o["hidden"].shape[0], o["heads"], o["d"]) and q.dtype == o["hidden"].dtype
    assert torch.equal(q, q_ref) and torch.equal(res, res_ref)
    assert torch.equal(raw(o["k_cache"]), raw(k_ref)) and torch.equal(raw(o["v_cache"]), raw(v_ref))
    untouched = torch.ones(BLOCKS * BLOCK_SIZE, dtype=torch.bool, device=DEV)
    untouched[o["slots"][o["slots"] >= 0]] = False
    for after, before in ((o["k_cache"], k_before), (o["v_cache"], v_before)):
        assert torch.equal(raw(after).flatten(0, 1)[untouched], raw(before).flatten(0, 1)[untouched])
        assert not torch.equal(raw(after), raw(before))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("m", range(1, 9))
def test_fused_equals_rms_norm_linear_then_rope_cache(dtype, fp8, name, m):
    o = operands(m, SHAPES[name], dtype, FP8_KV if fp8 else dtype, seed=m)
    assert quant_gemm.rope_cache_fits(o["hidden"], o["residual"], o["norm_weight"], o["weight"], o["cos_sin"],
                                      o["k_cache"], o["v_cache"], o["heads"], o["kv_heads"], o["d"])
    assert_same_as_two_launches(o, (0.6, 1.7) if fp8 else (1.0, 1.0))


@pytest.mark.parametrize("m", [1, 3, 8])
def test_first_layer_without_a_residual(m):
    o = operands(m, SHAPES["1B"], torch.bfloat16, torch.bfloat16, residual=False)
    assert_same_as_two_launches(o)
    assert fused(o)[1] is o["hidden"]


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_quantized_weights(kind):
    """int4 / fp8 layouts: the same sums as rms_norm_linear's launch of the layout (fp8: there 1 row tile x 4
    chunks, here 2 x 2; a row's MMAs are the same sequence), then the same rotation."""
    for m in (1, 4, 8):
        o = operands(m, SHAPES["1B"], torch.bfloat16, torch.bfloat16, seed=m)
        layout = (Int4CudaWeight if kind == "int4" else Fp8CudaWeight).quantize(o["weight"].float())
        assert quant_gemm.rope_cache_fits(o["hidden"], o["residual"], o["norm_weight"], layout, o["cos_sin"],
                                          o["k_cache"], o["v_cache"], o["heads"], o["kv_heads"], o["d"])
        assert_same_as_two_launches(o, weight=layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("m", [1, 5, 8])
def test_against_cpu_ops_on_the_kernels_qkv(dtype, name, m):
    """CpuOps.qkv_rope_cache of the fused kernel's qkv (rms_norm_linear's, bit for bit as above): q and k within
    rope_cache's tolerance of CpuOps (float32 rotations whose contractions differ), v copied exactly."""
    o = operands(m, SHAPES[name], dtype, dtype, seed=10 + m)
    k_orig, v_orig = o["k_cache"].cpu(), o["v_cache"].cpu()
    q, _ = fused(o)
    _, _, qkv = two_launches(o, o["k_cache"].clone(), o["v_cache"].clone())
    keep = (o["slots"] >= 0).cpu()
    qkv, positions, slots = qkv.cpu(), o["positions"].cpu(), o["slots"].cpu()
    heads, kv_heads, d = o["heads"], o["kv_heads"], o["d"]
    cpu, table = CpuOps(), o["cos_sin"].cpu()
    q_ref = cpu.qkv_rope_cache(qkv, positions, table, k_orig.clone(), v_orig.clone(), torch.arange(m), heads,
                               kv_heads, d)
    k_ref, v_ref = k_orig.clone(), v_orig.clone()
    cpu.qkv_rope_cache(qkv[keep], positions[keep], table, k_ref, v_ref, slots[keep], heads, kv_heads, d)
    assert rel_err(q, q_ref) < TOL[dtype]
    rows = slots[keep]

    def written(cache):
        return cache.cpu().flatten(0, 1)[rows]

    assert rel_err(written(o["k_cache"]), written(k_ref)) < TOL[dtype]
    assert torch.equal(written(o["v_cache"]), written(v_ref))


def test_in_a_cuda_graph():
    """Captured once, replayed with the next step's hidden states, positions and slots: as eager."""
    o = operands(4, SHAPES["135M"], torch.bfloat16, torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fused(o)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, res = fused(o)
    nxt = operands(4, SHAPES["135M"], torch.bfloat16, torch.bfloat16, seed=9)
    for key in ("hidden", "residual", "positions", "slots"):
        o[key].copy_(nxt[key])
    k_eager, v_eager = o["k_cache"].clone(), o["v_cache"].clone()
    eager = dict(o, k_cache=k_eager, v_cache=v_eager)
    q_eager, res_eager = fused(eager)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(q, q_eager) and torch.equal(res, res_eager)
    assert torch.equal(o["k_cache"], k_eager) and torch.equal(o["v_cache"], v_eager)


def test_cuda_ops_takes_the_kernel_only_where_it_fits(monkeypatch):
    monkeypatch.setenv(FUSED_NORM_GEMM_ENV, "1")
    ops = CudaOps()
    calls = []
    kernel = quant_gemm.rms_norm_qkv_rope_cache
    monkeypatch.setattr(quant_gemm, "rms_norm_qkv_rope_cache",
                        lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    for m, cos_dtype, expect in ((1, torch.float32, True), (8, torch.float32, True), (9, torch.float32, False),
                                 (2, torch.float64, False)):
        o = operands(m, SHAPES["1B"], torch.bfloat16, torch.bfloat16)
        o["cos_sin"] = o["cos_sin"].to(cos_dtype)
        calls.clear()
        ops.rms_norm_qkv_rope_cache(o["hidden"], o["residual"], o["norm_weight"], EPS, o["weight"], o["positions"],
                                    o["cos_sin"], o["k_cache"], o["v_cache"], o["slots"], o["heads"], o["kv_heads"],
                                    o["d"])
        assert bool(calls) == expect, (m, cos_dtype)


@pytest.fixture(scope="module", params=[64, 128])
def model_dir(request, tmp_path_factory):
    d = request.param
    return make_random_model_dir(tmp_path_factory.mktemp(f"rope{d}"), default_tokenizer(), seed=7, hidden_size=512,
                                 intermediate_size=1408, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=d)


def generate(model_dir, monkeypatch, fused_on: bool, prompts, kv_cache_dtype="auto", enforce_eager=False):
    monkeypatch.setenv(FUSED_NORM_GEMM_ENV, "1" if fused_on else "0")
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", num_kv_blocks=128, max_num_seqs=8,
              kv_cache_dtype=kv_cache_dtype, enforce_eager=enforce_eager)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    out = [o.outputs[0] for o in llm.generate(prompts, params)]
    del llm
    torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_decoder_with_the_fused_rope(model_dir, monkeypatch, kv_cache_dtype):
    """Batch 4, CUDA graphs and eager: fusing RoPE + the cache write changes nothing against rms_norm_linear's kernel
    + rope_cache.cu (the same tokens and logprobs), and picks the default path's greedy tokens."""
    tok = default_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(t)} for t in ("Once upon a time", "def fib(n):", "1, 2, 3,", "Hi")]
    calls = []
    kernel = quant_gemm.rms_norm_qkv_rope_cache
    monkeypatch.setattr(quant_gemm, "rms_norm_qkv_rope_cache",
                        lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    base = generate(model_dir, monkeypatch, False, prompts, kv_cache_dtype)
    assert not calls
    for eager in (False, True):
        with monkeypatch.context() as m:
            m.setattr(quant_gemm, "rope_cache_fits", lambda *a: False)
            norm_only = generate(model_dir, monkeypatch, True, prompts, kv_cache_dtype, eager)
        calls.clear()
        out = generate(model_dir, monkeypatch, True, prompts, kv_cache_dtype, eager)
        assert calls  # (in a graph: at capture)
        for a, b, c in zip(out, norm_only, base):
            assert a.token_ids == b.token_ids
            assert [{t: lp.logprob for t, lp in s.items()} for s in a.logprobs] == \
                   [{t: lp.logprob for t, lp in s.items()} for s in b.logprobs]
            assert_same_greedy(a, c)
