"""The sampler on the CPU (forge.engine.sampler, forge.kernels.sampling): its draws are sampling.cu's
(checked here against a pure-Python reference, and on the GPU in tests/cuda/test_sampling.py against
the kernel), its filters' semantics, and the per-completion random streams."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from forge import LLM, SamplingParams
from forge.engine.sampler import Sampler
from forge.kernels import sampling as S
from forge.sequence import Sequence
from tests import sampling_reference as ref


def as_int64(u: int) -> int:
    return u - (1 << 64) if u >> 63 else u


def sequence(params: SamplingParams, seed: int | None, index: int = 0, num_output_tokens: int = 0) -> Sequence:
    seq = Sequence("r", [1, 2, 3], dataclasses.replace(params, seed=seed), index=index)
    seq.token_ids += [5] * num_output_tokens  # the position a draw is keyed by: the output token's index
    return seq


# -- the hash --------------------------------------------------------------------------------------------
def test_splitmix64_is_the_published_function():
    # The first two outputs of splitmix64 from state 0 (Vigna's reference implementation).
    assert ref.splitmix64(0) == 0xE220A8397B1DCDAF and ref.splitmix64(ref.GOLDEN) == 0x6E789E6AA1B965F4
    values = [0, 1, ref.MASK64, 1 << 63, (1 << 63) - 1, 0x0123456789ABCDEF] + [random.Random(0).getrandbits(64)
                                                                              for _ in range(50)]
    got = S.splitmix64(torch.tensor([as_int64(v) for v in values]))
    assert [v & ref.MASK64 for v in got.tolist()] == [ref.splitmix64(v) for v in values]
    assert [S.splitmix64_int(v) for v in values] == [ref.splitmix64(v) for v in values]


def test_draw_bits_and_offsets_equal_the_python_reference():
    """For every (key, position) of the table: the 23 bits behind each token, and the float32
    Gumbel offset c = logf(-logf(u))."""
    vocab = 300
    keys = torch.tensor([k for k, _ in ref.TABLE])
    positions = torch.tensor([p for _, p in ref.TABLE])
    rows = torch.arange(len(ref.TABLE))[:, None]
    got = S.draw_bits(keys, positions, rows, torch.arange(vocab)[None, :])
    expected = torch.tensor([[ref.bits(k, p, i) for i in range(vocab)] for k, p in ref.TABLE])
    assert torch.equal(got, expected)
    some = torch.tensor([0, 1, 2, 1000, 2**22, 2**23 - 2, 2**23 - 1] + expected.flatten()[:2000].tolist())
    assert S.gumbel_offsets(some).tolist() == [ref.offset(b) for b in some.tolist()]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
def test_cpu_sampler_equals_python_reference(temperature):
    """Sampler tokens for the whole table (stream keys from seeds and completion indexes, positions
    from the output length) equal the reference draw over the same float32 scores."""
    vocab = 64
    g = torch.Generator().manual_seed(int(temperature * 10))
    params = SamplingParams(temperature=temperature, seed=0)
    seqs, rows = [], []
    for i, (seed, position) in enumerate(ref.TABLE[::3]):
        seqs.append(sequence(params, seed, index=i % 3, num_output_tokens=position % 50))
        rows.append(torch.randn(vocab, generator=g) * (0.5 + i % 4))
    logits = torch.stack(rows)
    got = [r.token_id for r in Sampler("cpu")(logits.clone(), seqs)]
    expected = [ref.draw(row.tolist(), seq.sampling_key, seq.num_output_tokens, temperature)[0]
                for row, seq in zip(logits, seqs)]
    assert got == expected
    assert len(set(got)) > 5  # (not one token everywhere)


def test_stream_keys_mix_seed_and_completion_index():
    """Completion i of seed s gets key splitmix64(splitmix64(s) ^ i): no two (seed, index) pairs of a
    wide range share a stream (with seed + i, completion 1 of seed s was completion 0 of seed s + 1)."""
    keys = {S.stream_key(seed, index) for seed in range(-50, 200) for index in range(8)}
    assert len(keys) == 250 * 8
    assert S.stream_key(5, 1) == as_int64(ref.splitmix64(ref.splitmix64(5) ^ 1))
    assert S.stream_key(-1, 0) == as_int64(ref.splitmix64(ref.splitmix64(ref.MASK64)))
    assert S.stream_key(None) != S.stream_key(None)  # no seed: a random stream
    p = SamplingParams(temperature=1.0, seed=3)
    assert Sequence("r", [1], p, index=2).sampling_key == S.stream_key(3, 2)


# -- the draw and the filters ----------------------------------------------------------------------------
def random_rows(rng: random.Random, b: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    rows = torch.randn(b, vocab, generator=g) * torch.tensor([rng.choice([0.3, 2.0, 8.0]) for _ in range(b)])[:, None]
    return rows - rows.amax(-1, keepdim=True)


@pytest.mark.parametrize("spread", ["flat", "peaked"])
def test_pruned_draw_equals_the_full_draw(spread):
    """Hashing only the tokens that can win (x >= -19.5, and kept) gives the very tokens and scores
    of hashing every token (the sync-free variant used on a GPU without the kernels)."""
    rng = random.Random(spread == "flat")
    b, vocab = 24, 4000
    x = random_rows(rng, b, vocab) * (1.0 if spread == "flat" else 6.0)
    mode = torch.tensor([float(i % 5 != 0) for i in range(b)])
    threshold = torch.where(torch.arange(b) % 3 == 0, -2.5, float("-inf")).float()
    x[7] = float("-inf")  # a sampled row with every token masked: token 0
    keys = torch.tensor([S.stream_key(rng.randrange(2**63), 0) for _ in range(b)])
    positions = torch.tensor([rng.randrange(10**6) for _ in range(b)])
    pruned = S.gumbel_argmax_torch(x, mode, threshold, keys, positions, with_scores=True)
    full = S.gumbel_argmax_torch(x, mode, threshold, keys, positions, with_scores=True, prune=False)
    assert torch.equal(pruned[0], full[0]) and torch.equal(pruned[1], full[1])
    assert pruned[0][7] == 0
    assert torch.equal(pruned[0][mode == 0], x[mode == 0].argmax(-1))
    kept = x.gather(1, pruned[0][:, None]).squeeze(1) >= threshold
    assert kept[mode > 0].all()


def kept(x: torch.Tensor, **kw) -> list[int]:
    """The tokens of row 0 a draw can pick under the filters (masked ones never)."""
    f64 = torch.float64
    thr = S.filter_thresholds(x, torch.tensor([kw.get("top_k", 0)]), torch.tensor([kw.get("top_p", 1.0)], dtype=f64),
                              torch.tensor([kw.get("min_p", 0.0)], dtype=f64))
    return torch.nonzero((x[0] >= thr[0]) & (x[0] > float("-inf"))).flatten().tolist()


def test_filter_semantics():
    x = torch.tensor([[0.0, -1.0, -1.0, -1.0, -3.0, -30.0, float("-inf")]])
    p = torch.softmax(x[0].double(), -1)
    assert kept(x) == [0, 1, 2, 3, 4, 5]
    assert kept(x, top_k=2) == [0, 1, 2, 3]  # a cut keeps every token tied with the last one kept
    assert kept(x, top_k=1) == [0]
    assert kept(x, top_k=100) == kept(x)
    # top-p: a token stays while the mass before it is below top_p
    assert kept(x, top_p=float(p[0]) - 1e-6) == [0]
    assert kept(x, top_p=float(p[0]) + 1e-6) == [0, 1, 2, 3]
    assert kept(x, top_p=1e-300) == [0]  # the top token always stays
    assert kept(x, top_p=1.0) == kept(x)  # off, even for tokens whose mass before is 1.0 in float64
    # top-p over the top-k set (its k first places, renormalized): the mass before place 1 is p0 / (p0 + p1)
    within = float(p[0] / (p[0] + p[1]))
    assert kept(x, top_k=2, top_p=within - 1e-6) == [0] and kept(x, top_k=2, top_p=within + 1e-6) == [0, 1, 2, 3]
    # min-p: probability >= min_p times the top one's
    assert kept(x, min_p=float(np.exp(-1.0)) - 1e-6) == [0, 1, 2, 3]
    assert kept(x, min_p=float(np.exp(-1.0)) + 1e-6) == [0]
    assert kept(x, min_p=1.0) == [0]
    assert kept(x, top_k=5, min_p=0.01) == [0, 1, 2, 3, 4]


def test_sort_width_hint_gives_the_same_thresholds():
    """The Sampler finds top-k's values by topk, not a full sort, when every filtering row has a top_k."""
    rng = random.Random(4)
    x = random_rows(rng, 6, 500)
    x[2, :10] = x[2, 0]  # ties around the cut
    top_k = torch.tensor([5, 40, 3, 0, 1, 7])
    top_p = torch.tensor([1.0, 0.8, 0.5, 1.0, 0.9, 0.3], dtype=torch.float64)
    min_p = torch.zeros(6, dtype=torch.float64)
    full = S.filter_thresholds(x, top_k, top_p, min_p, use_min_p=False)
    assert torch.equal(S.filter_thresholds(x, top_k, top_p, min_p, use_min_p=False, sort_width=40), full)
    assert full[3] == float("-inf")  # a row that does not filter keeps every token


def test_draws_do_not_depend_on_the_batch():
    rng = random.Random(5)
    logits = random_rows(rng, 8, 2000) * 3
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i) if i % 2 else SamplingParams(temperature=1.0, min_p=0.05)
              for i in range(8)]
    seqs = [sequence(p, i, num_output_tokens=i) for i, p in enumerate(params)]
    together = [r.token_id for r in Sampler()(logits.clone(), seqs)]
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    shuffled = Sampler()(logits[order].clone(), [seqs[i] for i in order])
    assert [r.token_id for r in shuffled] == [together[i] for i in order]
    assert [Sampler()(logits[i : i + 1].clone(), [seqs[i]])[0].token_id for i in range(8)] == together


def test_device_path_is_chosen_once():
    assert Sampler("cpu").draw is S.gumbel_argmax_torch
    if not torch.cuda.is_available():  # a GPU without the kernels: the torch draw without a host sync
        draw = Sampler("cuda").draw
        assert draw.func is S.gumbel_argmax_torch and draw.keywords == {"prune": False}


# -- completions of a request ------------------------------------------------------------------------------
def test_seeded_completions_never_share_a_stream(tiny):
    llm = LLM(tiny, num_kv_blocks=64)
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9, 10]}

    def completions(n, seed):
        out = llm.generate(prompt, SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=12), use_tqdm=False)
        return [c.token_ids for c in out[0].outputs]

    two = completions(2, 40)
    assert two == completions(2, 40)  # the same seed: the same completions
    assert two[1] != completions(1, 41)[0]  # completion 1 of seed 40 is not completion 0 of seed 41
    assert two[0] == completions(1, 40)[0]  # completion 0 depends on the seed alone
    assert completions(1, None) != completions(1, None)  # no seed: a fresh stream each time


def test_sampled_token_outside_the_top_n_gets_its_real_rank():
    """As vLLM: a sampled token's rank is exact even when it is not among the top-n returned."""
    logits = torch.randn(6, 200, generator=torch.Generator().manual_seed(3)) * 0.1  # flat: draws land far down
    params = SamplingParams(temperature=1.0, logprobs=1)
    seqs = [sequence(params, seed=s) for s in range(6)]
    results = Sampler("cpu")(logits.clone(), seqs)
    raw = torch.log_softmax(logits, -1)
    for i, r in enumerate(results):
        assert r.rank == int((raw[i] > raw[i, r.token_id]).sum()) + 1
    assert any(r.rank > 1 for r in results)  # at least one draw outside the top-1
