"""forge's CUDA kernels against the CpuOps reference (run on the GPU machine: pytest -m cuda)."""

import math

import pytest
import torch

from forge.ops.cpu import CpuOps
from forge.ops.metadata import AttentionMetadata

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CPU = CpuOps()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def poison_allocator(nbytes: int = 256 << 20) -> None:
    """Fill free cached blocks with NaN so an output the kernel forgets to write shows up."""
    buf = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    buf.fill_(float("nan"))
    del buf


def cuda_ops():
    from forge.ops.cuda import CudaOps

    return CudaOps()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- silu_mul ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("inter", [1536, 4100, 1001])
def test_silu_mul(dtype, t, inter):
    from forge.kernels.activation import silu_mul

    x = (torch.randn(t, 2 * inter, generator=gen(t + inter)) * 3).to(dtype)
    ref = CPU.silu_mul(x)
    out = torch.full((t, inter), float("nan"), dtype=dtype, device="cuda")
    silu_mul(x.cuda(), out=out)
    assert rel_err(out, ref) < TOL[dtype]
    poison_allocator()
    assert rel_err(cuda_ops().silu_mul(x.cuda()), ref) < TOL[dtype]


# ---- rms_norm / add_rms_norm ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("hidden", [576, 4096, 1001])
def test_rms_norm(dtype, t, hidden):
    g = gen(hidden + t)
    x = torch.randn(t, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    ref = CPU.rms_norm(x, w, 1e-6)
    poison_allocator()
    out = cuda_ops().rms_norm(x.cuda(), w.cuda(), 1e-6)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("hidden", [576, 4096, 1001])
def test_add_rms_norm(dtype, t, hidden):
    g = gen(hidden * 3 + t)
    x = torch.randn(t, hidden, generator=g).to(dtype)
    res = torch.randn(t, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    ref_out, ref_res = CPU.add_rms_norm(x, res, w, 1e-5)
    poison_allocator()
    xc, rc = x.cuda(), res.cuda()
    out, res_sum = cuda_ops().add_rms_norm(xc, rc, w.cuda(), 1e-5)
    assert rel_err(res_sum, ref_res) < TOL[dtype]
    assert rel_err(out, ref_out) < TOL[dtype]
    assert torch.equal(rc.cpu(), res) and torch.equal(xc.cpu(), x), "inputs must not be modified"


def test_rms_norm_3d_input():
    x = torch.randn(2, 5, 576, generator=gen(9)).to(torch.bfloat16)
    w = torch.randn(576, generator=gen(10)).to(torch.bfloat16)
    out = cuda_ops().rms_norm(x.cuda(), w.cuda(), 1e-6)
    assert out.shape == x.shape
    assert rel_err(out, CPU.rms_norm(x, w, 1e-6)) < 1e-2


# ---- qkv_rope_cache ----------------------------------------------------------------------

def cos_sin_cache(max_pos: int, d: int, base: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


ROPE_SHAPES = [(9, 3, 64), (32, 8, 128), (4, 4, 32)]  # (H, Hkv, D): GQA 3, GQA 4, MHA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_qkv_rope_cache(dtype, t, shape):
    h, hkv, d = shape
    g = gen(t * 7 + d)
    num_blocks, bs = 8, 16
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g).to(dtype)
    positions = torch.randint(0, 4000, (t,), generator=g)
    cache = cos_sin_cache(4096, d)
    slots = torch.randperm(num_blocks * bs, generator=g)[:t]
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    # padding rows (slot -1) are rotated into q but write nothing
    pad = torch.zeros(t, dtype=torch.bool)
    if t > 2:
        pad[1] = True
    slot_mapping = torch.where(pad, torch.full_like(slots, -1), slots)

    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = ~pad
    CPU.qkv_rope_cache(qkv[keep], positions[keep], cache, k_ref, v_ref, slot_mapping[keep], h, hkv, d)
    q_ref = CPU.qkv_rope_cache(qkv, positions, cache, k_cache.clone(), v_cache.clone(), slots, h, hkv, d)

    poison_allocator()
    kc, vc = k_cache.cuda(), v_cache.cuda()
    q = cuda_ops().qkv_rope_cache(qkv.cuda(), positions.cuda(), cache.cuda(), kc, vc, slot_mapping.cuda(), h, hkv, d)
    assert q.shape == (t, h, d) and q.dtype == dtype
    assert rel_err(q, q_ref) < TOL[dtype]
    # Compare the written slots: the CPU op also zeroes a block when it writes its slot 0 (its
    # cache pages start unwritten), which the CUDA cache (allocated zeroed) does not need.
    written = torch.zeros(num_blocks * bs, dtype=torch.bool)
    written[slot_mapping[keep]] = True
    rows = lambda c: c.cpu().view(-1, hkv, d)[written]  # noqa: E731
    assert rel_err(rows(kc), rows(k_ref)) < TOL[dtype]
    assert torch.equal(rows(vc), rows(v_ref))  # v is copied exactly
    # untouched slots are bit-identical
    assert torch.equal(kc.cpu().view(-1, hkv, d)[~written], k_cache.view(-1, hkv, d)[~written])
    assert torch.equal(vc.cpu().view(-1, hkv, d)[~written], v_cache.view(-1, hkv, d)[~written])


def test_qkv_rope_cache_strided_qkv():
    """qkv as a column slice of a wider GEMM output (row stride != width)."""
    h, hkv, d, t = 8, 2, 64, 5
    wide = torch.randn(t, (h + 2 * hkv) * d + 64, generator=gen(3)).to(torch.bfloat16)
    qkv = wide[:, : (h + 2 * hkv) * d]
    positions = torch.arange(t) + 10
    cache = cos_sin_cache(64, d)
    kc = torch.zeros(2, 16, hkv, d, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    q_ref = CPU.qkv_rope_cache(qkv, positions, cache, kc.clone(), vc.clone(), torch.arange(t), h, hkv, d)
    q = cuda_ops().qkv_rope_cache(wide.cuda()[:, : (h + 2 * hkv) * d], positions.cuda(), cache.cuda(),
                                  kc.cuda(), vc.cuda(), torch.arange(t).cuda(), h, hkv, d)
    assert rel_err(q, q_ref) < 1e-2


# ---- attention -----------------------------------------------------------------------------

def make_paged(context_lens, hkv, d, bs, dtype, seed=0, extra_blocks=3):
    """Random paged KV cache and block tables (blocks of each sequence scattered)."""
    g = gen(seed)
    need = [math.ceil(c / bs) for c in context_lens]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(max(need), 1) + 1
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    i = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[i:i + n].to(torch.int32)
        i += n
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    return k_cache, v_cache, tables


def make_meta(query_lens, context_lens, tables, device="cpu"):
    t = sum(query_lens)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32)
    positions = torch.cat([torch.arange(c - n, c) for n, c in zip(query_lens, context_lens)]) if t else torch.zeros(0)
    return AttentionMetadata(
        positions=positions.long().to(device),
        slot_mapping=torch.zeros(t, dtype=torch.int64, device=device),
        query_start_loc=qsl.to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        query_lens_cpu=list(query_lens),
        context_lens_cpu=list(context_lens),
    )


DECODE_CASES = [
    # (H, Hkv, D, block_size, context_lens)
    (32, 8, 128, 16, [1, 17, 100, 1000, 0, 4096]),
    (9, 3, 64, 16, [5, 300, 64, 1]),
    (16, 4, 64, 32, [33, 1, 250]),
    (8, 2, 96, 16, [70, 129]),
    (8, 8, 128, 8, [40, 3]),
    (16, 2, 256, 16, [90, 513]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"H{c[0]}kv{c[1]}D{c[2]}bs{c[3]}")
@pytest.mark.parametrize("num_splits", [None, 1, 3, 40])
def test_paged_decode_attention(dtype, case, num_splits):
    from forge.kernels.paged_attention import paged_decode_attention

    h, hkv, d, bs, lens = case
    k_cache, v_cache, tables = make_paged(lens, hkv, d, bs, dtype, seed=d + bs)
    q = torch.randn(len(lens), h, d, generator=gen(5)).to(dtype)
    scale = d ** -0.5
    meta = make_meta([1] * len(lens), lens, tables)
    ref = CPU.attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    poison_allocator()
    out = paged_decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), tables.cuda(),
                                 torch.tensor(lens, dtype=torch.int32).cuda(), scale, num_splits=num_splits)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    zero_rows = [i for i, c in enumerate(lens) if c == 0]
    if zero_rows:
        assert torch.all(out[zero_rows] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ops_attention_decode(dtype):
    h, hkv, d, bs, lens = 12, 4, 64, 16, [7, 70, 1, 300]
    k_cache, v_cache, tables = make_paged(lens, hkv, d, bs, dtype, seed=11)
    q = torch.randn(len(lens), h, d, generator=gen(12)).to(dtype)
    meta = make_meta([1] * len(lens), lens, tables)
    ref = CPU.attention(q, k_cache, v_cache, meta, 0.125)
    out = cuda_ops().attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), make_meta([1] * len(lens), lens, tables, "cuda"), 0.125)
    assert rel_err(out, ref) < TOL[dtype] * 2


PREFILL_CASES = [
    # (H, Hkv, D, block_size, query_lens, context_lens): cached prefixes, a decode row, full prefills
    (8, 2, 64, 16, [5, 1, 12], [20, 9, 12]),
    (32, 8, 128, 16, [33, 7], [100, 7]),
    (9, 3, 64, 32, [3, 40, 1], [70, 40, 1]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"H{c[0]}kv{c[1]}D{c[2]}")
def test_cuda_ops_attention_prefill(dtype, case):
    """Queries are the LAST n positions of each context (bottom-right-aligned causal mask)."""
    h, hkv, d, bs, qlens, lens = case
    k_cache, v_cache, tables = make_paged(lens, hkv, d, bs, dtype, seed=d + len(lens))
    q = torch.randn(sum(qlens), h, d, generator=gen(13)).to(dtype)
    scale = d ** -0.5
    ref = CPU.attention(q.float(), k_cache.float(), v_cache.float(), make_meta(qlens, lens, tables), scale)
    ops = cuda_ops()
    poison_allocator()
    out = ops.attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), make_meta(qlens, lens, tables, "cuda"), scale)
    assert out.shape == q.shape and out.dtype == dtype
    err = rel_err(out, ref)
    print(f"prefill backend {ops._prefill_backend}, rel err {err:.2e}")
    assert err < TOL[dtype] * 2


# ---- CUDA graphs ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_graph_capture_matches_eager(dtype):
    """Capture qkv_rope_cache + paged decode attention once, replay with new inputs == eager."""
    from forge.kernels.paged_attention import paged_decode_attention
    from forge.kernels.rope_cache import qkv_rope_cache

    h, hkv, d, bs, b = 32, 8, 128, 16, 4
    max_blocks, num_blocks = 32, 160  # up to 512 tokens of context per sequence
    dev = "cuda"
    cs = cos_sin_cache(1024, d).to(dev)
    g = gen(21)
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype).to(dev)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype).to(dev)
    # static input buffers
    s_qkv = torch.zeros(b, (h + 2 * hkv) * d, dtype=dtype, device=dev)
    s_pos = torch.zeros(b, dtype=torch.int64, device=dev)
    s_slot = torch.full((b,), -1, dtype=torch.int64, device=dev)
    s_tables = torch.zeros(b, max_blocks, dtype=torch.int32, device=dev)
    s_lens = torch.zeros(b, dtype=torch.int32, device=dev)

    def step():
        q = qkv_rope_cache(s_qkv, s_pos, cs, k_cache, v_cache, s_slot, h, hkv, d)
        return paged_decode_attention(q, k_cache, v_cache, s_tables, s_lens, d ** -0.5,
                                      max_context_len=max_blocks * bs)

    def fill(lens, seed):
        gg = gen(seed)
        perm = torch.randperm(num_blocks, generator=gg)
        tables = torch.zeros(b, max_blocks, dtype=torch.int32)
        used = 0
        slots, pos = [], []
        for i, c in enumerate(lens):
            n = math.ceil(c / bs)
            tables[i, :n] = perm[used:used + n].to(torch.int32)
            used += n
            if c > 0:
                pos.append(c - 1)
                slots.append(int(tables[i, (c - 1) // bs]) * bs + (c - 1) % bs)
            else:  # padding row
                pos.append(0)
                slots.append(-1)
        s_qkv.copy_(torch.randn(b, s_qkv.shape[1], generator=gg).to(dtype))
        s_pos.copy_(torch.tensor(pos))
        s_slot.copy_(torch.tensor(slots))
        s_tables.copy_(tables)
        s_lens.copy_(torch.tensor(lens, dtype=torch.int32))

    fill([5, 17, 1, 0], seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm up: compile, allocate
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = step()

    for lens, seed in [([300, 2, 0, 511], 2), ([1, 1, 1, 1], 3), ([0, 0, 200, 64], 4)]:
        fill(lens, seed)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        g_out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        k_graph, v_graph, out_graph = k_cache.clone(), v_cache.clone(), g_out.clone()
        k_cache.copy_(k_before)
        v_cache.copy_(v_before)
        out_eager = step()
        torch.cuda.synchronize()
        assert torch.equal(k_graph, k_cache) and torch.equal(v_graph, v_cache)
        assert torch.isfinite(out_graph).all()
        assert torch.equal(out_graph, out_eager), (out_graph - out_eager).abs().max()
        for i, c in enumerate(lens):
            if c == 0:
                assert torch.all(out_graph[i] == 0)


@pytest.mark.parametrize("vocab,batch,rows", [(49152, 32, [0, 2, 5, 31]), (1000, 3, [1]), (128256, 8, list(range(8))),
                                               (70, 4, [3, 0])])
def test_apply_token_bitmask(vocab, batch, rows):
    """Forbidden tokens -> -inf in the listed rows only; allowed ones and other rows keep their values.
    A mask narrower than the logits (padded vocabulary) forbids the tokens past it."""
    from forge.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_torch

    g = torch.Generator().manual_seed(vocab + batch)
    words = (vocab + 31) // 32 - (1 if vocab == 49152 else 0)  # one case with a narrower mask
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), words), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(batch, vocab, generator=g)
    ref = logits.clone()
    apply_token_bitmask_torch(ref, bitmask, torch.tensor(rows, dtype=torch.int32))
    out = logits.cuda()
    apply_token_bitmask(out, bitmask.cuda(), torch.tensor(rows, dtype=torch.int32, device="cuda"))
    assert torch.equal(out.cpu(), ref)
    untouched = [r for r in range(batch) if r not in rows]
    assert torch.equal(out.cpu()[untouched], logits[untouched])


# ---- sliding window, soft-cap, GeGLU (issue 14's families) ----------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 1536), (33, 1001)])
def test_gelu_tanh_mul(dtype, t, inter):
    x = (torch.randn(t, 2 * inter, generator=gen(t + inter)) * 3).to(dtype)
    ref = CPU.gelu_tanh_mul(x)
    poison_allocator()
    assert rel_err(cuda_ops().gelu_tanh_mul(x.cuda()), ref) < TOL[dtype]


WINDOW_CASES = [
    # (H, Hkv, D, block_size, context_lens, window, soft_cap)
    (8, 2, 64, 16, [1, 17, 100, 1000, 0, 700], 64, None),
    (8, 2, 128, 16, [5, 300, 2000], 513, None),  # (several splits inside the window)
    (16, 8, 256, 16, [90, 513, 1], None, 5.0),
    (8, 4, 64, 32, [33, 250, 600], 100, 30.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"D{c[2]}w{c[5]}cap{c[6]}")
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_paged_decode_attention_window_and_soft_cap(dtype, case, num_splits):
    from forge.kernels.paged_attention import paged_decode_attention

    h, hkv, d, bs, lens, window, cap = case
    k_cache, v_cache, tables = make_paged(lens, hkv, d, bs, dtype, seed=d + bs)
    q = (torch.randn(len(lens), h, d, generator=gen(5)) * 3).to(dtype)  # (scores large enough for the cap to bite)
    scale = d ** -0.5
    ref = CPU.attention(q.float(), k_cache.float(), v_cache.float(), make_meta([1] * len(lens), lens, tables), scale,
                        window=window, soft_cap=cap)
    full = CPU.attention(q.float(), k_cache.float(), v_cache.float(), make_meta([1] * len(lens), lens, tables), scale)
    assert rel_err(full, ref) > 0.05  # (the window / cap changes the result)
    poison_allocator()
    out = paged_decode_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), tables.cuda(),
                                 torch.tensor(lens, dtype=torch.int32).cuda(), scale, num_splits=num_splits,
                                 window=window, soft_cap=cap)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,cap", [(7, None), (30, None), (None, 4.0), (9, 4.0)])
def test_cuda_ops_attention_prefill_window_and_soft_cap(dtype, window, cap):
    """Cached prefixes, a decode row and full prefills through a sliding window (varlen's window_size)
    and soft-capped scores (the per-sequence path)."""
    h, hkv, d, bs, qlens, lens = 8, 2, 64, 16, [5, 1, 40, 70], [20, 9, 40, 300]
    k_cache, v_cache, tables = make_paged(lens, hkv, d, bs, dtype, seed=7)
    q = (torch.randn(sum(qlens), h, d, generator=gen(13)) * 3).to(dtype)
    scale = d ** -0.5
    ref = CPU.attention(q.float(), k_cache.float(), v_cache.float(), make_meta(qlens, lens, tables), scale,
                        window=window, soft_cap=cap)
    ops = cuda_ops()
    poison_allocator()
    out = ops.attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), make_meta(qlens, lens, tables, "cuda"), scale,
                        window=window, soft_cap=cap)
    err = rel_err(out, ref)
    print(f"prefill backend {ops._prefill_backend}, window {window}, cap {cap}: rel err {err:.2e}")
    assert err < TOL[dtype] * 2
