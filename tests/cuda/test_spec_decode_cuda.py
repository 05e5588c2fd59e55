"""Speculative decoding on the GPU: verify steps run as decode rows through the decode CUDA graphs
(ModelRunner._flat_verify); outputs equal plain decoding, greedy and seeded, with graphs and eager."""

import pytest
import torch

from forge import LLM, SamplingParams
from tests.test_spec_decode import repeating_prompts
from tests.util import default_tokenizer, make_random_model_dir

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_random_model_dir(tmp_path_factory.mktemp("spec"), default_tokenizer(), seed=3, hidden_size=256,
                                     intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64))


def ids(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ngram_greedy_equals_plain_with_graphs(model_dir, dtype):
    prompts = repeating_prompts(12, seed=4)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = ids(LLM(model_dir, device="cuda", dtype=dtype, num_kv_blocks=256, max_num_seqs=16), prompts, params)
    spec = LLM(model_dir, device="cuda", dtype=dtype, num_kv_blocks=256, max_num_seqs=16,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1})
    assert spec.llm_engine.runner.graphs is not None and spec.llm_engine.runner.flat_verify
    assert ids(spec, prompts, params) == plain
    assert spec.llm_engine.spec_stats.num_draft_tokens > 0  # (verify steps ran; accepted runs: the test below)


def test_draft_model_seeded_equals_plain_graphs_and_eager(model_dir):
    prompts = repeating_prompts(8, seed=5)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=32, ignore_eos=True) for i in range(len(prompts))]
    plain = ids(LLM(model_dir, device="cuda", dtype="float32", num_kv_blocks=256, max_num_seqs=8), prompts, params)
    config = {"method": "draft_model", "model": model_dir, "num_speculative_tokens": 3}
    for eager in (False, True):
        spec = LLM(model_dir, device="cuda", dtype="float32", num_kv_blocks=256, max_num_seqs=8, enforce_eager=eager,
                   speculative_config=config)
        assert ids(spec, prompts, params) == plain
        stats = spec.llm_engine.spec_stats
        assert stats.acceptance_rate > 0.9  # the model drafting for itself, with the target's noise
        del spec
        torch.cuda.empty_cache()
