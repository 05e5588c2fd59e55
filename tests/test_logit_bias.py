"""logit_bias: SamplingParams checks, the bias added to the logits before the grammar masks and the
sampler (CPU, and CUDA where there is one), and its effect on generations of a small random model."""

import pytest
import torch

from forge import LLM, SamplingParams, StructuredOutputsParams
from forge.engine.logit_bias import apply_logit_bias
from forge.errors import InvalidRequestError
from tests.util import random_prompts


@pytest.mark.parametrize("bias, words", [
    ([1, 2], ["must be a dict"]),
    ({-1: 1.0}, ["logit_bias key", ">= 0", "-1"]),
    ({"-1": 1.0}, ["logit_bias key", "'-1'"]),
    ({"x": 1.0}, ["logit_bias key", "'x'"]),
    ({True: 1.0}, ["logit_bias key"]),
    ({5: 100.5}, ["logit_bias[5]", "[-100, 100]"]),
    ({5: float("nan")}, ["logit_bias[5]", "finite"]),
    ({5: "1"}, ["logit_bias[5]"]),
])
def test_bad_logit_bias_is_one_clear_error(bias, words):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(logit_bias=bias)
    assert err.value.param == "logit_bias" and "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_logit_bias_keys_become_token_ids():
    assert SamplingParams(logit_bias={"50": -100, 7: 2.5}).logit_bias == {50: -100.0, 7: 2.5}


class _Seq:
    def __init__(self, bias):
        self.params = SamplingParams(logit_bias=bias)


def _check_apply(device: str):
    logits = torch.zeros(3, 10, device=device)
    out = apply_logit_bias(logits, [_Seq({1: 5.0, 9: -100.0}), _Seq(None), _Seq({0: 0.5})])
    expected = torch.zeros(3, 10)
    expected[0, 1], expected[0, 9], expected[2, 0] = 5.0, -100.0, 0.5
    assert out is logits and torch.equal(out.cpu(), expected)
    untouched = torch.ones(2, 4, device=device)
    assert torch.equal(apply_logit_bias(untouched, [_Seq(None), _Seq({})]).cpu(), torch.ones(2, 4))


def test_apply_logit_bias_cpu():
    _check_apply("cpu")


@pytest.mark.cuda
def test_apply_logit_bias_cuda():
    _check_apply("cuda")


@pytest.fixture(scope="module")
def llms(tiny):
    return [LLM(tiny, num_kv_blocks=128, async_scheduling=mode) for mode in (False, True)]


def _first_tokens(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, **kw),
                        use_tqdm=False)[0].outputs[0].token_ids


def test_bias_steers_greedy_generation(llms):
    prompt = random_prompts(1, seed=4)[0]
    for llm in llms:  # synchronous and async scheduling
        free = _first_tokens(llm, prompt)
        banned = _first_tokens(llm, prompt, logit_bias={free[0]: -100})
        assert banned[0] != free[0]
        assert _first_tokens(llm, prompt, logit_bias={123: 100}) == [123] * 6
        # the grammar's mask comes after the bias: a forbidden token stays forbidden however favoured
        digits = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, logit_bias={123: 100},
                                                     structured_outputs=StructuredOutputsParams(regex="[0-9]{3}")),
                              use_tqdm=False)[0].outputs[0]
        assert len(digits.text) == 3 and digits.text.isdigit()


def test_token_outside_the_vocabulary_is_refused(llms):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary") as err:
        llms[0].generate("hi", SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
    assert err.value.param == "logit_bias"
