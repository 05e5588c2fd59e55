"""StructuredOutputsParams.reasoning_end: the grammar waits until the output contains the marker (a
reasoning model's "</think>"), then constrains every token after it, with synchronous and async
scheduling. A small random model with a marker taken from its own free output, so the test knows
exactly where the grammar must start."""

import re

import pytest

from forge import LLM, SamplingParams, StructuredOutputsParams
from forge.tokenizer import IncrementalDetokenizer
from tests.util import random_prompts


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_grammar_starts_after_the_marker(tiny, async_scheduling):
    llm = LLM(tiny, num_kv_blocks=128, async_scheduling=async_scheduling)
    prompt = random_prompts(1, seed=6)[0]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    detok = IncrementalDetokenizer(llm.llm_engine.tokenizer, prompt["prompt_token_ids"])
    k = next(i for i, t in enumerate(free.token_ids, 1) if detok.add(t) and i >= 3)  # text grew at token k
    marker = detok.text  # appears first when token k is generated

    def run(**spec):
        params = SamplingParams(temperature=0, max_tokens=12,
                                structured_outputs=StructuredOutputsParams(regex="[0-9]{3}", **spec))
        return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]

    gated = run(reasoning_end=marker)
    assert gated.token_ids[:k] == free.token_ids[:k]  # free until the marker...
    assert gated.text.startswith(marker) and re.fullmatch("[0-9]{3}", gated.text[len(marker):]), gated.text
    assert gated.finish_reason == "stop"  # ...then the grammar, to its end
    assert re.fullmatch("[0-9]{3}", run().text)  # without the marker: constrained from the first token
    never = run(reasoning_end="\x00never\x00")  # a marker that never comes: free to max_tokens
    assert never.token_ids == free.token_ids[:len(never.token_ids)] and never.finish_reason == "length"
