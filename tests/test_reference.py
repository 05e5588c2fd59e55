"""The exact CPU path (quantization="none": weights dequantized to float32) must reproduce HF
transformers' fp32 greedy tokens on the default model exactly. (The default, quantized path is held
to the same greedy tokens only loosely: tests/test_quant_cpu.py.)"""

import pytest

from forge import SamplingParams


@pytest.fixture(scope="module")
def exact_llm():
    from forge import LLM

    return LLM(max_model_len=2048, num_kv_blocks=512, quantization="none")


def _generate(llm, cases):
    params = [SamplingParams(temperature=0, max_tokens=len(c["greedy_ids"]), logprobs=5) for c in cases]
    return llm.generate([{"prompt_token_ids": c["prompt_ids"]} for c in cases], params, use_tqdm=False)


def _check(case, out):
    o = out.outputs[0]
    assert o.token_ids == case["greedy_ids"], case["name"]
    # First-step top-5 logprobs match HF within 1e-3 (and the same five tokens, in order).
    first = case["top5_logprobs"][0]
    got = sorted(o.logprobs[0].items(), key=lambda kv: kv[1].rank)
    assert [tid for tid, _ in got] == [tid for tid, _ in first]
    for (tid, lp), (_, ref_lp) in zip(got, first):
        assert abs(lp.logprob - ref_lp) < 1e-3, (case["name"], tid, lp.logprob, ref_lp)


@pytest.mark.parametrize("index", range(5))
def test_greedy_matches_reference_one_at_a_time(exact_llm, reference_cases, index):
    case = reference_cases[index]
    (out,) = _generate(exact_llm, [case])
    _check(case, out)
    # Every later step's top-5 also within 1e-3 where tokens agree.
    for step, ref in zip(out.outputs[0].logprobs, case["top5_logprobs"]):
        for tid, ref_lp in ref:
            if tid in step:
                assert abs(step[tid].logprob - ref_lp) < 1e-3


def test_greedy_matches_reference_batched(exact_llm, reference_cases):
    outs = _generate(exact_llm, reference_cases)
    for case, out in zip(reference_cases, outs):
        _check(case, out)


def test_text_prompts_and_decoded_text(exact_llm, reference_cases):
    """Plain-text prompts tokenize to the reference ids; decoded text equals the reference minus EOS."""
    plain = [c for c in reference_cases if not c["text"].startswith("<|im_start|>")]
    outs = exact_llm.generate(
        [c["text"] for c in plain],
        [SamplingParams(temperature=0, max_tokens=len(c["greedy_ids"])) for c in plain],
        use_tqdm=False,
    )
    for case, out in zip(plain, outs):
        assert out.prompt_token_ids == case["prompt_ids"]
        assert out.outputs[0].text == case["greedy_text"].replace("<|im_end|>", "")


def test_chat_api_uses_template(exact_llm, reference_cases):
    case = next(c for c in reference_cases if c["name"] == "chat_sys")
    messages = [
        {"role": "system", "content": "You are a pirate. Answer like one."},
        {"role": "user", "content": "What is the sea?"},
    ]
    (out,) = exact_llm.chat(messages, SamplingParams(temperature=0, max_tokens=len(case["greedy_ids"])), use_tqdm=False)
    assert out.prompt_token_ids == case["prompt_ids"]
    assert out.outputs[0].token_ids == case["greedy_ids"]
