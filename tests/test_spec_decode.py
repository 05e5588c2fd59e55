"""Speculative decoding (forge.spec_decode): lossless against plain decoding in every engine mode."""

import json
import math
import random
import re

import numpy as np
import pytest
import torch

from forge import LLM, SamplingParams
from forge.errors import InvalidRequestError
from forge.sampling_params import StructuredOutputsParams
from forge.spec_decode.adaptive import AcceptanceGate
from forge.spec_decode.config import SpeculativeConfig
from forge.spec_decode.ngram import lookup

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished "
           "the lens, and watched the ships pass along the rocky coast.")
PROMPTS = [  # input-grounded (drafts match) and open-ended (they rarely do): mixed batches
    f"Repeat the following passage exactly.\n\nPassage: {PASSAGE}\n\nRepeated passage:",
    "The capital of France is",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Write a haiku about the sea:",
    f"Summarize: {PASSAGE}\nSummary:",
    "List three colors: red,",
]


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def repeating_prompts(n, seed=0, lo=8, hi=30):
    """Random token runs said twice: the tiny random model's continuations repeat, so n-grams match."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        run = [rng.randrange(49152) for _ in range(rng.randint(lo, hi))]
        out.append({"prompt_token_ids": run + run[: rng.randint(1, len(run))]})
    return out


@pytest.fixture(scope="module")
def spec_llm():
    return LLM(max_model_len=2048, num_kv_blocks=512, speculative_config=NGRAM)


# -- configuration ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"method": "eagle"}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_max": 2, "prompt_lookup_min": 3}, "prompt_lookup_min"),
    ({"method": "ngram", "bogus": 1}, "unknown key 'bogus'"),
    ({"method": "draft_model"}, "needs model"),
    ({"method": "draft_model", "model": "/nonexistent/model"}, "does not exist"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a dict"),
])
def test_bad_config_is_one_clear_error(bad, message):
    with pytest.raises(InvalidRequestError, match=message) as info:
        SpeculativeConfig.parse(bad)
    assert info.value.param == "speculative_config" and "\n" not in str(info.value)


def test_config_from_json_and_vllm_defaults():
    c = SpeculativeConfig.parse('{"num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == ("ngram", 3, 5, 2)
    with pytest.raises(InvalidRequestError, match="async scheduling"):
        LLM(max_model_len=256, num_kv_blocks=16, speculative_config=NGRAM, async_scheduling=True)


# -- the proposer and the adaptive rule ------------------------------------------------------------------
def test_ngram_lookup_longest_latest_match():
    t = np.array([1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 8, 0, 3, 4])
    assert lookup(t, 1, 3, 2).tolist() == [6, 7]  # "3 4" last occurred before "6 7" (and "5 9" before it)
    assert lookup(t, 1, 3, 5).tolist() == [6, 7, 8, 0, 3]
    assert lookup(t, 3, 3, 2).tolist() == []  # "0 3 4" never occurred before
    assert lookup(np.array([5, 5, 5, 5]), 1, 2, 3).tolist() == [5, 5]  # no match has 3 tokens after it: the earliest
    assert lookup(np.array([7]), 1, 3, 4).tolist() == []


def test_gate_pauses_low_acceptance_and_sizes_drafts():
    gate = AcceptanceGate()
    assert gate.draft_length(6) == 6
    for _ in range(3):
        gate.update(6, 0, 0.25)
    assert gate.rate < 0.25 and gate.paused
    paused = gate.paused
    assert [gate.draft_length(6) for _ in range(paused)] == [0] * paused
    assert gate.draft_length(6) == 1  # probing again, with a short draft
    good = AcceptanceGate()
    good.update(6, 3, 0.25)  # p = 4 / 5: about 4 drafts expected to be accepted
    assert 1 < good.draft_length(6) < 6


# -- lossless: greedy and seeded sampling equal plain decoding ------------------------------------------
def test_greedy_identical_mixed_batch(default_llm, spec_llm):
    params = [SamplingParams(temperature=0, max_tokens=40 + 5 * i) for i in range(len(PROMPTS))]
    plain = default_llm.generate(PROMPTS, params, use_tqdm=False)
    spec = spec_llm.generate(PROMPTS, params, use_tqdm=False)
    assert token_ids(spec) == token_ids(plain)
    assert [o.outputs[0].text for o in spec] == [o.outputs[0].text for o in plain]
    m = spec[0].metrics  # the passage is copied: drafts are accepted
    assert m.spec_num_accepted_tokens > 10 and m.spec_acceptance_rate > 0.5 and m.spec_mean_accepted_length > 2
    stats = spec_llm.llm_engine.core.spec.stats
    assert stats.num_accepted_tokens <= stats.num_draft_tokens and sum(stats.accepted_per_pos) == stats.num_accepted_tokens
    assert spec_llm.llm_engine.block_manager.num_free_blocks == 512


def test_seeded_sampling_identical_and_logprobs_of_accepted_tokens(default_llm, spec_llm):
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=10 + i, max_tokens=32, logprobs=2)
              for i in range(len(PROMPTS))]
    plain = default_llm.generate(PROMPTS, params, use_tqdm=False)
    spec = spec_llm.generate(PROMPTS, params, use_tqdm=False)
    assert token_ids(spec) == token_ids(plain)
    assert sum(o.metrics.spec_num_accepted_tokens for o in spec) > 0
    for a, b in zip(plain, spec):
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            for t in la:
                assert la[t].rank == lb[t].rank and la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-4)


def test_staggered_arrivals_equal_alone(default_llm, spec_llm):
    """Requests join while others verify drafts (continuous batching): each equals its plain run."""
    params = SamplingParams(temperature=0, max_tokens=30)
    engine, pending, done, steps = spec_llm.llm_engine, list(enumerate(PROMPTS)), {}, 0
    ids = {}
    while pending or engine.has_unfinished_requests():
        if pending and steps % 4 == 0:
            i, p = pending.pop(0)
            ids[engine.add_request(p, params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        steps += 1
    plain = default_llm.generate(PROMPTS, params, use_tqdm=False)
    assert [done[i].outputs[0].token_ids for i in range(len(PROMPTS))] == token_ids(plain)


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_preemption_chunked_prefill_and_prefix_hits(tiny, kind):
    """Tight KV cache (preemptions), a small token budget (chunked prefill, drafts cut by the budget),
    a shared prefix (cache hits): speculative outputs equal plain ones and every block comes back."""
    shared = [11, 22, 33, 44] * 12
    ps = [{"prompt_token_ids": shared + p["prompt_token_ids"]} for p in repeating_prompts(8, seed=3)]
    if kind == "greedy":
        params, config = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), NGRAM
    else:  # sampled tokens rarely repeat: the model drafts for itself (its draws use the same noise)
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, ignore_eos=True) for i in range(len(ps))]
        config = {"method": "draft_model", "model": tiny, "num_speculative_tokens": 3}
    plain = token_ids(LLM(tiny, num_kv_blocks=512, enable_prefix_caching=False).generate(ps, params, use_tqdm=False))
    spec = LLM(tiny, num_kv_blocks=16, max_model_len=200, max_num_batched_tokens=24, speculative_config=config)
    assert token_ids(spec.generate(ps, params, use_tqdm=False)) == plain
    engine = spec.llm_engine
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.prefix_hits > 0, \
        (engine.scheduler.num_preemptions, engine.block_manager.prefix_hits)
    assert engine.core.spec.stats.num_accepted_tokens > 0
    assert engine.block_manager.num_free_blocks == 16


# -- stops, max_tokens, abort -------------------------------------------------------------------------------
def test_stop_string_and_max_tokens_inside_an_accepted_run(default_llm, spec_llm):
    prompt = PROMPTS[0]
    for params in [SamplingParams(temperature=0, max_tokens=64, stop=["polished"]),
                   SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[default_llm.get_tokenizer().encode(
                       " wick")[0]]),
                   SamplingParams(temperature=0, max_tokens=13)]:
        plain = default_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        spec = spec_llm.generate(prompt, params, use_tqdm=False)[0]
        out = spec.outputs[0]
        assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == \
            (plain.token_ids, plain.text, plain.finish_reason, plain.stop_reason)
        assert spec.metrics.spec_num_accepted_tokens > 0
    assert spec_llm.llm_engine.block_manager.num_free_blocks == 512


def test_abort_mid_run_frees_blocks(spec_llm):
    engine = spec_llm.llm_engine
    rid = engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    other = engine.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=20))
    accepted = lambda: engine.core.spec.stats.num_accepted_tokens  # noqa: E731
    before, outs = accepted(), []
    while accepted() == before or len(outs) < 6:
        outs += [o for o in engine.step() if o.request_id == rid]
    engine.abort_request(rid)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [other]  # the other request runs on to its end
    assert finished[0].outputs[0].finish_reason in ("stop", "length")
    assert engine.block_manager.num_free_blocks == 512


# -- structured output ---------------------------------------------------------------------------------------
def test_structured_output_with_speculation_stays_valid(default_llm, spec_llm):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items":
              {"type": "string"}}}, "required": ["name", "tags"]}
    prompt = ('Copy this JSON: {"name": "lighthouse", "tags": ["lens", "wick", "lens", "wick", "stairs"]}\n'
              'Copy: ')
    params = [SamplingParams(temperature=0, max_tokens=150, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(temperature=0.7, seed=3, max_tokens=150,
                             structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(
                  regex=r"(wick|lens)( (wick|lens)){2,8}\."))]
    plain = default_llm.generate([prompt] * 3, params, use_tqdm=False)
    spec = spec_llm.generate([prompt] * 3, params, use_tqdm=False)
    assert token_ids(spec) == token_ids(plain)
    regex_out = spec[2].outputs[0]
    assert regex_out.finish_reason == "stop" and re.fullmatch(r"(wick|lens)( (wick|lens)){2,8}\.", regex_out.text)
    for out in spec[:2]:
        if out.outputs[0].finish_reason == "stop":  # (a sampled string may run to max_tokens)
            value = json.loads(out.outputs[0].text)
            assert isinstance(value["name"], str) and isinstance(value["tags"], list)
    assert sum(o.metrics.spec_num_accepted_tokens for o in spec) > 0



def test_structured_request_survives_a_draft_that_ends_in_eos():
    """An n-gram draft ending in the stop token (the chat template's <|im_end|> after an earlier
    answer) ends the grammar; the mask row after it is never sampled from and is not asked of the
    finished matcher (xgrammar raised there, failing the request)."""
    prompt = ("<|im_start|>user\nSay two words.<|im_end|>\n<|im_start|>assistant\nlens wick<|im_end|>\n"
              "<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n")
    params = SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(regex="lens wick"))
    plain = LLM(max_model_len=256, num_kv_blocks=64).generate(prompt, params, use_tqdm=False)[0]
    spec = LLM(max_model_len=256, num_kv_blocks=64, speculative_config=NGRAM).generate(prompt, params, use_tqdm=False)[0]
    assert plain.outputs[0].finish_reason == "stop"
    assert getattr(spec, "error", None) is None, spec.error
    assert spec.outputs[0].token_ids == plain.outputs[0].token_ids



def test_proposing_waits_for_a_mask_fill_a_failed_step_left_behind(spec_llm, monkeypatch):
    """A step that fails after starting an overlapped mask fill leaves the fill running; the next
    step's proposer reads the same grammar matchers (valid_prefix_len), so it must wait for it first."""
    core = spec_llm.llm_engine.core
    params = SamplingParams(temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(regex="[a-z ]+"))
    spec_llm.generate("Write letters:", params, use_tqdm=False)  # builds the structured backend
    order = []
    monkeypatch.setattr(core._structured, "finish_in_flight", lambda: order.append("wait"))
    propose = core.spec.propose
    monkeypatch.setattr(core.spec, "propose", lambda seqs: (order.append("propose"), propose(seqs))[1])
    spec_llm.generate("Write letters:", params, use_tqdm=False)
    proposals = [i for i, what in enumerate(order) if what == "propose"]
    assert proposals and all(i > 0 and order[i - 1] == "wait" for i in proposals)

# -- sampling is the target's distribution ---------------------------------------------------------------
def test_speculative_sampling_matches_target_distribution(tiny, tmp_path_factory, default_loaded):
    """chi-squared over 1500 draws: the token after a verified draft follows the target's (top-k)
    distribution, with a random-weight draft model that disagrees with the target most of the time."""
    from tests.util import forward_logits, make_random_model_dir

    # the target's embeddings, head and first layer: a related model that often disagrees
    draft = make_random_model_dir(tmp_path_factory.mktemp("draft"), default_loaded.tokenizer, num_layers=1)
    prompt = [5, 17, 230, 4000, 17, 230]
    top_k, n = 6, 1500
    llm = LLM(tiny, num_kv_blocks=1024, max_num_seqs=256,
              speculative_config={"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3,
                                  "min_acceptance_rate": 0})
    # (max_tokens 3: the first token comes from the prefill, the second is verified with a draft)
    params = [SamplingParams(temperature=1.5, top_k=top_k, seed=s, max_tokens=3, ignore_eos=True) for s in range(n)]
    outs = token_ids(llm.generate([{"prompt_token_ids": prompt}] * n, params, use_tqdm=False))
    stats = llm.llm_engine.core.spec.stats
    assert stats.num_draft_tokens >= n and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    first = max(set(o[0] for o in outs), key=[o[0] for o in outs].count)
    seconds = [o[1] for o in outs if o[0] == first]
    plain = LLM(tiny, num_kv_blocks=64)
    for tokens, observed in [([], [o[0] for o in outs]), ([first], seconds)]:
        logits = forward_logits(plain.llm_engine.runner, prompt + tokens)[-1].float()
        top = torch.topk(logits, top_k)
        probs = torch.softmax(top.values / 1.5, -1).tolist()
        counts = [observed.count(t) for t in top.indices.tolist()]
        assert sum(counts) == len(observed)  # nothing outside the top-k
        chi2 = sum((c - len(observed) * p) ** 2 / (len(observed) * p) for c, p in zip(counts, probs))
        assert chi2 < 20.5, (chi2, counts, probs)  # p = 0.001 at 5 degrees of freedom


# -- draft model ---------------------------------------------------------------------------------------------
def test_draft_model_greedy_identical(default_llm, default_model_path, tiny):
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = token_ids(default_llm.generate(PROMPTS[:4], params, use_tqdm=False))
    same = LLM(max_model_len=1024, num_kv_blocks=256, speculative_config={
        "method": "draft_model", "model": str(default_model_path), "num_speculative_tokens": 3})
    out = same.generate(PROMPTS[:4], params, use_tqdm=False)
    assert token_ids(out) == plain
    stats = same.llm_engine.core.spec.stats
    assert stats.acceptance_rate > 0.9  # the target drafting for itself
    assert all(o.metrics.spec_mean_accepted_length > 2.5 for o in out)


def test_draft_model_needs_the_same_tokenizer(tmp_path, default_loaded):
    from tests.util import make_random_model_dir

    other = make_random_model_dir(tmp_path / "other", default_loaded.tokenizer)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [w for w in vocab if w.isalpha() and len(w) > 3][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens trade ids: same strings, different vocabulary
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InvalidRequestError, match="different tokenizer"):
        LLM(max_model_len=256, num_kv_blocks=16,
            speculative_config={"method": "draft_model", "model": str(other), "num_speculative_tokens": 2})


def test_chi2_bound_is_the_right_quantile():
    # the bound used above: P(chi2_5 > 20.5) ~ 0.001 (survival function by series)
    x, k = 20.5, 5
    term = s = math.exp(-x / 2) * (x / 2) ** (k / 2) / math.gamma(k / 2 + 1)
    for i in range(1, 200):
        term *= (x / 2) / (k / 2 + i)
        s += term
    assert 0.0005 < 1 - s < 0.002


# -- CLI and server ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ['{"method": "eagle"}', "{oops", '{"num_speculative_tokens": 0}'])
def test_cli_bad_speculative_config_is_one_line(value):
    from tests.test_cli_errors import assert_one_line_error, run_forge

    r, _ = run_forge("generate", "hi", "--speculative-config", value)
    assert_one_line_error(r)
    assert "speculative_config" in r.stderr


def test_cli_generate_with_ngram_speculation(tiny):
    from tests.test_cli_errors import run_forge

    plain, _ = run_forge("generate", "one two three one two three one two", "--model", tiny, "--max-tokens", "12")
    spec, _ = run_forge("generate", "one two three one two three one two", "--model", tiny, "--max-tokens", "12",
                        "--speculative-config", json.dumps(NGRAM))
    assert spec.returncode == 0 and spec.stdout == plain.stdout


def test_server_metrics_count_drafts():
    from forge.config import EngineConfig
    from forge.engine.llm_engine import LLMEngine
    from tests.test_server_harness import LiveServer

    engine = LLMEngine(EngineConfig(max_model_len=1024, num_kv_blocks=128, speculative_config=NGRAM))
    with LiveServer(engine) as server:
        client = server.openai_client()
        out = client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=40, temperature=0)
        assert len(out.choices[0].text) > 0
        stats = engine.spec_stats
        assert stats.num_accepted_tokens > 0, stats
        accepted = server.wait_for_metric("forge:spec_decode_num_accepted_tokens_total", stats.num_accepted_tokens)
        drafted = server.metric("forge:spec_decode_num_draft_tokens_total")
        assert 0 < accepted <= drafted and server.metric("forge:spec_decode_num_drafts_total") > 0
        assert accepted == engine.spec_stats.num_accepted_tokens


# -- the verify step's inputs -----------------------------------------------------------------------------
def test_verify_rows_as_decode_rows_give_the_decode_logits(default_llm):
    """A verify step run as one decode row per token (the GPU's path, ModelRunner._flat_verify) and as
    multi-token rows (the CPU's) give each position exactly the logits a decode step gives it."""
    from forge.engine.plan import StepPlan

    runner = default_llm.llm_engine.runner
    tokens = default_llm.get_tokenizer().encode(PROMPTS[0])[:40]
    tables = [list(range(500, 503)), list(range(503, 506))]

    def plan(rows):
        p = StepPlan()
        for i, (start, n) in enumerate(rows):
            p.add_row(i, "r", start, tokens[start : start + n], tables[i], n, n)
        return p

    runner.execute(plan([(0, 30), (0, 34)]))  # prefill both
    decodes = [runner.execute(plan([(30 + j, 1), (34 + j, 1)])) for j in range(5)]  # then decode 5 tokens each
    expected = torch.cat([torch.stack([d[i] for d in decodes]) for i in range(2)])
    verify = plan([(30, 5), (34, 5)])
    default = runner.flat_verify
    try:
        for flat in (False, True):
            runner.flat_verify = flat
            assert runner._flat_verify(verify) == flat
            assert torch.equal(runner.execute(verify), expected)
    finally:
        runner.flat_verify = default


def test_step_cost_and_fit_drafts():
    from forge.spec_decode.adaptive import StepCost, fit_drafts

    cost = StepCost()
    assert cost.cost(1) is None and fit_drafts([0.9], [7], 1, cost) == [7]  # nothing measured: as offered
    tiles = {t: 0.005 + 0.0015 * t + (0.002 if t > 4 else 0.0) for t in range(1, 11)}  # a step after 4 tokens
    for t in [1, 5, 1, 3, 1, 8, 2, 4, 4, 2, 3, 8, 5]:
        cost.observe(t, tiles[t])
    c0, c1 = cost.line()
    assert c1 > 0 and cost.cost(8) == pytest.approx(tiles[8]) and cost.cost(4) == pytest.approx(tiles[4])
    assert fit_drafts([0.9], [7], 1, cost) == [3]  # 4 tokens: before the cliff
    assert fit_drafts([0.99], [7], 1, cost) == [7]  # almost sure drafts pay past it
    assert fit_drafts([0.1, 0.9], [7, 7], 2, cost) == [0, 2]
