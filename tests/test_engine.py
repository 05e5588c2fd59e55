"""Engine behaviour on the real default model: batching, sampling, stops, logprobs, n, abort."""

import pytest

from forge import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def add(a, b):\n",
    "List three colors: red,",
]


def run_staggered(llm, prompts, params, join_every=3):
    """Add one prompt every `join_every` steps, so requests join while others decode."""
    engine = llm.llm_engine
    pending = list(enumerate(prompts))
    ids, done, steps = {}, {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % join_every == 0:
            i, prompt = pending.pop(0)
            ids[engine.add_request(prompt, params[i])] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out
        steps += 1
    return [done[i] for i in range(len(prompts))]


def sequential(llm, prompts, params):
    return [llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_batch_equals_sequential(default_llm, mode):
    if mode == "greedy":
        params = [SamplingParams(temperature=0, max_tokens=12 + 3 * i) for i in range(len(PROMPTS))]
    else:
        params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=12 + 3 * i) for i in range(len(PROMPTS))]
    alone = sequential(default_llm, PROMPTS, params)
    together = default_llm.generate(PROMPTS, params, use_tqdm=False)
    staggered = run_staggered(default_llm, PROMPTS, params)
    for a, b, c in zip(alone, together, staggered):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text == c.outputs[0].text


def test_seeded_sampling_reproducible_and_seed_dependent(default_llm):
    p = "Once upon a time"
    a = default_llm.generate(p, SamplingParams(temperature=1.0, seed=7, max_tokens=20), use_tqdm=False)[0]
    b = default_llm.generate(p, SamplingParams(temperature=1.0, seed=7, max_tokens=20), use_tqdm=False)[0]
    c = default_llm.generate(p, SamplingParams(temperature=1.0, seed=8, max_tokens=20), use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].token_ids != c.outputs[0].token_ids


def test_top_k_one_equals_greedy(default_llm):
    p = "The best thing about Python is"
    greedy = default_llm.generate(p, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    topk1 = default_llm.generate(p, SamplingParams(temperature=0.8, top_k=1, seed=3, max_tokens=16), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == topk1.outputs[0].token_ids


def test_max_tokens_stop_strings_and_stop_token_ids(default_llm):
    p = "1, 2, 3, 4, 5,"
    out = default_llm.generate(p, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    out = default_llm.generate(p, SamplingParams(temperature=0, max_tokens=30, stop=["9"]), use_tqdm=False)[0].outputs[0]
    assert out.text == " 6, 7, 8, " and out.finish_reason == "stop" and out.stop_reason == "9"
    out = default_llm.generate(
        p, SamplingParams(temperature=0, max_tokens=30, stop=["9"], include_stop_str_in_output=True), use_tqdm=False
    )[0].outputs[0]
    assert out.text == " 6, 7, 8, 9"
    # ", " is token 28 then 216 (" "): stopping on token id 28 ends right after " 6".
    out = default_llm.generate(p, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[28]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[-1] == 28 and out.finish_reason == "stop" and out.stop_reason == 28


def test_eos_ends_generation_unless_ignored(default_llm, reference_cases):
    case = next(c for c in reference_cases if c["name"] == "chat_hello")  # ends with <|im_end|> (2)
    prompt = {"prompt_token_ids": case["prompt_ids"]}
    out = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[-1] == 2 and out.finish_reason == "stop" and "<|im_end|>" not in out.text
    out = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=25, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 25 and out.finish_reason == "length"


def test_logprobs_and_n(default_llm):
    out = default_llm.generate(
        "Hello, my name is", SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, logprobs=3), use_tqdm=False
    )[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        for tid, step in zip(o.token_ids, o.logprobs):
            assert tid in step and len(step) in (3, 4)
            assert all(lp.logprob <= 0 for lp in step.values())
        assert o.cumulative_logprob == pytest.approx(sum(s[t].logprob for t, s in zip(o.token_ids, o.logprobs)))


def test_abort_frees_blocks_and_others_continue(default_llm):
    engine = default_llm.llm_engine
    a = engine.add_request("Tell me a story about a dragon", SamplingParams(temperature=0, max_tokens=30))
    b = engine.add_request("Tell me a story about a knight", SamplingParams(temperature=0, max_tokens=6))
    for _ in range(3):
        engine.step()
    engine.abort_request(a)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    assert a not in finished and finished[b].outputs[0].finish_reason == "length"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_utf8_never_split_in_output(default_llm):
    out = default_llm.generate(
        "Emoji party: 🎉🎉🎉 and Chinese: 你好世界。 More emoji:", SamplingParams(temperature=1.0, seed=5, max_tokens=40),
        use_tqdm=False,
    )[0].outputs[0]
    tok = default_llm.get_tokenizer()
    assert "\ufffd" not in out.text or "\ufffd" in tok.decode(out.token_ids)


def test_prompt_logprobs_match_generation_logprobs(default_llm):
    """Teacher forcing: the prompt logprobs of prompt+output equal the logprobs seen while generating."""
    prompt = "The capital of France is"
    gen = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, logprobs=2), use_tqdm=False)[0]
    ids = gen.prompt_token_ids + gen.outputs[0].token_ids
    forced = default_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=2),
                                  use_tqdm=False)[0]
    plp = forced.prompt_logprobs
    assert len(plp) == len(ids) and plp[0] is None
    n = len(gen.prompt_token_ids)
    for i, (tid, step) in enumerate(zip(gen.outputs[0].token_ids, gen.outputs[0].logprobs)):
        entry = plp[n + i]
        assert entry[tid].rank == 1  # greedy tokens are the most likely
        # (1e-4 on the exact path; the default quantized path rounds activations to bfloat16 at each
        # matmul, so prefill and decode, whose float32 sums differ by ~1e-7, can land a bfloat16 step
        # apart, and 30 layers carry that to ~0.03 here)
        assert abs(entry[tid].logprob - step[tid].logprob) < 6e-2
        assert len(entry) == 2  # the target is also the top-1 here


def test_prompt_logprobs_chunked_equals_unchunked(tiny_model_dir):
    from forge import LLM

    ids = list(range(1000, 1100))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)
    whole = LLM(str(tiny_model_dir), num_kv_blocks=64).generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    chunked = LLM(str(tiny_model_dir), num_kv_blocks=64, max_num_batched_tokens=16).generate(
        {"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    assert len(whole.prompt_logprobs) == len(chunked.prompt_logprobs) == 100
    for a, b in zip(whole.prompt_logprobs[1:], chunked.prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        for t in a:
            assert abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank
    assert whole.outputs[0].token_ids == chunked.outputs[0].token_ids
