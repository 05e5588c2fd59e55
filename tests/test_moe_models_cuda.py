"""Qwen3-MoE and Mixtral on the GPU against forge's fp32 CPU reference on the same tiny HF model
(tests/test_moe_models.py builds it with transformers' class): bfloat16 prefill (grouped GEMMs past
MOE_KERNEL_MAX_PAIRS pairs, forge's MoE kernels below) and decode-step logits within bf16 tolerance,
float32 within 1e-3; decode replayed from CUDA graphs gives the eager engine's greedy tokens."""

import pytest
import torch

from forge import SamplingParams
from tests.test_families_cuda import check_close, prefill_then_decode_logits
from tests.test_moe_models import CASES, Case
from tests.util import default_tokenizer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp("moe_cuda"), default_tokenizer())


@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_cuda_logits_match_cpu(case, monkeypatch):
    from forge.ops import cuda

    cpu = case.llm.llm_engine.runner
    ref = prefill_then_decode_logits(cpu, case.prompt, 8)
    gpu = case.engine(device="cuda", max_num_seqs=4).llm_engine.runner
    check_close(prefill_then_decode_logits(gpu, case.prompt, 8), ref, f"{case.path.name} bf16")
    monkeypatch.setattr(cuda, "MOE_KERNEL_MAX_PAIRS", 0)  # every bf16 step through the grouped GEMMs
    check_close(prefill_then_decode_logits(gpu, case.prompt, 8), ref, f"{case.path.name} bf16 grouped GEMMs")
    gpu32 = case.engine(device="cuda", dtype="float32", max_num_seqs=4).llm_engine.runner
    got = prefill_then_decode_logits(gpu32, case.prompt, 8)
    assert (got - ref).abs().max() < 1e-3, (got - ref).abs().max()


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral"], indirect=True)
def test_graph_decode_equals_eager(case):
    prompts = [{"prompt_token_ids": p} for p in (case.prompt, case.prompt[:9], case.prompt[3:30])]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = {}
    for eager in (False, True):
        llm = case.engine(device="cuda", max_num_seqs=4, enforce_eager=eager)
        assert (llm.llm_engine.runner.graphs is None) == eager
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs[False] == outs[True]
