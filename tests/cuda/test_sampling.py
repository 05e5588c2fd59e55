"""GPU sampling kernel (forge.kernels.sampling) tests, and the CPU/GPU equality of the sampler: the
same draws and tokens for equal logits (the CPU side: tests/test_sampler.py)."""

import random

import pytest
import torch

from forge import SamplingParams
from forge.engine.sampler import Sampler
from forge.kernels import sampling as S
from forge.kernels.sampling import sample, top_k_candidates
from forge.sequence import Sequence
from tests import sampling_reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DEV = "cuda"


def params(b, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed0=0, step=0):
    return dict(
        temperature=torch.full((b,), float(temperature), device=DEV),
        top_k=torch.full((b,), int(top_k), dtype=torch.int32, device=DEV),
        top_p=torch.full((b,), float(top_p), device=DEV),
        min_p=torch.full((b,), float(min_p), device=DEV),
        seeds=torch.arange(seed0, seed0 + b, dtype=torch.int64, device=DEV),
        steps=torch.full((b,), step, dtype=torch.int64, device=DEV),
    )


def test_greedy_and_top_k_1_equal_argmax():
    logits = torch.randn(16, 32000, device=DEV)
    ids, *_ = sample(logits, **params(16, temperature=0.0))
    assert torch.equal(ids, logits.argmax(-1))
    ids, *_ = sample(logits, **params(16, temperature=1.3, top_k=1))
    assert torch.equal(ids, logits.argmax(-1))


def test_same_seed_and_step_same_token_regardless_of_batch():
    vocab = 5000
    logits = torch.randn(8, vocab, device=DEV) * 2
    p = params(8, temperature=1.0)
    p["seeds"] = torch.tensor([11, 22, 33, 44, 55, 66, 77, 88], device=DEV)
    p["steps"] = torch.tensor([0, 5, 9, 2, 7, 1, 3, 4], device=DEV)
    ids, *_ = sample(logits, **p)
    # the same rows, permuted and mixed with other rows
    perm = torch.tensor([5, 2, 7, 0], device=DEV)
    others = torch.randn(3, vocab, device=DEV)
    logits2 = torch.cat([others[:1], logits[perm], others[1:]])
    filler = params(3, temperature=0.5, seed0=999, step=42)
    p2 = {k: torch.cat([filler[k][:1], v[perm], filler[k][1:]]) for k, v in p.items()}
    ids2, *_ = sample(logits2, **p2)
    assert torch.equal(ids2[1:5], ids[perm])
    # another step gives (in general) other draws
    p3 = dict(p, steps=p["steps"] + 1)
    ids3, *_ = sample(logits, **p3)
    assert not torch.equal(ids3, ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_distribution_matches_softmax(temperature):
    n, vocab = 20000, 10
    base = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0, 1.5, -0.5, 0.3, 0.9, -2.0], device=DEV)
    logits = base.expand(n, vocab).contiguous()
    ids, *_ = sample(logits, **params(n, temperature=temperature, seed0=1234, step=3))
    freq = torch.bincount(ids, minlength=vocab).float() / n
    expect = torch.softmax(base / temperature, -1)
    assert (freq - expect).abs().max().item() < 0.02, (freq, expect)
    # the same with one seed and successive steps
    p = params(n, temperature=temperature)
    p["seeds"] = torch.full((n,), 77, dtype=torch.int64, device=DEV)
    p["steps"] = torch.arange(n, device=DEV)
    ids, *_ = sample(logits, **p)
    freq = torch.bincount(ids, minlength=vocab).float() / n
    assert (freq - expect).abs().max().item() < 0.02, (freq, expect)


def allowed_set(row: torch.Tensor, temperature, top_k, top_p, min_p) -> set[int]:
    x = row.double() / temperature
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k:
        kth = torch.topk(x, top_k).values[-1]
        keep &= x >= kth
    if top_p < 1.0:
        xs = x.masked_fill(~keep, float("-inf"))
        sx, order = torch.sort(xs, descending=True)
        pr = torch.softmax(sx, -1)
        drop = (pr.cumsum(-1) - pr) >= top_p
        k2 = torch.ones_like(keep)
        k2[order[drop]] = False
        keep &= k2
    if min_p > 0:
        xs = x.masked_fill(~keep, float("-inf"))
        pr = torch.softmax(xs, -1)
        keep &= pr >= min_p * pr.max()
    return set(torch.nonzero(keep).flatten().tolist())


@pytest.mark.parametrize("filt", [dict(top_k=5), dict(top_p=0.6), dict(min_p=0.1), dict(top_k=20, top_p=0.8, min_p=0.05)])
def test_filters_never_pick_masked_tokens(filt):
    n, vocab = 4000, 64
    g = torch.Generator(device=DEV).manual_seed(0)
    base = torch.randn(vocab, device=DEV, generator=g) * 1.5
    logits = base.expand(n, vocab).contiguous()
    kw = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    kw.update(filt)
    ids, *_ = sample(logits, **params(n, **kw))
    allowed = allowed_set(base.cpu(), kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"])
    picked = set(ids.unique().tolist())
    assert picked <= allowed, (picked - allowed)
    assert len(picked) >= min(2, len(allowed))


def test_mixed_rows_and_logprobs():
    b, vocab = 6, 1000
    logits = torch.randn(b, vocab, device=DEV) * 3
    p = params(b)
    p["temperature"] = torch.tensor([0.0, 1.0, 0.5, 0.0, 2.0, 1.0], device=DEV)
    p["top_k"] = torch.tensor([0, 1, 0, 5, 0, 3], dtype=torch.int32, device=DEV)
    ids, chosen, top_ids, top_lps = sample(logits, **p, num_logprobs=4)
    raw = torch.log_softmax(logits, -1)
    am = logits.argmax(-1)
    assert ids[0] == am[0] and ids[1] == am[1] and ids[3] == am[3]
    assert ids[5].item() in torch.topk(logits[5], 3).indices.tolist()
    assert torch.allclose(chosen, raw.gather(1, ids[:, None]).squeeze(1))
    ref = torch.topk(raw, 4)
    assert torch.equal(top_ids, ref.indices) and torch.allclose(top_lps, ref.values)
    # no filters, no logprobs
    ids, chosen, top_ids, top_lps = sample(logits, **params(b))
    assert top_ids.shape == (b, 0) and top_lps.shape == (b, 0)


def table_inputs(vocab: int, scale: float, seed: int):
    """Scaled logits (row max 0) for every (key, position) of the reference table, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(ref.TABLE), vocab, generator=g) * scale
    x = x - x.amax(-1, keepdim=True)
    keys = torch.tensor([k for k, _ in ref.TABLE], dtype=torch.int64)
    positions = torch.tensor([p for _, p in ref.TABLE], dtype=torch.int64)
    return x, keys, positions


def both_draws(x, mode, threshold, keys, positions):
    gpu = S.gumbel_argmax_cuda(x.to(DEV), mode.to(DEV), threshold.to(DEV), keys.to(DEV), positions.to(DEV),
                               with_scores=True)
    cpu = S.gumbel_argmax_torch(x, mode, threshold, keys, positions, with_scores=True)
    return [t.cpu() for t in gpu], cpu


@pytest.mark.skipif(not S.compiler.available(), reason="needs the CUDA kernels (cuda.core)")
@pytest.mark.parametrize("vocab, scale", [(4096, 0.0), (4096, 2.0), (49152, 1.0), (49152, 6.0)])
def test_cuda_draws_equal_cpu_draws(vocab, scale):
    """The kernel's winning token and score for every (key, position) of the table equal the CPU's.
    scale 0 (all logits equal): the winner is the token with the largest u, i.e. the hash alone."""
    x, keys, positions = table_inputs(vocab, scale, seed=vocab + int(scale))
    b = x.shape[0]
    mode = torch.ones(b)
    mode[::5] = 0.0  # some greedy rows
    threshold = torch.full((b,), float("-inf"))
    threshold[1::3] = -1.5  # some filtered rows
    (ids_gpu, scores_gpu), (ids_cpu, scores_cpu) = both_draws(x, mode, threshold, keys, positions)
    assert torch.equal(ids_gpu, ids_cpu)
    # the same float32 score x - c, up to logf's last bit in c (|c| <= |x| + |score|)
    winner_x = x.gather(1, ids_cpu[:, None]).squeeze(1)
    assert ((scores_gpu - scores_cpu).abs() <= 4e-7 * (winner_x.abs() + scores_cpu.abs() + 1.0)).all()
    if scale == 0.0:  # the hash alone: the pure-Python reference agrees on the first rows
        for r in range(8):
            if mode[r] > 0:
                token, score = ref.draw([0.0] * vocab, int(keys[r]), int(positions[r]), 1.0)
                assert int(ids_gpu[r]) == token and abs(float(scores_gpu[r]) - score) <= 4e-7 * (abs(score) + 1.0)


def test_engine_sampler_gives_the_same_tokens_on_cpu_and_gpu():
    """Sampler('cpu') and Sampler('cuda') on equal logits: the same token for every row, with every
    kind of parameter (greedy, temperature, top-k, top-p, min-p, penalties, logprobs)."""
    rng = random.Random(0)
    vocab, b = 32000, 48
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(b, vocab, generator=g) * torch.tensor([rng.choice([0.5, 2.0, 5.0]) for _ in range(b)])[:, None]
    kinds = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.7, top_k=40), dict(temperature=0.9, top_p=0.9),
             dict(temperature=1.2, min_p=0.05), dict(temperature=0.8, top_k=100, top_p=0.8, min_p=0.02),
             dict(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
             dict(temperature=1.0, logprobs=3)]
    seqs = []
    for i in range(b):
        prompt = [rng.randrange(vocab) for _ in range(8)]
        p = SamplingParams(seed=rng.randrange(2**63), **kinds[i % len(kinds)])
        seq = Sequence("r", prompt, p, index=i % 3)
        seq.token_ids += [rng.randrange(vocab) for _ in range(i % 7)]  # outputs: penalties and the position
        seqs.append(seq)
    cpu = Sampler("cpu")(logits.clone(), seqs)
    gpu = Sampler(DEV)(logits.to(DEV), seqs)
    assert [r.token_id for r in gpu] == [r.token_id for r in cpu]
    for rc, rg in zip(cpu, gpu):
        assert (rc.logprob is None) == (rg.logprob is None)
        if rc.logprob is not None:
            assert abs(rc.logprob - rg.logprob) < 1e-4
            assert [t for t, _ in rc.top_logprobs] == [t for t, _ in rg.top_logprobs]


def test_top_k_candidates():
    logits = torch.randn(3, 500, device=DEV)
    ids, probs = top_k_candidates(logits, 7)
    ref = torch.topk(torch.softmax(logits, -1), 7)
    assert torch.equal(ids, ref.indices) and torch.allclose(probs, ref.values)


def test_sample_graph_capturable_with_hints():
    b, vocab = 8, 4096
    logits = torch.randn(b, vocab, device=DEV)
    p = params(b, temperature=0.9, top_k=50, top_p=0.9)
    kw = dict(use_top_k_p=True, use_min_p=False)
    ids_eager, *_ = sample(logits, **p, **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sample(logits, **p, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids_graph, *_ = sample(logits, **p, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(ids_graph, ids_eager)


# -- every accepted SamplingParams value at its edges (the same table as tests/test_validation.py) ------------
def test_sample_function_survives_raw_edge_values():
    from tests.util import check_sample_function_edges

    check_sample_function_edges(DEV, vocab=1024)


def test_device_sampler_survives_every_accepted_edge_value():
    """The GPU sampler (penalties, greedy rule, kernel draw, logprob floor) on masked, huge, NaN/+inf and
    fully masked rows: every token valid, every logprob finite. Each edge value alone, then random mixes."""
    import random

    from forge import SamplingParams
    from tests.util import LOGIT_KINDS, SAMPLING_EDGES, assert_valid_samples, edge_sequence, random_edge_logits, random_edge_params

    rng, vocab, sampler = random.Random(0), 1024, Sampler(DEV)

    def check(params_list, kinds):
        rows = torch.stack([random_edge_logits(rng, kind, vocab) for kind in kinds])
        seqs = [edge_sequence(rng, p, row) for p, row in zip(params_list, rows)]
        results = sampler(rows.to(DEV), seqs)
        assert_valid_samples(rows, [r.token_id for r in results], results)  # (NaN: never, greedy or not)

    for name, options in SAMPLING_EDGES.items():
        for value in options:
            kw = {"temperature": 1.0, "logprobs": 5} | {name: value}
            check([SamplingParams(**kw, seed=rng.randrange(2**63)) for _ in LOGIT_KINDS], list(LOGIT_KINDS))
    for _ in range(40):
        kinds = [rng.choice(LOGIT_KINDS) for _ in range(8)]
        check([random_edge_params(rng) for _ in kinds], kinds)
    # the all-greedy fast path too
    check([SamplingParams(temperature=t) for t in (0.0, 1e-38, 5e-324, 9.99e-6, 0.0, 0.0)], list(LOGIT_KINDS))
